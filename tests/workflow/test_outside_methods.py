"""The three outside routes in one leaderboard (issue 20, "Done means"): a method from an installed
package (the example plugin), a program run as a method (config `method: command`, the example
script examples/command-method/nearest_view.py, which cryopose cannot import) and a submission of
finished poses (config `submissions`: imported and checked by cryopose import-poses, nothing
trained, the row marked with where the files came from), each ranked beside a built-in method on
the tiny suite's tiny_c1."""

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from cryopose import io
from cryopose.entry import Entry
from example_plugin import install_example_plugin
from snakemake_runs import ROOT, _workdir, job_counts, snakemake

SCRIPT = ROOT / "examples" / "command-method" / "nearest_view.py"
FILES = "submissions/truth/{entry}/half{half}.star"


def _config(work, methods: dict) -> None:
    tiny = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    config = {
        "base": None,
        "entries": [e for e in tiny["entries"] if e["name"] == "tiny_c1"],
        "methods": methods,
        "submissions": {"truth": {"files": FILES}},
    }
    (work / "mine.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


NEAREST_VIEW = {
    "method": "command",
    "train": f"{sys.executable} {SCRIPT} train {{particles}} {{model_dir}}",
    "predict": f"{sys.executable} {SCRIPT} predict {{particles}} {{model_dir}} {{output}}",
    "prediction_type": "SO3",
}


@pytest.fixture()
def work(tmp_path):
    """A work copy with tiny_c1 simulated and its true poses as a submission (absolute image
    names, as a RELION user's refinement would name them)."""
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
    return work


def test_a_plugin_a_program_and_a_submission_are_ranked_beside_a_built_in(work, tmp_path, monkeypatch):
    site = install_example_plugin(tmp_path / "site", tmp_path, broken=False)
    monkeypatch.setenv("PYTHONPATH", str(site))
    _config(work, {"random": {"seed": 0}, "svd_regressor": {"epochs": 2}, "nearest_view": NEAREST_VIEW})
    snakemake(work, "results/leaderboard.csv", "--cores", "2", "--configfile", "mine.yaml")
    board = pd.read_csv(work / "results" / "leaderboard.csv").set_index("method")
    assert set(board.index) == {"random", "svd_regressor", "nearest_view", "truth"}
    for name in ("svd_regressor", "nearest_view"):
        assert math.isfinite(board.loc[name, "MAnE"]) and 0 <= board.loc[name, "MAnE"] <= 180
    assert board.loc["truth", "MAnE"] == pytest.approx(0, abs=1e-6)
    assert board.loc["truth", "shift_error_mean_A"] == pytest.approx(0, abs=1e-6)
    assert board.loc["truth", "submitted_from"] == FILES and pd.isna(board.loc["random", "submitted_from"])
    assert not (work / "results" / "models" / "truth").exists()  # nothing trained
    models = work / "results" / "models"
    assert '"final_loss"' in (models / "svd_regressor" / "tiny_c1" / "half0" / "model.json").read_text()
    record = json.loads((models / "nearest_view" / "tiny_c1" / "half1" / "model.json").read_text())
    assert record["method"] == "command" and record["params"]["train"] == NEAREST_VIEW["train"]
    assert (models / "nearest_view" / "tiny_c1" / "half1" / "views.npz").is_file()  # the program's own model
    metrics = json.loads((work / "results" / "evaluation" / "nearest_view" / "tiny_c1" / "metrics.json").read_text())
    assert metrics["prediction_type"] == "SO3"  # its parameter, so the evaluation used the true shifts


def test_a_submission_trains_nothing(work):
    _config(work, {"random": {"seed": 0}})
    dry = snakemake(work, "-n", "--configfile", "mine.yaml")
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts["import_submission"] == 2 and counts["train"] == 2 and counts["evaluate"] == 2, counts


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ({"mine": {"method": "no_such_method"}}, "config: methods: mine: method 'no_such_method' is not a registered"),
        ({"random": {"method": "command"}}, "random is a registered method itself"),
        ({"mine": {"method": "command", "train": "t"}}, "needs its predict command template"),
        ({"mine": {"method": "command", "train": "t {out}", "predict": "t {output}"}}, "unknown placeholder(s) {out}"),
        ({"mine": {"method": "random", "lr": 1}}, "mine: unknown parameter(s) lr"),
        ({"truth": {"method": "random"}}, "config: submissions: truth is also a method's name"),
    ],
)
def test_a_command_method_or_alias_that_cannot_run_stops_the_dry_run(work, methods, message):
    _config(work, methods)
    proc = snakemake(work, "-n", "--configfile", "mine.yaml", check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
