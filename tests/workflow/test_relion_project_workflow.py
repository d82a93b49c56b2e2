"""The workflow on a RELION user's own particles: a refinement's run_data.star made an entry by
`cryopose import-star` (no stack copied) and listed in a standalone config runs end to end."""

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from cryopose.simulate import SimulationSpec, simulate_entry
from relion_project import make_relion_project
from snakemake_runs import _workdir, snakemake


@pytest.mark.filterwarnings("ignore::cryopose.io.mrc.IrregularMRCHeader")
def test_an_imported_refinement_runs_through_the_workflow(tmp_path):
    spec = SimulationSpec(name="wf_c4", symmetry="C4", box_size=32, pixel_size=3.0, n_particles=120, seed=3, snr=1.0)
    project = make_relion_project(simulate_entry(spec, tmp_path / "sim", progress=False), tmp_path / "project")
    before = sorted(project.rglob("*"))
    work = _workdir(tmp_path / "work")
    subprocess.run(
        [sys.executable, "-m", "cryopose", "import-star", "Refine3D/job020/run_data.star"]
        + ["--out", str(work / "bench")],
        cwd=project,
        check=True,
        capture_output=True,
    )
    config = {
        "base": None,
        "benchmark_dir": "bench",
        "entries": [{"name": "job020_run_data"}],
        "methods": {"ground_truth": {}, "random": {"seed": 0}},
    }
    (work / "mine.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(work, "results/leaderboard.csv", "--cores", "2", "--configfile", "mine.yaml")
    board = pd.read_csv(work / "results" / "leaderboard.csv").set_index("method")
    assert set(board.index) == {"ground_truth", "random"} and set(board["entry"]) == {"job020_run_data"}
    assert board.loc["ground_truth", "MAnE"] == pytest.approx(0, abs=1e-6)
    assert board.loc["random", "MAnE"] > 30  # C4: random poses are far from the truth
    assert sorted(project.rglob("*")) == before  # the project received nothing
    assert not any((work / "bench").rglob("*.mrcs"))  # and no stack was copied
