"""Running the workflow from a test: a fresh copy of its files, Snakemake in a subprocess, the job
counts of a dry run. Shared by the workflow, Slurm, container, download and method-page tests."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository


def _workdir(tmp_path: Path) -> Path:
    """A copy of the workflow's files (not results/ or resources/), so runs start from nothing."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir``; ``timeout`` (s) turns a run that never ends (a Slurm job that
    can never be scheduled stays pending for ever) into a failure instead of a hung CI."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def use_tiny_subset(
    work: Path, entries: list[str], methods: list[str], generalisation: bool = False, sensitivity: bool = False
) -> None:
    """Make a part of the tiny config the work copy's config.yaml (a --configfile would be merged
    key by key into the default's methods and experiments): the runs that test a mechanism
    (resuming, Slurm) need only the jobs that exercise it, not the whole tiny DAG again."""
    import yaml

    cfg = yaml.safe_load((work / "config" / "tiny.yaml").read_text())
    cfg["entries"] = [e for e in cfg["entries"] if e["name"] in entries]
    cfg["methods"] = {name: cfg["methods"][name] for name in methods}
    if not generalisation:
        cfg.pop("generalisation", None)
    if not sensitivity:
        cfg.pop("sensitivity", None)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    block = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", block, re.M)}
