"""Finished poses as a submission (issue 20, item 3): config `submissions` names RELION STAR files
per entry and half; the workflow imports and checks them (cryopose import-poses), trains nothing,
scores them beside the methods and marks their leaderboard rows with where they came from."""

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from cryopose import io
from cryopose.entry import Entry
from snakemake_runs import ROOT, _workdir, job_counts, snakemake

FILES = "submissions/truth/{entry}/half{half}.star"


@pytest.fixture()
def work(tmp_path):
    """A work copy with the tiny suite's tiny_c1 simulated, the submission (its true poses, image
    names made absolute as a RELION user's refinement would name them) and a config of its own."""
    work = _workdir(tmp_path / "work")
    subprocess.run(
        [sys.executable, "-m", "cryopose", "simulate", "--suite", "tiny", "--entries", "tiny_c1", "--quiet"]
        + ["--out", "resources/benchmark"],
        cwd=work,
        check=True,
        capture_output=True,
    )
    entry = Entry(work / "resources" / "benchmark" / "tiny_c1")
    for h in (0, 1):
        path = work / FILES.format(entry="tiny_c1", half=h)
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_particles_star(path, io.with_absolute_image_names(entry.read_star(h)))
    tiny = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    config = {
        "base": None,
        "entries": [e for e in tiny["entries"] if e["name"] == "tiny_c1"],
        "methods": {"random": {"seed": 0}},
        "submissions": {"truth": {"files": FILES}},
    }
    (work / "mine.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return work


def test_a_submission_is_scored_beside_the_methods_and_marked(work):
    dry = snakemake(work, "-n", "--configfile", "mine.yaml")
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts["import_submission"] == 2 and counts["train"] == 2 and counts["evaluate"] == 2, counts
    snakemake(work, "results/leaderboard.csv", "--cores", "2", "--configfile", "mine.yaml")
    board = pd.read_csv(work / "results" / "leaderboard.csv").set_index("method")
    assert set(board.index) == {"random", "truth"}
    assert board.loc["truth", "MAnE"] == pytest.approx(0, abs=1e-6)
    assert board.loc["truth", "shift_error_mean_A"] == pytest.approx(0, abs=1e-6)
    assert board.loc["truth", "submitted_from"] == FILES and pd.isna(board.loc["random", "submitted_from"])
    assert not (work / "results" / "models" / "truth").exists()  # nothing trained


def test_a_submission_named_as_a_method_is_refused(work):
    config = yaml.safe_load((work / "mine.yaml").read_text())
    config["submissions"] = {"random": {"files": FILES}}
    (work / "mine.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = snakemake(work, "-n", "--configfile", "mine.yaml", check=False)
    assert proc.returncode != 0 and "config: submissions: random is also a method's name" in proc.stdout + proc.stderr
