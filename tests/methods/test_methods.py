"""The methods registry: the oracle rows and the train/predict contract."""

import pandas as pd
import pytest
import torch

from cryopose import io
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.geometry import euler_to_matrix
from cryopose.methods import get_method, parse_params
from cryopose.metrics import angular_errors
from cryopose.simulate import SimulationSpec, simulate_entry

EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="me", symmetry="C2", box_size=32, pixel_size=4.1, n_particles=200, snr=1.0, seed=4)
    return Entry(simulate_entry(spec, tmp_path_factory.mktemp("b"), progress=False))


def _poses(star_path):
    return euler_to_matrix(torch.tensor(io.read_particles_star(star_path).particles[EULER].to_numpy()))


@pytest.mark.parametrize("name", ["ground_truth", "random"])
def test_oracles_cross_predict(entry, tmp_path, name):
    method = get_method(name)
    method.run_train(entry, 0, tmp_path / "m0", dict(method.default_params))
    method.run_predict(tmp_path / "m0", entry, 1, tmp_path / "p1.star", dict(method.default_params))
    truth = euler_to_matrix(torch.tensor(entry.read_star(1).particles[EULER].to_numpy()))
    err = angular_errors(truth, _poses(tmp_path / "p1.star"), "C2")
    if name == "ground_truth":
        assert err.max() < 1e-3
    else:  # uniform on SO(3) modulo C2: mean error far from zero (~100°)
        assert err.mean() > 70
    # The model of half 0 may not predict half 0, and a model of another method is refused.
    with pytest.raises(InputError, match="cannot predict half 0"):
        method.run_predict(tmp_path / "m0", entry, 0, tmp_path / "p0.star", {})
    other = "random" if name == "ground_truth" else "ground_truth"
    with pytest.raises(InputError, match="model is for method"):
        get_method(other).run_predict(tmp_path / "m0", entry, 1, tmp_path / "p1.star", {})


def test_random_predictions_depend_on_the_seed(entry, tmp_path):
    method = get_method("random")
    method.run_train(entry, 1, tmp_path / "m1", {"seed": 0})
    method.run_predict(tmp_path / "m1", entry, 0, tmp_path / "a.star", {"seed": 0})
    method.run_predict(tmp_path / "m1", entry, 0, tmp_path / "b.star", {"seed": 0})
    method.run_predict(tmp_path / "m1", entry, 0, tmp_path / "c.star", {"seed": 1})
    assert torch.equal(_poses(tmp_path / "a.star"), _poses(tmp_path / "b.star"))
    assert not torch.allclose(_poses(tmp_path / "a.star"), _poses(tmp_path / "c.star"))


def test_registry_and_params():
    known = "known methods: command, ground_truth, image2sphere, projection_matching, random"
    with pytest.raises(InputError, match=known):
        get_method("image2spher")
    random = get_method("random")
    assert parse_params(random, ["seed=3"]) == {"seed": 3}
    with pytest.raises(InputError, match="unknown parameter 'lr'"):
        parse_params(random, ["lr=0.1"])
    with pytest.raises(InputError, match="key=value"):
        parse_params(random, ["seed"])
    with pytest.raises(InputError, match="seed must be an integer"):
        parse_params(random, ["seed=abc"])


def test_transfer_prediction_needs_a_model_of_another_entry(entry, tmp_path):
    spec = SimulationSpec(
        name="other", symmetry="C2", box_size=32, pixel_size=4.1, n_particles=50, snr=1.0, seed=9, molecule_seed=4
    )
    other = Entry(simulate_entry(spec, tmp_path / "b", progress=False))
    method = get_method("ground_truth")
    method.run_train(entry, 0, tmp_path / "m0", {})
    # Any half of another entry; the model's own entry is refused as a transfer.
    for half in (0, 1):
        method.run_predict(tmp_path / "m0", other, half, tmp_path / f"t{half}.star", {}, transfer=True)
        assert len(io.read_particles_star(tmp_path / f"t{half}.star").particles) == 50
    with pytest.raises(InputError, match="model is for entry 'me'"):
        method.run_predict(tmp_path / "m0", other, 1, tmp_path / "x.star", {})
    with pytest.raises(InputError, match="transfer predicts another entry"):
        method.run_predict(tmp_path / "m0", entry, 1, tmp_path / "x.star", {}, transfer=True)


def test_generalisation_table(tmp_path):
    import json

    from cryopose.leaderboard import generalisation_table, write_generalisation

    files = []
    for method, entry_name, trained_on, mane in [("a", "e", "e", 10.0), ("a", "f", "e", 30.0), ("b", "e", None, 50.0)]:
        path = tmp_path / f"{method}_{entry_name}.json"
        record = {"method": method, "entry": entry_name, "MAnE": mane, "delta_FSCR0.5": mane / 10}
        if trained_on:
            record["trained_on"] = trained_on
        path.write_text(json.dumps(record))
        files.append(path)
    table = generalisation_table(files)
    assert table[["method", "entry", "setting"]].values.tolist() == [
        ["a", "e", "in-distribution"],
        ["a", "f", "transfer"],
        ["b", "e", "in-distribution"],
    ]
    write_generalisation(table, tmp_path / "g.csv")
    assert (tmp_path / "g.png").stat().st_size > 5000 and len(pd.read_csv(tmp_path / "g.csv")) == 3


def test_string_parameters_from_the_workflow_are_their_text():
    """The workflow passes each config value as JSON (`--param resnet="resnet152"`): a string
    parameter is the decoded string, not its quotes (config/cesped.yaml's image2sphere jobs were
    refused with `got '"resnet152"'`); text that is not a JSON string stays as typed (`device=0`)."""
    import json

    i2s = get_method("image2sphere")
    nasty = 'it\'s "quoted" {braced} $HOME'
    for text, value in [(json.dumps("resnet152"), "resnet152"), ("resnet152", "resnet152")]:
        assert parse_params(i2s, [f"resnet={text}"]) == {"resnet": value}
    assert parse_params(i2s, [f"encoder_weights={json.dumps(nasty)}"]) == {"encoder_weights": nasty}
    assert parse_params(i2s, ["device=0"]) == {"device": "0"}
    assert parse_params(get_method("command"), ['train=echo "a b"']) == {"train": 'echo "a b"'}
