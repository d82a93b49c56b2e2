"""`snakemake --profile slurm` (the user's literal command) through a real single-node Slurm
started by scripts/slurm-local, with fake GPUs so that GPU requests are scheduled as on a
cluster. Needs root (it starts the daemons): skipped otherwise, unless CRYOPOSE_REQUIRE_SLURM=1
(set in CI), where a failure to start Slurm fails the test."""

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from snakemake_runs import ROOT, _workdir, job_counts, snakemake, use_tiny_subset

JOBCOMP = Path("/var/spool/cryopose-slurm/jobcomp.log")


@pytest.fixture(scope="module")
def slurm():
    required = os.environ.get("CRYOPOSE_REQUIRE_SLURM") == "1"
    if os.geteuid() != 0 and not required:
        pytest.skip("starting a local Slurm needs root (scripts/slurm-local start)")
    start = subprocess.run([str(ROOT / "scripts" / "slurm-local"), "start"], capture_output=True, text=True)
    if start.returncode != 0:
        message = f"scripts/slurm-local start failed:\n{start.stdout}\n{start.stderr}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    yield
    subprocess.run([str(ROOT / "scripts" / "slurm-local"), "stop"], capture_output=True)


def _jobs() -> list[dict]:
    """jobcomp/filetxt lines as dicts (JobId=… Name=… JobState=…)."""
    rows = []
    for line in JOBCOMP.read_text().splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        rows.append(fields)
    return rows


def test_profile_slurm_resolves_from_the_repository_root(tmp_path):
    """Snakemake looks for `--profile slurm` in the working directory, not in profiles/: the root's
    link makes the literal command work; without it the same command fails."""
    assert (ROOT / "slurm").resolve() == (ROOT / "profiles" / "slurm").resolve()
    work = _workdir(tmp_path)
    shutil.copy(ROOT / "slurm", work / "slurm", follow_symlinks=False)
    out = snakemake(work, "--profile", "slurm", "-n", "--configfile", "config/tiny.yaml", "--slurm-no-account")
    assert "This was a dry-run" in out.stdout + out.stderr
    (work / "slurm").unlink()
    out = snakemake(work, "--profile", "slurm", "-n", "--configfile", "config/tiny.yaml", check=False)
    assert out.returncode != 0 and "profile" in (out.stdout + out.stderr).lower()


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").iterdir() if p.is_dir()))
def test_every_profile_dry_runs(tmp_path, profile):
    work = _workdir(tmp_path)
    extra = ["--slurm-no-account"] if profile == "slurm" else []
    out = snakemake(work, "--profile", f"profiles/{profile}", "-n", "--configfile", "config/tiny.yaml", *extra)
    assert "This was a dry-run" in out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.slurm
def test_tiny_workflow_through_slurm(slurm, tmp_path):
    """The Slurm mechanics on a part of the tiny DAG that holds every kind of job: simulation,
    preprocessing, ground truth, the network's training, prediction and refinement (GPU jobs), the
    oracle's (CPU jobs), evaluation, the generalisation pair's transfer jobs (GPU) and the tables."""
    work = _workdir(tmp_path)
    use_tiny_subset(work, ["tiny_c2"], ["ground_truth", "image2sphere", "image2sphere+refine"], generalisation=True)
    shutil.copy(ROOT / "slurm", work / "slurm", follow_symlinks=False)
    # One GPU per network job; one thread per job, so that two jobs share the CI machine's 2 cores.
    (work / "config" / "gpu.yaml").write_text("devices:\n  train_gpus: 1\nthreads:\n  train: 1\n  reconstruct: 1\n")
    before = len(_jobs()) if JOBCOMP.exists() else 0
    out = snakemake(
        work,
        "--profile",
        "slurm",
        "--configfile",
        "config/gpu.yaml",
        "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--verbose",
        timeout=1800,
    )
    board = pd.read_csv(work / "results" / "leaderboard.csv")
    assert len(board) == 3 and board["MAnE"].notna().all()
    assert (work / "results" / "generalisation.csv").is_file()
    # Every job but `all` ran as a Slurm job and completed (the cluster's job-completion log).
    jobs = _jobs()[before:]
    dry_work = _workdir(tmp_path / "count")
    use_tiny_subset(dry_work, ["tiny_c2"], ["ground_truth", "image2sphere", "image2sphere+refine"], generalisation=True)
    dry = snakemake(dry_work, "-n")
    expected = job_counts(dry.stdout + dry.stderr)["total"] - 1
    assert len(jobs) == expected, (len(jobs), expected)
    assert all(j["JobState"] == "COMPLETED" for j in jobs), [j for j in jobs if j["JobState"] != "COMPLETED"][:3]
    # The network's stages asked for the GPU, the oracle's and the reconstructions did not:
    # image2sphere's train and predict (2 halves each), the 2 refinements of image2sphere+refine,
    # and image2sphere's 2 transfer predictions on tiny_c2_far.
    calls = [line for line in (out.stdout + out.stderr).splitlines() if "sbatch call:" in line]
    assert len(calls) == expected, (len(calls), expected)
    gpu_calls = [c for c in calls if "--gpus=1" in c]
    assert len(gpu_calls) == 2 + 2 + 2 + 2, len(gpu_calls)
    assert all("rule_train" not in c or "ground_truth" not in c for c in gpu_calls)
