"""Poses people already have, scored (issue 20, item 4, RELION part): `cryopose import-poses` takes
each particle of a half from a RELION particle STAR file however its image names are spelt and
whatever its row order, and the ground truth imported this way scores MAnE 0 and shift error 0."""

from pathlib import Path

import pytest
import starfile

from cryopose import cli
from cryopose.entry import Entry
from cryopose.evaluate import evaluate
from cryopose.simulate import SimulationSpec, simulate_entry
from relion_project import make_relion_project

pytestmark = pytest.mark.filterwarnings("ignore::cryopose.io.mrc.IrregularMRCHeader")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    spec = SimulationSpec(name="pi_c4", symmetry="C4", box_size=32, pixel_size=3.0, n_particles=80, seed=5, snr=1.0)
    source = simulate_entry(spec, tmp_path_factory.mktemp("bench"), progress=False)
    return make_relion_project(source, tmp_path_factory.mktemp("project"))


def test_a_refinements_poses_in_any_spelling_are_scored_as_the_truth(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert cli.main(["import-star", "Refine3D/job020/run_data.star", "--out", str(tmp_path / "bench")]) == 0
    entry = Entry(tmp_path / "bench" / "job020_run_data")  # absolute image names
    table = starfile.read("Refine3D/job020/run_data.star")
    parts = table["particles"].iloc[::-1].reset_index(drop=True)  # another row order
    split = parts["rlnImageName"].str.split("@", n=1, expand=True)
    parts["rlnImageName"] = split[0].astype(int).astype(str) + "@./" + split[1]  # 7@./x.mrcs, not 000007@x.mrcs
    starfile.write({"optics": table["optics"], "particles": parts}, tmp_path / "respelled.star")
    preds = []
    for h in (0, 1):
        preds.append(tmp_path / f"half{h}.star")
        argv = ["import-poses", "--entry", str(entry.root), "--half", str(h)]
        argv += ["--from", str(tmp_path / "respelled.star")]
        assert cli.main(argv + ["--out", str(preds[-1])]) == 0, capsys.readouterr().err
    m = evaluate(entry, *preds, prediction_type="SO3xR2", backend="torch", plots=False, progress=False).metrics
    assert m["MAnE"] == pytest.approx(0, abs=1e-4)  # the STAR holds 6 decimals
    assert m["shift_error_mean_A"] == pytest.approx(0, abs=1e-4)
    # The confidence is the source's rlnMaxValueProbDistribution, particle by particle.
    written = starfile.read(preds[0])["particles"].set_index("rlnImageName")["rlnParticleFigureOfMerit"]
    truth = entry.read_star(0).particles.set_index("rlnImageName")["rlnMaxValueProbDistribution"]
    assert written.to_dict() == pytest.approx(truth.to_dict())

    capsys.readouterr()
    starfile.write({"optics": table["optics"], "particles": parts.iloc[1:]}, tmp_path / "short.star")
    argv = ["import-poses", "--entry", str(entry.root), "--half", "1", "--from", str(tmp_path / "short.star")]
    assert cli.main(argv + ["--out", str(tmp_path / "x.star")]) == 2
    err = capsys.readouterr().err
    assert "short.star" in err and "1 of the 80 particles of half 1" in err and not (tmp_path / "x.star").exists()
