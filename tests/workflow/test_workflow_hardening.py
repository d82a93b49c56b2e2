"""The workflow judges its config before the first job, and no config value reaches a shell
unquoted: dry runs of impossible configs (each fails with the key, the value and what was
expected), and a dry run and a real tiny run whose paths and parameters carry spaces, quotes,
``$(…)``, ``;`` and non-ASCII characters (nothing they spell may run)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from snakemake_runs import _workdir, snakemake

# One small simulated entry and the two oracles: dry runs parse quickly, the real run takes seconds.
BASE = """\
benchmark_dir: resources/benchmark
entries:
  - name: h_c1
    simulate:
      symmetry: C1
      box_size: 24
      pixel_size: 4.0
      n_particles: 40
      snr: 1.0
      seed: 7
      amplitude_contrast: 0.1
      defocus_range: [0.5, 2.5]
generalisation: []
sensitivity: {angular_noise_deg: [], random_percent: []}
methods:
  ground_truth: {}
  random:
    seed: 0
threads: {train: 1, reconstruct: 1}
"""

# Every character a shell gives a meaning to that a path or a string may hold.
NASTY = 'it\'s a "dir" $(touch SENTINEL); `touch SENTINEL` é ü'
# The same for the benchmark folder, less whitespace, quotes and '#', which the image names of
# STAR files cannot carry (the workflow refuses them: test_a_benchmark_dir_star_files_cannot_hold).
# Unquoted, each of $(>SENTINEL), ;>SENTINEL and `>SENTINEL` creates the file without a space.
NASTY_DIR = "bench_$(>SENTINEL);>SENTINEL;`>SENTINEL`&|<é_ü"


def _sentinels(root: Path) -> list[Path]:
    return [p for p in root.rglob("SENTINEL")]


def _dry_run_fails(tmp_path: Path, config: str, *args: str) -> str:
    work = _workdir(tmp_path / "w")
    # The config replaces the default one: a --configfile would be merged into it.
    (work / "config" / "config.yaml").write_text(config)
    out = snakemake(work, "-n", *args, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert not (work / "resources").exists() and not (work / "results").exists()
    return text


@pytest.mark.parametrize(
    "old, new, words",
    [
        ("symmetry: C1", "symmetry: X9", ["h_c1", "symmetry", "X9", "C<n>"]),
        ("symmetry: C1", "symmetry: C0", ["h_c1", "symmetry", "C0", "C<n>"]),
        ("symmetry: C1", "symmetry: I5", ["h_c1", "symmetry", "I5", "C<n>"]),
        ("box_size: 24", "box_size: 25", ["h_c1", "box_size", "25", "even"]),
        ("box_size: 24", "box_size: 10", ["box_size", "10", "16"]),
        ("amplitude_contrast: 0.1", "amplitude_contrast: 1", ["amplitude_contrast", "1", "maximum"]),
        ("defocus_range: [0.5, 2.5]", "defocus_range: [2.5, 0.5]", ["h_c1", "defocus_range", "low <= high"]),
        ("seed: 7", "seed: 7\n      source: maps/none.mrc", ["h_c1", "source", "maps/none.mrc", "not found"]),
        ("    seed: 0\n", "    seed: abc\n", ["random", "seed", "'abc'", "integer"]),
        ("    seed: 0\n", "    seed: 1.5\n", ["random", "seed", "1.5", "integer"]),
        (
            "  ground_truth: {}\n",
            "  ground_truth: {}\n  projection_matching: {rounds: many}\n",
            ["projection_matching", "rounds", "'many'", "integer"],
        ),
        (
            "  ground_truth: {}\n",
            "  ground_truth: {}\n  projection_matching: {max_shift: -2}\n",
            ["projection_matching", "max_shift", "-2"],
        ),
        (
            "  ground_truth: {}\n",
            "  ground_truth: {}\n  image2sphere: {augment: 1}\n",
            ["image2sphere", "augment", "1", "true or false"],
        ),
        # CESPED's definitions are scored on relion_reconstruct's maps (the default backend is torch).
        (
            "threads: {",
            "evaluation: {cesped_compatible: true}\nthreads: {",
            ["evaluation.cesped_compatible", "reconstruction.backend", "relion", "'torch'"],
        ),
        ("threads: {", "evaluation: {cesped_compatible: yes please}\nthreads: {", ["cesped_compatible", "boolean"]),
    ],
)
def test_an_impossible_value_fails_the_dry_run(tmp_path, old, new, words):
    assert old in BASE
    text = _dry_run_fails(tmp_path, BASE.replace(old, new, 1))
    for word in words:
        assert word in text, (word, text[-3000:])


def test_a_method_listed_twice_fails_the_dry_run(tmp_path):
    config = BASE.replace("  random:\n    seed: 0\n", "  random:\n    seed: 0\n  random:\n    seed: 5\n")
    line = config.splitlines().index("  random:", config.splitlines().index("  random:") + 1) + 1
    text = _dry_run_fails(tmp_path, config)
    assert "duplicate key 'random'" in text and "config.yaml" in text and f"line {line}" in text, text[-3000:]


def test_a_top_level_key_twice_fails_the_dry_run(tmp_path):
    text = _dry_run_fails(tmp_path, BASE + "threads: {train: 2, reconstruct: 2}\n")
    assert "duplicate key 'threads'" in text and "config.yaml" in text, text[-3000:]


def test_a_key_twice_in_a_configfile_fails_the_dry_run(tmp_path):
    """The files given with --configfile are read again as well, not only the default one."""
    work = _workdir(tmp_path / "w")
    (work / "config" / "config.yaml").write_text(BASE)
    (work / "extra.yaml").write_text("methods:\n  random:\n    seed: 1\n    seed: 2\n")
    out = snakemake(work, "-n", "--configfile", "extra.yaml", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "duplicate key 'seed'" in text and "extra.yaml" in text, text[-3000:]
    assert not (work / "results").exists()


def _nasty_config(work: Path) -> tuple[str, str, str]:
    """BASE with the benchmark folder, the entry's source map and (for the dry run) string
    parameters all spelled with NASTY; writes the map. Returns (config, benchmark_dir, map path)."""
    bench = NASTY_DIR
    source = f"maps {NASTY}/map {NASTY}.mrc"
    (work / source).parent.mkdir(parents=True)
    z, y, x = np.mgrid[:24, :24, :24] - 12.0
    blob = np.exp(-((x - 3) ** 2 + y**2 + (z + 2) ** 2) / 8) + np.exp(-((x + 3) ** 2 + (y - 2) ** 2 + z**2) / 6)
    with mrcfile.new(work / source) as mrc:
        mrc.set_data(blob.astype(np.float32))
        mrc.voxel_size = 4.0
    config = BASE.replace("benchmark_dir: resources/benchmark", f"benchmark_dir: {json.dumps(bench)}").replace(
        "      seed: 7\n", f"      seed: 7\n      source: {json.dumps(source)}\n"
    )
    return config, bench, source


def test_a_benchmark_dir_star_files_cannot_hold_fails_the_dry_run(tmp_path):
    """Spaces and quotes in benchmark_dir would reach the shell quoted, but not a STAR file: the
    run stops before any job, naming the key, the characters and why."""
    config = BASE.replace("benchmark_dir: resources/benchmark", f"benchmark_dir: {json.dumps('bench ' + NASTY)}")
    text = _dry_run_fails(tmp_path, config)
    assert "benchmark_dir" in text and "whitespace, quotes or '#'" in text and '"\'"' in text, text[-3000:]
    assert not _sentinels(tmp_path)


def _commands(text: str) -> list[list[str]]:
    """The shell commands a dry run with -p prints, split the way a POSIX shell splits them."""
    prefix = "Shell command: "
    return [shlex.split(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]


def _after(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_nasty_strings_reach_every_command_as_one_argument(tmp_path):
    work = _workdir(tmp_path / "w")
    config, bench, source = _nasty_config(work)
    # Dry run only: string parameters of the methods that take them, and a RELION launcher.
    config = config.replace(
        "  ground_truth: {}\n",
        "  ground_truth: {}\n  relion_refine:\n"
        f"    extra_args: {json.dumps(NASTY)}\n    launcher: {json.dumps(NASTY)}\n"
        f"  image2sphere:\n    encoder_weights: {json.dumps(NASTY + '.pt')}\n",
    )
    config += f"reconstruction: {{backend: relion, jobs: 1, relion_launcher: {json.dumps(NASTY)}}}\n"
    (work / "config" / "config.yaml").write_text(config)
    out = snakemake(work, "-n", "-p")
    commands = _commands(out.stdout + out.stderr)
    assert not _sentinels(tmp_path)
    entry = f"{bench}/h_c1"
    simulate = [c for c in commands if "simulate" in c]
    assert len(simulate) == 1 and _after(simulate[0], "--out") == [bench]
    spec = json.loads(next(a for a in simulate[0] if a.startswith("{")))
    assert spec["source"] == source and spec["name"] == "h_c1"
    evaluations = [c for c in commands if c[:2] == ["cryopose", "evaluate"]]
    assert len(evaluations) == 4 and all(c[2] == entry for c in evaluations)
    assert all(_after(c, "--relion-launcher") == [NASTY] for c in evaluations)
    trained = [c for c in commands if c[:2] in (["cryopose", "train"], ["cryopose", "predict"])]
    relion = [c for c in trained if _after(c, "--method") == ["relion_refine"]]
    assert len(relion) == 4
    for c in relion:
        assert _after(c, "--entry") == [entry]
        params = dict(p.split("=", 1) for p in _after(c, "--param"))
        assert json.loads(params["extra_args"]) == NASTY and json.loads(params["launcher"]) == NASTY
    i2s = [c for c in trained if _after(c, "--method") == ["image2sphere"]]
    assert len(i2s) == 4 and all(_after(c, "--param") == [f"encoder_weights={json.dumps(NASTY + '.pt')}"] for c in i2s)
    assert not _sentinels(tmp_path)


@pytest.mark.slow  # a real run: about 1.5 min on 2 shared cores
def test_a_tiny_run_with_nasty_paths_succeeds_and_runs_nothing_else(tmp_path):
    work = _workdir(tmp_path / "w")
    config, bench, source = _nasty_config(work)
    (work / "config" / "config.yaml").write_text(config)
    snakemake(work, "-c2")
    assert not _sentinels(tmp_path)
    entry = work / bench / "h_c1"
    assert json.loads((entry / "simulation.json").read_text())["source"] == source
    assert (entry / "h_c1_source_map.mrc").exists()
    board = pd.read_csv(work / "results" / "leaderboard.csv")
    assert sorted(board["method"]) == ["ground_truth", "random"] and board["MAnE"].notna().all()


def test_a_quoted_relion_launcher_keeps_its_arguments_whole():
    """`--relion-launcher` is split as a shell would split it: a container image in a folder with a
    space stays one argument (str.split would cut it in two)."""
    from cryopose.cli import _reconstruct_options, build_parser

    args = build_parser().parse_args(
        [
            "ground-truth",
            "e",
            "--out",
            "o",
            "--backend",
            "relion",
            "--relion-launcher",
            "apptainer exec '/images/my images/relion.sif'",
        ]
    )
    assert _reconstruct_options(args)["launcher"] == ["apptainer", "exec", "/images/my images/relion.sif"]
