"""relion_refine as a method: the blind half it gets, its command line, and (with RELION) an
auto-refine of a small simulated entry that recovers the poses."""

import shutil

import numpy as np
import pytest
import torch

from cryopose import io
from cryopose.errors import InputError
from cryopose.evaluate import load_predictions
from cryopose.methods import get_method, parse_params
from cryopose.metrics import angular_errors
from cryopose.relion_refine import RelionRefineConfig, auto_refine_command, blind_particles
from cryopose.simulate import SimulationSpec, simulate_entry


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="rr_c1", symmetry="C1", box_size=32, pixel_size=4.1, n_particles=200, snr=2.0,
                          seed=6)
    return io.Entry(simulate_entry(spec, tmp_path_factory.mktemp("bench"), progress=False))


def test_the_refined_half_is_blind(entry, tmp_path):
    names = blind_particles(entry, 1, tmp_path / "blind.star")
    blind = io.read_particles_star(tmp_path / "blind.star").particles
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnMaxValueProbDistribution"):
        assert col not in blind.columns
    assert sorted(blind["rlnRandomSubset"].unique()) == [1, 2]
    assert all(n.split("@", 1)[1].startswith("/") for n in blind["rlnImageName"])
    assert sorted(names.values()) == sorted(entry.read_star(1).particles["rlnImageName"])
    np.testing.assert_array_equal(blind["rlnDefocusU"], entry.read_star(1).particles["rlnDefocusU"])


def test_command_and_parameters():
    config = RelionRefineConfig.from_params(parse_params(["ini_high_A=35", "mpi_processes=4"],
                                                         get_method("relion_refine").default_params))
    cmd = auto_refine_command(config, "p.star", "ref.mrc", "run", "D2", 120.0)
    assert cmd[:3] == ["mpirun", "-np", "4"] and "relion_refine_mpi" in cmd
    text = " ".join(cmd)
    for option in ("--auto_refine --split_random_halves", "--ini_high 35", "--sym D2", "--ctf",
                   "--particle_diameter 120.0", "--firstiter_cc"):
        assert option in text
    with pytest.raises(InputError, match="mpi_processes must be >= 3"):
        RelionRefineConfig.from_params({"mpi_processes": 2})
    with pytest.raises(InputError, match="unknown parameter"):
        RelionRefineConfig.from_params({"ini_hi": 30})


@pytest.mark.slow
@pytest.mark.relion
def test_auto_refine_recovers_the_poses(entry, tmp_path):
    method = get_method("relion_refine")
    params = dict(method.default_params, offset_range_px=3.0, offset_step_px=1.5)
    method.train(entry, 0, tmp_path / "model", params)
    method.predict(tmp_path / "model", entry, 1, tmp_path / "pred.star", params)
    pred = load_predictions(entry, 1, tmp_path / "pred.star", "SO3xR2")
    truth = entry.read_star(1).particles
    from cryopose.geometry import euler_to_matrix

    true_rot = euler_to_matrix(torch.tensor(truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()))
    err = angular_errors(true_rot, pred.rotmats, "C1")
    # A blind refinement from a 40 Å start: most particles within a few sampling steps of the truth
    # (random poses would be ~127° off on average).
    assert float(err.median()) < 15, float(err.median())
    shifts = np.hypot(*(truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() - pred.shifts.numpy()).T)
    assert np.median(shifts) < 4.1
    assert pred.confidence is not None and float(pred.confidence.min()) >= 0
    assert not list(tmp_path.glob(".relion_refine-*"))  # the run folder was removed
    assert shutil.which("relion_refine_mpi")
