"""Projection matching and local refinement (cryopose.matching) against images simulated in the
benchmark's conventions (cryopose.simulate, itself checked against relion_project)."""

import numpy as np
import pytest
import torch
from torch_fourier_slice import project_3d_to_2d

from cryopose import io, matching
from cryopose.ctf import ctf_2d
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.geometry import euler_to_matrix, random_rotations, rotation_about_axis
from cryopose.methods import get_method, parse_params
from cryopose.predictions import load_predictions
from cryopose.refine import refine_predictions
from cryopose.simulate import SimulationSpec, pseudo_molecule, simulate_entry, simulate_images
from cryopose.symmetry import symmetry_aware_angle

BOX, PX = 48, 3.0
EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGIN = ["rlnOriginXAngst", "rlnOriginYAngst"]


@pytest.fixture(scope="module")
def volume():
    return torch.as_tensor(pseudo_molecule(BOX, PX, "C1", seed=5)).float()


def _particles(volume, n, noise, seed=0, symmetry_volume=None):
    g = torch.Generator().manual_seed(seed)
    rot = random_rotations(n, generator=g)
    shifts = torch.randn(n, 2, generator=g, dtype=torch.float64) * 2
    defocus = torch.rand(n, generator=g, dtype=torch.float64) * 2e4 + 5e3
    ctf = ctf_2d(
        defocus,
        defocus * 0.97,
        torch.rand(n, generator=g, dtype=torch.float64) * 180,
        300.0,
        2.7,
        0.1,
        PX,
        BOX,
        bfactor=40.0,
    )
    images = simulate_images(volume, rot, shifts, ctf, torch.ones(n, dtype=torch.float64))
    images = images + torch.randn(images.shape, generator=g) * noise * images.std()
    return images, ctf, rot, shifts


def test_central_slices_are_the_projections_transforms(volume):
    rot = random_rotations(6, generator=torch.Generator().manual_seed(1))
    mask, points = matching.band_mask(BOX, 16, 4)  # above the low frequencies any blob shares
    slices = matching.central_slices(matching.fourier_cube(volume, 16), rot, points)
    reference = matching.image_spectra(project_3d_to_2d(volume, rot.float(), pad_factor=2.0), mask)
    cc = (slices.conj() * reference).real.sum(-1) / (slices.abs().norm(dim=-1) * reference.abs().norm(dim=-1))
    assert cc.min() > 0.999
    assert torch.allclose(slices.abs().norm(dim=-1), reference.abs().norm(dim=-1), rtol=0.01)
    # A transposed rotation (the classic silent mistake) gives other slices.
    wrong = matching.central_slices(matching.fourier_cube(volume, 16), rot.transpose(-1, -2), points)
    cc_wrong = (wrong.conj() * reference).real.sum(-1) / (wrong.abs().norm(dim=-1) * reference.abs().norm(dim=-1))
    assert cc_wrong.max() < 0.9


def test_band_mask_counts_each_frequency_once():
    mask, points = matching.band_mask(32, 10, 1)
    assert mask.shape == (32, 17) and len(points) == int(mask.sum())
    r = points.norm(dim=-1)
    assert r.min() >= 1 and r.max() <= 10
    assert not ((points[:, 0] == 0) & (points[:, 1] < 0)).any()  # conjugate half of k_x = 0 left out
    # Half of the full disc (and half of its k_x = 0 diameter, DC excluded): every ±k pair once.
    ky, kx = torch.meshgrid(torch.arange(-16, 16.0), torch.arange(-16, 16.0), indexing="ij")
    rr = (kx**2 + ky**2).sqrt()
    assert len(points) == int(((rr >= 1) & (rr <= 10)).sum()) // 2


def test_shift_grid():
    g = matching.shift_grid(3.0, 1.0)
    assert torch.equal(g[0], torch.zeros(2))
    assert (g.norm(dim=-1) <= 3 + 1e-9).all() and len(g) == 29
    assert len(torch.unique(g, dim=0)) == len(g)


def test_projection_matching_recovers_poses_and_shifts(volume):
    images, ctf, rot, shifts = _particles(volume, 24, noise=1.0)
    config = matching.MatchingConfig(coarse_resolution=15.0, fine_resolution=7.0, max_shift=9.0, device="cpu")
    pred_rot, pred_shift, conf = matching.projection_match(images, ctf, 24, volume, PX, config, progress=False)
    err = symmetry_aware_angle(rot, pred_rot, "C1")
    assert err.median() < 3 and (err < 10).float().mean() > 0.9
    assert (pred_shift - shifts).norm(dim=-1).median() < 0.3
    assert ((conf > 0) & (conf <= 1)).all()
    # The same particles streamed batch by batch through callables give the same answer.
    again = matching.projection_match(
        lambda i: images[i],
        lambda i: ctf[i],
        24,
        volume,
        PX,
        matching.MatchingConfig(**{**config.__dict__, "batch_size": 5}),
        progress=False,
    )
    assert torch.allclose(again[0], pred_rot, atol=1e-5)


def test_confidence_falls_with_noise(volume):
    config = matching.MatchingConfig(coarse_resolution=15.0, rounds=0, device="cpu")
    confs = []
    for noise in (0.5, 3.0, 12.0):
        images, ctf, _, _ = _particles(volume, 16, noise=noise, seed=2)
        confs.append(matching.projection_match(images, ctf, 16, volume, PX, config, progress=False)[2].median())
    assert confs[0] > confs[1] > confs[2]


