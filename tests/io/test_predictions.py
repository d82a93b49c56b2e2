"""The one predictions format: its writer refuses what would silently become other angles, and the
command line scores a registered method's predictions as that method's type."""

import json

import numpy as np
import pytest
import torch

from cryopose.cli import main
from cryopose.entry import Entry
from cryopose.geometry import random_rotations
from cryopose.methods import get_method
from cryopose.predictions import load_predictions, write_predictions
from cryopose.simulate import SimulationSpec, simulate_entry


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="pr", symmetry="C1", box_size=32, pixel_size=4.1, n_particles=40, snr=1.0, seed=2)
    return Entry(simulate_entry(spec, tmp_path_factory.mktemp("b"), progress=False))


def test_the_writer_round_trips_through_the_reader(entry, tmp_path):
    rot = random_rotations(40, generator=torch.Generator().manual_seed(0))
    shifts = np.linspace(-3, 3, 80).reshape(40, 2)
    write_predictions(entry, 1, tmp_path / "p.star", rotmats=rot, shifts_angstrom=shifts, confidence=np.full(40, 0.5))
    pred = load_predictions(entry, 1, tmp_path / "p.star", "SO3xR2")
    assert torch.allclose(pred.rotmats, rot, atol=1e-9) and np.allclose(pred.shifts.numpy(), shifts)
    assert torch.all(pred.confidence == 0.5)


def test_the_writer_refuses_what_is_no_rotation(entry, tmp_path):
    rot = random_rotations(40, generator=torch.Generator().manual_seed(0))
    mirrored = rot.clone()
    mirrored[3] = -mirrored[3]  # det −1: a reflection
    with pytest.raises(ValueError, match="rotation matrices"):
        write_predictions(entry, 1, tmp_path / "p.star", rotmats=mirrored)
    with pytest.raises(ValueError, match="shape \\(39, 3, 3\\)"):
        write_predictions(entry, 1, tmp_path / "p.star", rotmats=rot[:39])
    assert not (tmp_path / "p.star").exists()


def test_evaluate_scores_a_registered_method_as_its_type(entry, tmp_path):
    """projection_matching predicts origins (SO3xR2): named with --method, they are scored."""
    for h in (0, 1):
        parts = entry.read_star(h).particles
        origins = parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() + 4.1  # one pixel off
        write_predictions(
            entry,
            h,
            tmp_path / f"half{h}.star",
            angles_deg=parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
            shifts_angstrom=origins,
        )
    assert get_method("projection_matching").prediction_type == "SO3xR2"
    args = [
        "evaluate",
        str(entry.root),
        "--half0",
        str(tmp_path / "half0.star"),
        "--half1",
        str(tmp_path / "half1.star"),
        "--no-plots",
        "--quiet",
    ]
    assert main([*args, "--method", "projection_matching", "--out", str(tmp_path / "pm")]) == 0
    metrics = json.loads((tmp_path / "pm" / "metrics.json").read_text())
    assert metrics["prediction_type"] == "SO3xR2" and metrics["shift_error_mean_A"] == pytest.approx(4.1 * 2**0.5)
    assert main([*args, "--method", "mine", "--out", str(tmp_path / "mine")]) == 0
    assert json.loads((tmp_path / "mine" / "metrics.json").read_text())["prediction_type"] == "SO3"
