"""A user's config file can stand alone (config key `base`, config/README.md "A config of your
own"): `base: null` runs exactly the entries and methods it lists, `base: FILE` merges it over
FILE instead of config/config.yaml, and without `base` a --configfile is merged over the default
key by key, as before."""

import re

import pytest
import yaml

from snakemake_runs import ROOT, _workdir, job_counts, snakemake


def _own_config(base: object = ..., **extra: object) -> dict:
    """One small entry of the tiny suite and two methods, nothing else."""
    tiny = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    cfg = {} if base is ... else {"base": base}
    cfg["entries"] = [e for e in tiny["entries"] if e["name"] == "tiny_c1"]
    cfg["methods"] = {"ground_truth": {}, "random": {"seed": 0}}
    cfg.update(extra)
    return cfg


def _dry_run(tmp_path, cfg: dict, *args: str, check: bool = True):
    work = _workdir(tmp_path)
    (work / "mine.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = snakemake(work, "-n", "--configfile", "mine.yaml", *args, check=check)
    return out, out.stdout + out.stderr


# simulate, reconstruct and leaderboard once; train and predict both halves of each method; evaluate each
ONE_ENTRY_TWO_METHODS = {
    "simulate_entry": 1,
    "ground_truth_maps": 1,
    "train": 4,
    "predict": 4,
    "evaluate": 2,
    "leaderboard": 1,
    "all": 1,
    "total": 14,
}


@pytest.mark.parametrize("base", [None, "none"])
def test_a_standalone_config_runs_exactly_its_entries_and_methods(tmp_path, base):
    _, text = _dry_run(tmp_path, _own_config(base))
    assert job_counts(text) == ONE_ENTRY_TWO_METHODS, text[-3000:]
    # Nothing of config/config.yaml: no Image2Sphere, no generalisation pair, no sensitivity levels;
    # benchmark_dir, left out, takes the schema's default.
    for absent in ("image2sphere", "projection_matching", "sim_", "results/sensitivity", "results/generalisation"):
        assert absent not in text, absent
    assert "resources/benchmark/tiny_c1" in text


def test_base_none_on_the_command_line_makes_a_config_stand_alone(tmp_path):
    _, text = _dry_run(tmp_path, _own_config(), "--config", "base=none")
    assert job_counts(text) == ONE_ENTRY_TWO_METHODS, text[-3000:]


def test_without_base_a_configfile_is_merged_over_the_default(tmp_path):
    """The documented default: the default's methods and generalisation pair stay."""
    out, text = _dry_run(tmp_path, _own_config(), check=False)
    assert out.returncode != 0
    assert "generalisation: sim_c4_far: trained_on 'sim_c4' is not an entry" in text, text[-3000:]
    _, text = _dry_run(tmp_path / "2", _own_config(generalisation=[]))
    counts = job_counts(text)
    assert counts["train"] == 2 * 4 and counts["evaluate"] == 5, counts  # every method of config.yaml
    assert "image2sphere" in text and "sensitivity" in counts


def test_a_base_file_is_merged_under_the_config(tmp_path):
    """`base: config/tiny.yaml` is --configfile config/tiny.yaml (which is itself merged over
    config/config.yaml, having no base): the same jobs."""
    _, text = _dry_run(tmp_path / "a", {"base": "config/tiny.yaml"})
    tiny = snakemake(_workdir(tmp_path / "b"), "-n", "--configfile", "config/tiny.yaml")
    assert job_counts(text) == job_counts(tiny.stdout + tiny.stderr)


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("missing.yaml", r"config: base: 'missing\.yaml' not found .*or null \(none\) for a config that stands alone"),
        (3, r"config: base must be the path of a config file .*; got 3"),
        ("mine.yaml", r"mine\.yaml: base: the chain mine\.yaml -> mine\.yaml comes back to mine\.yaml"),
    ],
    ids=["missing", "not-a-path", "cycle"],
)
def test_a_bad_base_stops_the_dry_run(tmp_path, base, message):
    out, text = _dry_run(tmp_path, _own_config(base), check=False)
    assert out.returncode != 0 and re.search(message, text), text[-3000:]


def test_the_default_config_is_the_snakefiles():
    """common.smk names the Snakefile's `configfile:` as the base of a config without one."""
    default = re.search(r'^configfile:\s*"([^"]+)"', (ROOT / "Snakefile").read_text(), re.M).group(1)
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    assert f'DEFAULT_CONFIGFILE = "{default}"' in common
