#!/usr/bin/env python
"""What the main job takes on 2, 8 and 32 cores, projected from one measured run (issue 21, item 5).

    .venv/bin/python benchmarks/main_job_cores.py [RUN_FOLDER] [--cores 2 8 32] [--wall SECONDS]

Reads the Snakemake benchmark files of a finished run (``RUN_FOLDER/results/benchmarks/**.tsv``:
one per job, ``s`` its wall seconds, ``cpu_time`` the CPU seconds it used) and projects the wall
time on ``c`` cores as the larger of two lower bounds:

* the work: the jobs' CPU seconds over ``c`` cores (Snakemake keeps threads × jobs ≤ cores, and
  each job's threads are its OMP_NUM_THREADS);
* the critical path: the longest chain of jobs that must run one after another, whatever the
  cores (per entry: simulate → preprocess → train a half → predict → refine → evaluate; then the
  leaderboard), with each job's wall seconds as measured.

The two bounds meet where more cores stop helping. ``--wall`` (the measured wall time of the run)
is printed beside the projection for the measured core count, as a check of the model. Jobs
without a benchmark file (the small gathering rules) are left out of both bounds.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import pandas as pd


def job_table(run: Path) -> pd.DataFrame:
    """One row per benchmarked job: stage (the first folder under results/benchmarks), the rest of
    its path (method/entry/half), wall seconds ``s`` and ``cpu_time``."""
    rows = []
    root = run / "results" / "benchmarks"
    for path in sorted(root.rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        parts = path.relative_to(root).with_suffix("").parts
        rows.append(
            {
                "stage": parts[0],
                "key": "/".join(parts[1:]),
                "s": float(table["s"].iloc[0]),
                "cpu_time": float(table["cpu_time"].iloc[0]) if "cpu_time" in table else float(table["s"].iloc[0]),
            }
        )
    if not rows:
        raise SystemExit(f"{root}: no Snakemake benchmark files (run the workflow first)")
    return pd.DataFrame(rows)


def critical_path(jobs: pd.DataFrame) -> tuple[float, str]:
    """The longest simulate → preprocess → train → predict → refine → evaluate chain (seconds, and
    which), plus the leaderboard."""
    s = {(r.stage, r.key): r.s for r in jobs.itertuples()}
    entries = sorted({k for st, k in s if st == "simulate"})
    best, which = 0.0, ""
    for entry in entries:
        front = s.get(("simulate", entry), 0.0) + s.get(("preprocess", entry), 0.0)
        for (st, key), sec in s.items():
            if st != "train" or f"/{entry}/" not in f"/{key}":
                continue
            method, _, half = key.split("/")
            other = f"half{1 - int(half[-1])}"
            chain = front + sec + s.get(("predict", f"{method}/{entry}/{other}"), 0.0)
            refined = [v for (st2, k2), v in s.items() if st2 == "refine" and k2 == f"{method}+refine/{entry}/{other}"]
            evaluated = s.get(("evaluate", f"{method}+refine/{entry}" if refined else f"{method}/{entry}"), 0.0)
            chain += sum(refined) + evaluated
            if chain > best:
                best, which = chain, f"{entry}: {method} {half} → {other}" + (" → +refine" if refined else "")
    return best + s.get(("leaderboard", ""), 0.0), which


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=Path("."), help="the run's folder (holding results/)")
    parser.add_argument("--cores", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--wall", type=float, help="the measured wall seconds of the run (a check)")
    parser.add_argument("--measured-cores", type=int, default=2)
    args = parser.parse_args(argv)
    jobs = job_table(args.run)
    work = jobs["cpu_time"].sum()
    path, which = critical_path(jobs)
    by_stage = collections.OrderedDict(
        (stage, (len(g), g["s"].sum(), g["cpu_time"].sum())) for stage, g in jobs.groupby("stage", sort=False)
    )
    print(f"{len(jobs)} benchmarked jobs: {work / 60:.1f} CPU-minutes of work")
    print(f"critical path {path / 60:.1f} min ({which})")
    print("\n| stage | jobs | wall s (sum) | CPU s (sum) |\n| --- | --- | --- | --- |")
    for stage, (n, wall, cpu) in sorted(by_stage.items(), key=lambda kv: -kv[1][2]):
        print(f"| {stage} | {n} | {wall:.0f} | {cpu:.0f} |")
    print("\n| cores | projected wall time (min) | bound |\n| --- | --- | --- |")
    for c in args.cores:
        t = max(work / c, path)
        note = "work / cores" if work / c >= path else "critical path"
        if args.wall and c == args.measured_cores:
            note += f"; measured {args.wall / 60:.1f} min"
        print(f"| {c} | {t / 60:.1f} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
