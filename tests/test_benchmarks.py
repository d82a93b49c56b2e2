"""benchmarks/run_all: a quick run of two fast benchmarks regenerates the README's summary section,
with numbers in its tables, and leaves the rest of the README as it was."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_ALL = REPO / "benchmarks" / "run_all"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


def _number(text: str) -> float:
    """``1,234 MB`` → 1234.0; ``0.5 s`` → 0.5; ``3.2×`` → 3.2."""
    return float(text.strip().split()[0].rstrip("×").replace(",", ""))


def _outside(text: str) -> str:
    if BEGIN not in text:
        return text
    return text[: text.index(BEGIN)].rstrip("\n") + "\n" + text[text.index(END) + len(END) :].lstrip("\n")


def _table(text: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


@pytest.mark.slow
def test_run_all_quick_regenerates_the_summary(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "benchmarks" / "README.md", readme)
    before = readme.read_text()
    env = dict(os.environ, CRYOPOSE_CACHE=str(tmp_path / "cache"))
    cmd = [
        sys.executable,
        str(RUN_ALL),
        "--quick",
        "--only",
        "fsc_speed",
        "memory_scaling",
        "--readme",
        str(readme),
        "--results",
        str(tmp_path / "results"),
        "--workdir",
        str(tmp_path / "work"),
        "--python",
        sys.executable,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = readme.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert _outside(text) == _outside(before)  # the narrative sections are untouched

    section = text[text.index(BEGIN) : text.index(END)]
    main = _table(section, "| figure | ours | reference | reference tool | ratio | machine |")
    figures = [r[0] for r in main]
    assert any(f.startswith("FSC + PCC of two 64³ maps") for f in figures), figures
    if shutil.which("relion_reconstruct"):  # memory_scaling's reconstructions against relion_reconstruct
        assert any(f.startswith("evaluation (GT maps cached, torch backend)") for f in figures), figures
    kept = _table(before[before.index(BEGIN) : before.index(END)], "| figure | ours |") if BEGIN in before else []
    for r in main:
        assert len(r) == 6 and _number(r[1]) > 0, r
        if r[2]:
            assert _number(r[2]) > 0 and _number(r[4]) > 0, r
        assert "cores" in r[5], r
        # Rows of the two benchmarks just run say they are quick; the other benchmarks' rows are kept verbatim.
        assert "quick sizes" in r[5] or r in kept, r
    assert sum("quick sizes" in r[5] for r in main) >= 2, main

    memory = _table(section, "| step | size | particles/half |")
    assert {r[0] for r in memory} >= {"preprocessing", "training", "ground-truth maps", "evaluation (GT maps cached)"}
    for r in memory:
        assert all(_number(c) > 0 for c in r[4:7]), r

    scaling = _table(section, "| particles/half | box px |")
    assert [(_number(r[0]), _number(r[1])) for r in scaling] == [(50, 32), (100, 32)]
    for r in scaling:
        for c in r[2:]:
            assert len(c.split(" / ")) == 3 and all(_number(v) > 0 for v in c.split(" / ")), r

    # Each benchmark left its JSON rows and log in the results folder.
    for name in ("fsc_speed", "memory_scaling"):
        assert (tmp_path / "results" / f"{name}.json").is_file()
        assert (tmp_path / "results" / f"{name}.log").is_file()

    # A second run of one benchmark keeps the other's rows; a failing one is reported and fails the run.
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN_ALL),
            "--quick",
            "--only",
            "reconstruct_speed",
            "--readme",
            str(readme),
            "--results",
            str(tmp_path / "results2"),
            "--python",
            "/bin/false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    again = readme.read_text()
    assert re.search(r"\| `reconstruct_speed`: \*\*failed\*\* \(log: `[^`]+reconstruct_speed\.log`\)", again)
    assert section.split("<!-- run_all:data")[0].count("FSC + PCC") == again[again.index(BEGIN) :].split(
        "<!-- run_all:data"
    )[0].count("FSC + PCC")
    assert _outside(again) == _outside(before)


def test_the_core_count_projection_takes_the_longer_of_the_work_and_the_critical_path(tmp_path, capsys):
    """benchmarks/main_job_cores.py on a run of hand-written benchmark files (issue 21, item 5)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from main_job_cores import main

    def job(rel: str, s: float, cpu: float) -> None:
        path = tmp_path / "results" / "benchmarks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"s\th:m:s\tmax_rss\tcpu_time\n{s}\t0:00:00\t100\t{cpu}\n")

    job("simulate/e.tsv", 10, 10)
    job("preprocess/e.tsv", 5, 5)
    for h in (0, 1):
        job(f"train/m/e/half{h}.tsv", 100 + 20 * h, 100 + 20 * h)  # half 1 trains longer
        job(f"predict/m/e/half{h}.tsv", 20, 20)
        job(f"refine/m+refine/e/half{h}.tsv", 7, 7)
    for m in ("m", "m+refine", "random"):
        job(f"evaluate/{m}/e.tsv", 30, 60)
    job("leaderboard.tsv", 1, 1)
    assert main([str(tmp_path), "--cores", "1", "64", "--wall", "600", "--measured-cores", "1"]) == 0
    out = capsys.readouterr().out
    work = 10 + 5 + 120 + 100 + 40 + 14 + 180 + 1
    path = 10 + 5 + 120 + 20 + 7 + 30 + 1  # half 1's training, then half 0's prediction, refinement, evaluation
    assert f"{work / 60:.1f} CPU-minutes" in out and f"critical path {path / 60:.1f} min" in out
    assert f"| 1 | {work / 60:.1f} | work / cores; measured 10.0 min |" in out
    assert f"| 64 | {path / 60:.1f} | critical path |" in out
