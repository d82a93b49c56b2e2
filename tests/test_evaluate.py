import numpy as np
import pytest
import torch

from cryopose import io
from cryopose.errors import InputError
from cryopose.evaluate import load_predictions
from cryopose.geometry import euler_to_matrix
from cryopose.simulate import SimulationSpec, simulate_entry


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="ev", symmetry="C1", box_size=32, pixel_size=4.1, n_particles=30, snr=1.0, seed=2)
    return io.Entry(simulate_entry(spec, tmp_path_factory.mktemp("b"), progress=False))


def _write(entry, tmp_path, half, edit=None, name="pred.star"):
    star = entry.read_star(half)
    parts = star.particles.copy().sample(frac=1.0, random_state=0).reset_index(drop=True)  # any order
    parts["rlnParticleFigureOfMerit"] = 0.5
    if edit:
        parts = edit(parts)
    io.write_particles_star(tmp_path / name, io.ParticleStar(star.optics, parts))
    return tmp_path / name


def test_predictions_are_aligned_with_the_entry(entry, tmp_path):
    pred = load_predictions(entry, 1, _write(entry, tmp_path, 1), "SO3xR2")
    truth = entry.read_star(1).particles
    expected = euler_to_matrix(torch.tensor(truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()))
    assert torch.allclose(pred.rotmats, expected, atol=1e-5)
    assert torch.allclose(pred.shifts, torch.tensor(truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()),
                          atol=1e-5)
    assert torch.allclose(pred.confidence, torch.full((30,), 0.5, dtype=torch.float64))
    assert load_predictions(entry, 1, _write(entry, tmp_path, 1), "SO3").shifts is None


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.iloc[1:], r"1 of the 30 particles of half 0 have no prediction"),
    (lambda p: p.assign(rlnImageName=[p["rlnImageName"].iloc[0]] * 2 + p["rlnImageName"].iloc[2:].tolist()),
     "more than once"),
    (lambda p: p.assign(rlnImageName=p["rlnImageName"].str.replace("particles_0", "other")), "not in half 0"),
    (lambda p: p.assign(rlnAngleTilt=np.where(np.arange(len(p)) == 3, np.nan, p["rlnAngleTilt"])), "rlnAngleTilt"),
    (lambda p: p.drop(columns="rlnAnglePsi"), "rlnAnglePsi"),
    (lambda p: p.assign(rlnParticleFigureOfMerit=-1.0), "rlnParticleFigureOfMerit"),
])
def test_bad_predictions(entry, tmp_path, edit, match):
    with pytest.raises(InputError, match=match):
        load_predictions(entry, 0, _write(entry, tmp_path, 0, edit), "SO3")


def test_wrong_half_and_type(entry, tmp_path):
    with pytest.raises(InputError, match="predictions for half 1"):
        load_predictions(entry, 0, _write(entry, tmp_path, 1), "SO3")
    with pytest.raises(InputError, match="prediction type"):
        load_predictions(entry, 0, _write(entry, tmp_path, 0), "SE3")
    with pytest.raises(InputError, match="rlnOriginXAngst"):
        load_predictions(entry, 0, _write(entry, tmp_path, 0, lambda p: p.drop(columns="rlnOriginXAngst")), "SO3xR2")
