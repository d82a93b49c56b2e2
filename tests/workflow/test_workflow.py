"""The Snakemake workflow: lint, config validation, dry runs of every shipped config, and a real
end-to-end run of the tiny config (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from snakemake_runs import ROOT, _workdir, job_counts, snakemake, use_tiny_subset

CONFIGS = sorted((ROOT / "config").glob("*.yaml"))


def test_lint_is_clean(tmp_path):
    out = snakemake(_workdir(tmp_path), "--lint")
    text = out.stdout + out.stderr
    assert "Lints for" not in text and "good condition" in text


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_dry_run_schedules_every_job(tmp_path, config):
    import yaml

    from cryopose.methods import get_method

    cfg = yaml.safe_load(config.read_text())
    e, m = len(cfg["entries"]), len(cfg["methods"])
    trained = [name for name in cfg["methods"] if not name.endswith("+refine")]
    t, v = len(trained), m - len(trained)
    p = e if any(get_method(name).needs_preprocessing for name in trained) else 0
    work = _workdir(tmp_path)
    real = [x["name"] for x in cfg["entries"] if "simulate" not in x]
    for name in real:  # real entries are never simulated: they must be on disk (a dry run needs the folder only)
        (work / cfg["benchmark_dir"] / name).mkdir(parents=True)
    out = snakemake(work, "-n", "--configfile", f"config/{config.name}")
    counts = job_counts(out.stdout + out.stderr)
    s = e - len(real)
    expected = {
        "ground_truth_maps": e,
        "train": 2 * e * t,
        "predict": 2 * e * t,
        "evaluate": e * m,
        "leaderboard": 1,
        "all": 1,
    }
    if v:
        expected["refine_predictions"] = 2 * e * v
    # The generalisation experiment: each transfer entry is simulated, preprocessed when a method
    # needs it, reconstructed, predicted by the source entry's models and evaluated.
    transfers = cfg.get("generalisation", [])
    for x in transfers:
        used = x.get("methods", trained)
        s += 1
        expected["ground_truth_maps"] += 1
        p += any(get_method(name).needs_preprocessing for name in used)
        expected["predict_transfer"] = expected.get("predict_transfer", 0) + 2 * len(used)
        expected["evaluate_transfer"] = expected.get("evaluate_transfer", 0) + len(used)
    if transfers:
        expected["generalisation"] = 1
    # Misalignment sensitivity: "exact" and each level, perturbed and evaluated in one job per entry.
    sens = cfg.get("sensitivity", {})
    levels = len(sens.get("angular_noise_deg", [])) + len(sens.get("random_percent", []))
    if levels:
        expected["evaluate_sensitivity"] = len(sens.get("entries") or cfg["entries"])
        expected["sensitivity"] = 1
    if s:
        expected["simulate_entry"] = s
    if p:
        expected["preprocess_entry"] = p
    expected["total"] = sum(expected.values())
    assert counts == expected, counts


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.replace("threads:", "threadz:"), "'threadz' was unexpected"),
        (lambda c: c.replace("  random:", "  randm:"), "unknown method(s) randm"),
        (lambda c: c.replace("backend: torch", "backend: cryosparc"), "cryosparc"),
        (lambda c: c.replace("n_particles: 300", "n_particles: many", 1), "many"),
        (lambda c: c.replace("    lmax: 3", "    lmaxx: 3"), "image2sphere: unknown parameter(s) lmaxx"),
        (
            lambda c: c.replace("  random:\n    seed: 0\n", "").replace("  image2sphere+refine:", "  random+refine:"),
            "random+refine refines the predictions of random, which is not in methods",
        ),
        (
            lambda c: c.replace("    local_rounds: 3", "    local_round: 3"),
            "image2sphere+refine: unknown parameter(s) local_round",
        ),
        (
            lambda c: c.replace("    trained_on: tiny_c2", "    trained_on: tiny_c9"),
            "trained_on 'tiny_c9' is not an entry",
        ),
        (
            lambda c: c.replace("  entries: [tiny_c1]", "  entries: [tiny_c7]"),
            "sensitivity: entries: tiny_c7 not in entries",
        ),
        (lambda c: c.replace("  random_percent: [10, 20, 30]", "  random_percent: [10, 120]"), "120"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, edit, message):
    work = _workdir(tmp_path)
    # The edited tiny config replaces the default one: a --configfile would be merged into it.
    (work / "config" / "config.yaml").write_text(edit((work / "config" / "tiny.yaml").read_text()))
    out = snakemake(work, "-n", check=False)
    assert out.returncode != 0 and message in out.stdout + out.stderr
    assert not (work / "resources").exists() and not (work / "results").exists()


def test_a_real_entry_must_be_on_disk_or_downloadable(tmp_path):
    """Entries without simulation parameters: CESPED's are downloaded (one download_entry job each),
    any other must already be on disk, else the run stops before any job naming the folder."""
    work = _workdir(tmp_path)
    out = snakemake(work, "-n", "-p", "--configfile", "config/cesped.yaml")
    text = out.stdout + out.stderr
    assert job_counts(text)["download_entry"] == 8
    assert "cryopose download TEST --out resources/benchmark --base-url https://zenodo.org --retries 5" in text
    cfg = work / "config" / "cesped.yaml"
    cfg.write_text(cfg.read_text().replace("- name: TEST", "- name: MYDATA"))
    out = snakemake(work, "-n", "--configfile", "config/cesped.yaml", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "entries: MYDATA has no 'simulate' parameters and is not a CESPED entry" in text
    assert "resources/benchmark/MYDATA" in text and not (work / "results").exists()


@pytest.mark.slow
def test_tiny_workflow_end_to_end(tmp_path):
    work = _workdir(tmp_path)
    snakemake(work, "-c2", "--configfile", "config/tiny.yaml")
    board = pd.read_csv(work / "results" / "leaderboard.csv")
    methods = {"ground_truth", "random", "image2sphere", "projection_matching", "image2sphere+refine"}
    assert len(board) == 15 and set(board["method"]) == methods
    gt, rnd = board[board.method == "ground_truth"], board[board.method == "random"]
    # The oracle: zero error, V = GT, so ΔPCC = PCC(GT0,GT1) − 1 (small half-maps: clearly < 0).
    assert (gt["MAnE"] < 1e-3).all() and (gt["PCC(GT,V)"] > 0.99999).all()
    # The floor: far from it on every entry.
    merged = gt.merge(rnd, on="entry", suffixes=("_gt", "_rnd"))
    assert (merged["MAnE_rnd"] > 40).all()
    assert (merged["delta_PCC_rnd"] > merged["delta_PCC_gt"] + 0.1).all()
    assert (merged["delta_FSCR0.5_rnd"] > merged["delta_FSCR0.5_gt"]).all()
    assert board["train_seconds"].notna().all() and (board["predict_particles_per_s"] > 0).all()
    summary = pd.read_csv(work / "results" / "leaderboard_summary.csv")
    assert set(summary["method"]) == methods and (summary["entries"] == 3).all()
    # Projection matching and the refined variant predict shifts; the variant's time includes its base's.
    pm, ref = board[board.method == "projection_matching"], board[board.method == "image2sphere+refine"]
    assert (pm["MAnE"] < merged["MAnE_rnd"].min()).all() and pm["shift_error_mean_A"].notna().all()
    assert (
        ref["shift_error_mean_A"].notna().all() and board[board.method == "random"]["shift_error_mean_A"].isna().all()
    )
    i2s_time = board[board.method == "image2sphere"].set_index("entry")
    assert (ref.set_index("entry")["predict_seconds"] > i2s_time["predict_seconds"]).all()
    assert (ref.set_index("entry")["train_seconds"] == i2s_time["train_seconds"]).all()
    # The generalisation experiment: tiny_c2's models on tiny_c2_far, beside their own entry.
    gen = pd.read_csv(work / "results" / "generalisation.csv")
    assert set(gen["setting"]) == {"in-distribution", "transfer"} and (gen["trained_on"] == "tiny_c2").all()
    assert set(gen[gen.setting == "transfer"]["entry"]) == {"tiny_c2_far"} and len(gen) == 8
    assert (work / "results" / "generalisation.png").stat().st_size > 10_000
    # Misalignment sensitivity on tiny_c1: every map metric worsens (or stays) with each level of
    # either experiment, and the PCC drops at every level.
    from cryopose.sensitivity import monotone_violations

    sens = pd.read_csv(work / "results" / "sensitivity.csv")
    assert set(sens["entry"]) == {"tiny_c1"} and len(sens) == 8
    assert monotone_violations(sens) == []
    for _, g in sens.groupby("experiment"):
        assert (g.sort_values("level")["PCC(GT,V)"].diff().dropna() < 0).all()
    assert (work / "results" / "sensitivity_fsc.png").stat().st_size > 10_000
    # Image2Sphere went through preprocessing, training (with a log and resumable checkpoints kept
    # outside the model folder) and cross-prediction; at CI size its accuracy is not the point.
    i2s = board[board.method == "image2sphere"]
    assert i2s["MAnE"].between(0, 180).all() and i2s["train_seconds"].notna().all()
    assert (work / "results/models/image2sphere/tiny_d2/half1/train_log.csv").is_file()
    assert (work / "results/checkpoints/image2sphere/tiny_d2/half1/checkpoint.pt").is_file()
    assert "| ground_truth |" in (work / "results" / "leaderboard.md").read_text()
    metrics = json.loads((work / "results/evaluation/random/tiny_c1/metrics.json").read_text())
    assert metrics["method"] == "random" and metrics["entry"] == "tiny_c1" and metrics["trained_on"] == "tiny_c1"

    # Up to date: a second invocation does nothing.
    again = snakemake(work, "-n", "--configfile", "config/tiny.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
    # Deleting one metric file re-runs exactly that evaluation and what reads it: the leaderboard,
    # and for the generalisation pair's source entry (tiny_c2) the generalisation table too.
    (work / "results/evaluation/random/tiny_c1/metrics.json").unlink()
    dry = snakemake(work, "-n", "--configfile", "config/tiny.yaml")
    assert job_counts(dry.stdout + dry.stderr) == {"evaluate": 1, "leaderboard": 1, "all": 1, "total": 3}
    (work / "results/evaluation/random/tiny_c2/metrics.json").unlink()
    dry = snakemake(work, "-n", "--configfile", "config/tiny.yaml")
    assert job_counts(dry.stdout + dry.stderr) == {
        "evaluate": 2,
        "leaderboard": 1,
        "generalisation": 1,
        "all": 1,
        "total": 5,
    }
    snakemake(work, "-c2", "--configfile", "config/tiny.yaml")
    assert (work / "results/evaluation/random/tiny_c2/metrics.json").is_file()

    # The report builds, with the leaderboard and the plots in it.
    snakemake(work, "--configfile", "config/tiny.yaml", "--report", "report.html")
    report = (work / "report.html").read_text(errors="replace")
    assert (work / "report.html").stat().st_size > 10_000 and "leaderboard" in report.lower()


def test_preprocess_stage_is_wired(tmp_path):
    """Methods that need preprocessed particles (image2sphere) get them from the preprocess rule;
    the oracles train on the raw entry."""
    out = snakemake(_workdir(tmp_path), "-n", "results/preprocessed/tiny_c2", "--configfile", "config/tiny.yaml")
    assert job_counts(out.stdout + out.stderr) == {"simulate_entry": 1, "preprocess_entry": 1, "total": 2}
    assert "cryopose preprocess resources/benchmark/tiny_c2 --out results/preprocessed" in out.stdout + out.stderr
    out = snakemake(
        _workdir(tmp_path / "b"),
        "-n",
        "-p",
        "results/predictions/image2sphere/tiny_c2/half0.star",
        "results/predictions/random/tiny_c2/half0.star",
        "--configfile",
        "config/tiny.yaml",
    )
    text = out.stdout + out.stderr
    assert "--method image2sphere --entry results/preprocessed/tiny_c2" in text
    assert "--method random --entry resources/benchmark/tiny_c2" in text
    assert "--work-dir results/checkpoints/image2sphere/tiny_c2/half1" in text


@pytest.mark.slow
def test_interrupted_run_resumes(tmp_path):
    """Kill the whole run (SIGKILL, no clean-up) while evaluations are running; the next run
    redoes the interrupted jobs only and never takes their half-written outputs for finished."""
    import signal
    import time

    work = _workdir(tmp_path)
    # Two entries and the two cheap methods: enough jobs left to interrupt and to resume.
    use_tiny_subset(work, ["tiny_c1", "tiny_c2"], ["ground_truth", "random"])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "-c2"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (work / "logs" / "evaluate").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before any evaluation started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "results" / "leaderboard.csv").exists()
    # Snakemake may start an evaluation before every entry is simulated: compare only the entries
    # whose simulation had finished when the run was killed.
    done = {
        p.parent.name: p.parent / "particles_0.mrcs"
        for p in (work / "resources" / "benchmark").glob("*/simulation.json")
    }
    assert done, "no simulation had finished"
    before = {name: stack.stat().st_mtime_ns for name, stack in done.items()}
    # A killed Snakemake leaves its lock behind: the documented recovery is --unlock, then rerun.
    snakemake(work, "--unlock")
    out = snakemake(work, "-c2")
    assert {name: stack.stat().st_mtime_ns for name, stack in done.items()} == before  # not redone
    text = out.stdout + out.stderr
    assert not any(f"output: resources/benchmark/{name}\n" in text for name in done)
    board = pd.read_csv(work / "results" / "leaderboard.csv")
    assert len(board) == 4 and board["MAnE"].notna().all()


def test_relion_backend_is_passed_to_every_reconstruction(tmp_path):
    work = _workdir(tmp_path)
    cfg = work / "config" / "relion.yaml"
    cfg.write_text(
        (work / "config" / "tiny.yaml")
        .read_text()
        .replace(
            'backend: torch\n  jobs: 1\n  relion_launcher: ""',
            'backend: relion\n  jobs: 2\n  relion_launcher: "apptainer exec relion.sif"',
        )
    )
    out = snakemake(work, "-n", "--configfile", "config/relion.yaml")
    text = out.stdout + out.stderr
    commands = [
        line.split("cryopose", 1)[1]
        for line in text.splitlines()
        if "cryopose ground-truth" in line or "cryopose evaluate" in line
    ]
    # Ground truth of 3 entries and the transfer entry; 5 methods × 3 entries; 4 trained methods on
    # the transfer entry; the sensitivity experiment's one job evaluating the 7 levels of tiny_c1.
    assert len(commands) == 4 + 5 * 3 + 4 + 1
    assert sum("cryopose evaluate-perturbations" in line for line in text.splitlines()) == 1
    assert all(
        "--backend relion" in c and "--relion-launcher 'apptainer exec relion.sif'" in c and "--jobs 2" in c
        for c in commands
    ), commands