def test_local_refinement_corrects_small_errors(volume):
    images, ctf, rot, shifts = _particles(volume, 24, noise=1.0, seed=3)
    g = torch.Generator().manual_seed(4)
    start = rot @ rotation_about_axis(
        torch.randn(24, 3, generator=g, dtype=torch.float64), torch.full((24,), 7.0, dtype=torch.float64)
    )
    config = matching.RefineConfig(
        local_resolution=7.0, local_step=4.0, local_rounds=6, local_max_shift=9.0, local_device="cpu"
    )
    new_rot, new_shift, score = matching.refine_poses(
        images, ctf, 24, volume, PX, start, torch.zeros(24, 2, dtype=torch.float64), config, progress=False
    )
    assert symmetry_aware_angle(rot, start, "C1").min() > 6.9
    assert symmetry_aware_angle(rot, new_rot, "C1").median() < 2.5
    assert (new_shift - shifts).norm(dim=-1).median() < 0.3
    # Refining the truth keeps it (the score never gets worse than the start).
    kept, _, _ = matching.refine_poses(images, ctf, 24, volume, PX, rot, shifts, config, progress=False)
    assert symmetry_aware_angle(rot, kept, "C1").median() < 1.5


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="pm", symmetry="C4", box_size=32, pixel_size=4.1, n_particles=120, snr=1.0, seed=8)
    return Entry(simulate_entry(spec, tmp_path_factory.mktemp("b"), progress=False))


def _truth(entry, half):
    t = entry.read_star(half).particles
    return euler_to_matrix(torch.tensor(t[EULER].to_numpy())), torch.tensor(t[ORIGIN].to_numpy())


def test_projection_matching_method_cross_predicts(entry, tmp_path):
    method = get_method("projection_matching")
    assert method.prediction_type == "SO3xR2"
    params = parse_params(method, ["fine_resolution=9.0"])
    method.run_train(entry, 1, tmp_path / "m1", params)
    reference, px = io.read_map(tmp_path / "m1" / "reference.mrc")
    assert reference.shape == (32,) * 3 and px == pytest.approx(4.1)
    method.run_predict(tmp_path / "m1", entry, 0, tmp_path / "p0.star", params)
    pred = load_predictions(entry, 0, tmp_path / "p0.star", "SO3xR2")
    rot, origins = _truth(entry, 0)
    err = symmetry_aware_angle(rot, pred.rotmats, "C4")
    assert err.median() < 6
    assert (pred.shifts - origins).norm(dim=-1).median() < 2.0  # Å: origins are predicted, in RELION's sign
    with pytest.raises(InputError, match="cannot predict half 1"):
        method.run_predict(tmp_path / "m1", entry, 1, tmp_path / "p1.star", params)
    with pytest.raises(InputError, match="coarse_resolution must be > 0"):
        method.run_predict(tmp_path / "m1", entry, 0, tmp_path / "p0.star", {**params, "coarse_resolution": 0})


def test_refinement_improves_perturbed_predictions(entry, tmp_path):
    from cryopose.reconstruct import reconstruct_torch

    volume, px = reconstruct_torch(entry.star_path(1), symmetry="C4", progress=False)
    io.write_map(tmp_path / "ref.mrc", volume, px)
    star = entry.read_star(0)
    rot, origins = _truth(entry, 0)
    g = torch.Generator().manual_seed(0)
    start = rot @ rotation_about_axis(
        torch.randn(len(rot), 3, generator=g, dtype=torch.float64), torch.full((len(rot),), 6.0, dtype=torch.float64)
    )
    parts = star.particles.copy()
    from cryopose.geometry import matrix_to_euler

    parts[EULER] = matrix_to_euler(start).numpy()
    parts = parts.drop(columns=ORIGIN)  # a rotation-only prediction: shifts start at zero
    parts["rlnParticleFigureOfMerit"] = np.linspace(0.1, 1, len(parts))
    io.write_particles_star(tmp_path / "start.star", io.ParticleStar(star.optics, parts))
    config = matching.RefineConfig(local_resolution=9.0, local_step=4.0, local_rounds=6)
    refine_predictions(
        entry, 0, tmp_path / "start.star", tmp_path / "ref.mrc", tmp_path / "out.star", config, progress=False
    )
    pred = load_predictions(entry, 0, tmp_path / "out.star", "SO3xR2")
    assert symmetry_aware_angle(rot, pred.rotmats, "C4").median() < 3
    assert (pred.shifts - origins).norm(dim=-1).median() < 2.0
    assert torch.allclose(pred.confidence, torch.tensor(parts["rlnParticleFigureOfMerit"].to_numpy()))
    # A reference on another grid is refused, naming the file.
    io.write_map(tmp_path / "small.mrc", volume[:16, :16, :16], px)
    with pytest.raises(InputError, match="small.mrc.*16×16×16"):
        refine_predictions(entry, 0, tmp_path / "start.star", tmp_path / "small.mrc", tmp_path / "x.star")
    assert not (tmp_path / "x.star").exists()


def test_refine_variant_of_any_method(entry, tmp_path):
    method = get_method("random+refine")
    assert method.prediction_type == "SO3xR2" and "local_step" in method.default_params
    assert method.default_params["seed"] == 0
    params = dict(method.default_params, local_rounds=1)
    method.run_train(entry, 0, tmp_path / "m0", params)
    assert (tmp_path / "m0" / "reference.mrc").is_file() and (tmp_path / "m0" / "base" / "model.json").is_file()
    method.run_predict(tmp_path / "m0", entry, 1, tmp_path / "p1.star", params)
    pred = load_predictions(entry, 1, tmp_path / "p1.star", "SO3xR2")
    assert len(pred.rotmats) == entry.n_particles(1)
    with pytest.raises(InputError, match="unknown method 'nothing\\+refine'"):
        get_method("nothing+refine")
