"""One ``+refine``: the library's ``<method>+refine`` and the workflow's rule (``cryopose refine``,
whose default reference is the library's: the training half's map) run the same code on the same
map and give the same poses."""

import json

import pandas as pd
import pytest

from cryopose import io
from cryopose.cli import main
from cryopose.entry import Entry
from cryopose.methods import get_method
from cryopose.simulate import SimulationSpec, simulate_entry


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="rf", symmetry="C2", box_size=32, pixel_size=4.1, n_particles=60, snr=1.0, seed=9)
    return Entry(simulate_entry(spec, tmp_path_factory.mktemp("b"), progress=False))


def test_library_and_workflow_refine_identically(entry, tmp_path):
    params = {"seed": 5, "local_rounds": 2, "local_device": "cpu"}
    refined = get_method("random+refine")
    refined.run_train(entry, 0, tmp_path / "model", params)
    refined.run_predict(tmp_path / "model", entry, 1, tmp_path / "library.star", params)

    # The workflow: the base method's own model and prediction, then rule refine_predictions'
    # command, which reconstructs its reference itself.
    base = get_method("random")
    base.run_train(entry, 0, tmp_path / "base", {"seed": 5})
    base.run_predict(tmp_path / "base", entry, 1, tmp_path / "base.star", {"seed": 5})
    assert (
        main(
            [
                "refine",
                "--entry",
                str(entry.root),
                "--half",
                "1",
                "--predictions",
                str(tmp_path / "base.star"),
                "--out",
                str(tmp_path / "workflow.star"),
                "--param",
                "local_rounds=2",
                "--param",
                "local_device=cpu",
                "--quiet",
            ]
        )
        == 0
    )

    library = io.read_particles_star(tmp_path / "library.star").particles
    workflow = io.read_particles_star(tmp_path / "workflow.star").particles
    pd.testing.assert_frame_equal(library, workflow, check_exact=True)
    record = json.loads((tmp_path / "model" / "model.json").read_text())
    assert record["method"] == "random+refine" and record["params"]["local_rounds"] == 2


def test_refine_takes_only_the_refinement_parameters(entry, tmp_path, capsys):
    assert (
        main(
            [
                "refine",
                "--entry",
                str(entry.root),
                "--half",
                "1",
                "--predictions",
                "p.star",
                "--reference",
                "r.mrc",
                "--out",
                str(tmp_path / "x.star"),
                "--param",
                "seed=3",
            ]
        )
        == 2
    )
    assert "unknown parameter 'seed'" in capsys.readouterr().err
