"""The methods registry: the oracle rows and the train/predict contract."""

import pytest
import torch

from cryopose import io
from cryopose.errors import InputError
from cryopose.geometry import euler_to_matrix
from cryopose.methods import get_method, parse_params
from cryopose.metrics import angular_errors
from cryopose.simulate import SimulationSpec, simulate_entry

EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="me", symmetry="C2", box_size=32, pixel_size=4.1, n_particles=200, snr=1.0, seed=4)
    return io.Entry(simulate_entry(spec, tmp_path_factory.mktemp("b"), progress=False))


def _poses(star_path):
    return euler_to_matrix(torch.tensor(io.read_particles_star(star_path).particles[EULER].to_numpy()))


@pytest.mark.parametrize("name", ["ground_truth", "random"])
def test_oracles_cross_predict(entry, tmp_path, name):
    method = get_method(name)
    method.train(entry, 0, tmp_path / "m0", dict(method.default_params))
    method.predict(tmp_path / "m0", entry, 1, tmp_path / "p1.star", dict(method.default_params))
    truth = euler_to_matrix(torch.tensor(entry.read_star(1).particles[EULER].to_numpy()))
    err = angular_errors(truth, _poses(tmp_path / "p1.star"), "C2")
    if name == "ground_truth":
        assert err.max() < 1e-3
    else:  # uniform on SO(3) modulo C2: mean error far from zero (~100°)
        assert err.mean() > 70
    # The model of half 0 may not predict half 0, and a model of another method is refused.
    with pytest.raises(InputError, match="cannot predict half 0"):
        method.predict(tmp_path / "m0", entry, 0, tmp_path / "p0.star", {})
    other = "random" if name == "ground_truth" else "ground_truth"
    with pytest.raises(InputError, match="model is for method"):
        get_method(other).predict(tmp_path / "m0", entry, 1, tmp_path / "p1.star", {})


def test_random_predictions_depend_on_the_seed(entry, tmp_path):
    method = get_method("random")
    method.train(entry, 1, tmp_path / "m1", {"seed": 0})
    method.predict(tmp_path / "m1", entry, 0, tmp_path / "a.star", {"seed": 0})
    method.predict(tmp_path / "m1", entry, 0, tmp_path / "b.star", {"seed": 0})
    method.predict(tmp_path / "m1", entry, 0, tmp_path / "c.star", {"seed": 1})
    assert torch.equal(_poses(tmp_path / "a.star"), _poses(tmp_path / "b.star"))
    assert not torch.allclose(_poses(tmp_path / "a.star"), _poses(tmp_path / "c.star"))


def test_registry_and_params():
    with pytest.raises(InputError, match="known methods: ground_truth, image2sphere, projection_matching, random"):
        get_method("image2spher")
    assert parse_params(["seed=3"], {"seed": 0}) == {"seed": 3}
    with pytest.raises(InputError, match="unknown parameter 'lr'"):
        parse_params(["lr=0.1"], {"seed": 0})
    with pytest.raises(InputError, match="key=value"):
        parse_params(["seed"], {"seed": 0})
