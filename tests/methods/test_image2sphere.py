"""Image2Sphere: equivariance conventions, symmetric targets, training (resume), prediction STAR."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cryopose import io
from cryopose.augment import inplane_rotation
from cryopose.data import ParticlesDataset, write_preprocessed_entry
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.geometry import random_rotations
from cryopose.grids import nearest_grid_index, so3_healpix_grid, symmetric_grid_target
from cryopose.methods import get_method, parse_params
from cryopose.methods.image2sphere.network import Image2Sphere, Image2SphereConfig
from cryopose.methods.image2sphere.training import TrainConfig, load_model, train_image2sphere
from cryopose.metrics import angular_errors
from cryopose.simulate import SimulationSpec, simulate_entry
from cryopose.symmetry import symmetry_matrices

# Small enough to build and train in seconds on 2 cores.
TINY = dict(
    image_size=32,
    resnet="resnet18",
    sphere_channels=16,
    projector_order=2,
    lmax=3,
    s2_channels=4,
    s2_kernel_order=1,
    activation_resolution=4,
    so3_kernel_n_alpha=4,
    so3_kernel_n_beta=2,
    output_order=1,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CRYOPOSE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Image2Sphere(Image2SphereConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="i2s_c2", symmetry="C2", box_size=32, pixel_size=4.1, n_particles=160, snr=2.0, seed=7)
    raw = simulate_entry(spec, tmp_path_factory.mktemp("bench"), progress=False)
    return Entry(write_preprocessed_entry(raw, tmp_path_factory.mktemp("pre"), progress=False))


def test_head_is_equivariant_with_the_label_convention(model):
    """Turning the feature map by 90° (image rotation φ = +90°) must move the logit of pose R to the
    grid cell of R·Rz(−90°), the pose the augmentation assigns to the turned image. A transposed
    Wigner table or the other side of multiplication breaks this by far more than the activation
    grid's approximation error."""
    torch.manual_seed(1)
    fmap = torch.randn(3, TINY["sphere_channels"], 4, 4)
    with torch.no_grad():
        before = model.grid_logits(model.head(model.projector(fmap)))
        after = model.grid_logits(model.head(model.projector(torch.rot90(fmap, -1, dims=(-2, -1)))))
    grid = model.grid.double()
    scale = before.abs().max()

    def mismatch(mapped):
        return float((after[:, nearest_grid_index(mapped, grid)] - before).abs().max() / scale)

    assert mismatch(grid @ inplane_rotation(torch.tensor(-90.0))) < 0.05
    assert mismatch(grid @ inplane_rotation(torch.tensor(90.0))) > 0.3
    assert mismatch(inplane_rotation(torch.tensor(-90.0)) @ grid) > 0.3


@pytest.mark.parametrize("lmax, resolution", [(3, 4), (6, 6)])
def test_separable_activation_is_e3nns_activation(lmax, resolution):
    """The factorised SO(3) activation computes e3nn's SO3Activation (grid, ReLU, quadrature back):
    the same values and gradients to float rounding (a wrong basis order or quadrature weight is
    off by O(1))."""
    from cryopose.methods.image2sphere.network import SeparableSO3Activation, e3nn_so3_activation

    reference = e3nn_so3_activation(lmax, resolution)
    separable = SeparableSO3Activation(lmax, resolution, reference.act)
    n = sum((2 * l + 1) ** 2 for l in range(lmax + 1))
    torch.manual_seed(4)
    x = torch.randn(5, 3, n, requires_grad=True)
    a, b = separable(x), reference(x)
    assert a.shape == b.shape == x.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    weights = torch.randn_like(b)
    (ga,) = torch.autograd.grad((a * weights).sum(), x)
    (gb,) = torch.autograd.grad((b * weights).sum(), x)
    # Points on the ReLU's kink may take either side; the bulk must agree.
    assert float((ga - gb).abs().median()) < 1e-4 * float(gb.abs().max())
    assert float(torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0)) > 0.9999


def test_logits_off_the_grid_agree_with_the_grid(model):
    torch.manual_seed(2)
    signal = model.head(model.projector(torch.randn(2, TINY["sphere_channels"], 4, 4))).detach()
    cells = torch.tensor([[0, 5, 77], [100, 200, 575]])
    at = model.logits_at(signal, model.grid[cells])
    torch.testing.assert_close(at, model.grid_logits(signal).gather(1, cells), rtol=1e-4, atol=1e-4)


def test_symmetric_targets_are_views_of_the_same_image(entry):
    """On a simulated C2 entry, the grid cells that carry target mass (mates g·R) project the map
    to the same image as the true pose; right-multiplied 'mates' R·g do not."""
    from torch_fourier_slice import project_3d_to_2d

    volume = torch.from_numpy(io.read_map(entry.ground_truth_map_path)[0]).float()
    poses = ParticlesDataset(entry, 0)._rotmats[:6].double()
    grid = so3_healpix_grid(4, torch.float64)
    target = symmetric_grid_target(poses, grid, "C2")

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    truth = project_3d_to_2d(volume, poses.float())
    for i in range(len(poses)):
        cells = torch.nonzero(target[i]).flatten()
        assert len(cells) == 2
        views = project_3d_to_2d(volume, grid[cells].float())
        assert min(corr(truth[i], v) for v in views) > 0.995
    g = symmetry_matrices("C2")[1]
    wrong = project_3d_to_2d(volume, (poses @ g).float())
    # An in-plane half-turn of a 32 px blob still correlates well, but clearly less than a mate.
    assert max(corr(truth[i], wrong[i]) for i in range(len(poses))) < 0.985


def _train(entry, out, work=None, epochs=2, **overrides):
    cfg = TrainConfig(
        batch_size=16, max_epochs=epochs, lr_patience=1, early_stop_patience=5, seed=3, device="cpu", **overrides
    )
    return train_image2sphere(entry, 0, out, Image2SphereConfig(**TINY), cfg, work_dir=work, progress=False)


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(entry, tmp_path):
    straight = _train(entry, tmp_path / "a", epochs=3)
    _train(entry, tmp_path / "b", tmp_path / "work", epochs=1)  # "killed" after epoch 1 ...
    resumed = _train(entry, tmp_path / "b", tmp_path / "work", epochs=3)  # ... and run again
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "b" / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and float(rows[-1]["val_median_error_deg"]) >= 0
    # No Wigner tables in checkpoints: they are rebuilt from the cache.
    assert not any("wigner" in k or k.endswith(".D") for k in a)


def test_a_one_cycle_schedule_anneals_over_its_budget_and_the_budget_is_its_shape(entry, tmp_path):
    rows = _train(entry, tmp_path / "a", tmp_path / "work", epochs=2, lr=2e-3, lr_schedule="onecycle")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["lr"] > rows[1]["lr"] and rows[1]["lr"] < 2e-3 * 0.02  # annealed to ~0 by the last step
    # Another budget is another schedule: its checkpoint is not resumed as if it were this run's.
    with pytest.raises(ValueError, match="another configuration"):
        _train(entry, tmp_path / "a", tmp_path / "work", epochs=3, lr=2e-3, lr_schedule="onecycle")


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_same_weights(tmp_path_factory, tmp_path):
    """SIGKILL of `cryopose train` during its second epoch, then the same command again: the final
    weights equal, bit for bit, those of a run that was never interrupted."""
    spec = SimulationSpec(name="i2s_kill", symmetry="C2", box_size=32, pixel_size=4.1, n_particles=480, snr=2.0, seed=8)
    raw = simulate_entry(spec, tmp_path_factory.mktemp("bench"), progress=False)
    entry = write_preprocessed_entry(raw, tmp_path_factory.mktemp("pre"), progress=False)
    params = {
        **TINY,
        "batch_size": 16,
        "max_epochs": 3,
        "lr_patience": 1,
        "early_stop_patience": 5,
        "seed": 3,
        "device": "cpu",
    }

    def command(out, work):
        argv = [
            sys.executable,
            "-m",
            "cryopose",
            "train",
            "--method",
            "image2sphere",
            "--entry",
            str(entry),
            "--half",
            "0",
            "--out",
            str(out),
            "--work-dir",
            str(work),
        ]
        return argv + [a for k, v in params.items() for a in ("--param", f"{k}={v}")]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "a", tmp_path / "wa"), check=True, capture_output=True, env=env)
    log_a = (tmp_path / "a" / "train_log.csv").read_text().splitlines()
    seconds_epoch_1 = float(log_a[1].split(",")[-1])

    proc = subprocess.Popen(
        command(tmp_path / "b", tmp_path / "wb"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    for line in proc.stdout:  # the first epoch's summary line: epoch 2 starts now
        if line.startswith("epoch 1:"):
            break
    time.sleep(0.4 * seconds_epoch_1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rows = (tmp_path / "b" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 2, "the kill must land inside epoch 2 (after epoch 1 was logged, before epoch 2 was)"

    resumed = subprocess.run(
        command(tmp_path / "b", tmp_path / "wb"), check=True, capture_output=True, text=True, env=env
    )
    assert "resuming from" in resumed.stdout and "after epoch 1" in resumed.stdout
    log_b = (tmp_path / "b" / "train_log.csv").read_text().splitlines()
    assert [r.rsplit(",", 1)[0] for r in log_b] == [r.rsplit(",", 1)[0] for r in log_a]  # all but the seconds
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] and a["val_loss"] == b["val_loss"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ca = torch.load(tmp_path / "wa" / "checkpoint.pt", weights_only=False)["state_dict"]
    cb = torch.load(tmp_path / "wb" / "checkpoint.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_a_checkpoint_of_another_configuration_is_refused(entry, tmp_path):
    _train(entry, tmp_path / "m", tmp_path / "w", epochs=1)
    with pytest.raises(ValueError, match="another configuration"):
        _train(entry, tmp_path / "m", tmp_path / "w", epochs=1, lr=5e-4)


def test_method_cross_predicts_with_original_particle_names(entry, tmp_path):
    method = get_method("image2sphere")
    params = parse_params(
        method,
        [f"{k}={v}" for k, v in TINY.items()] + ["max_epochs=1", "batch_size=16", "device=cpu", "refine_steps=2"],
    )
    method.run_train(entry, 1, tmp_path / "model", params, tmp_path / "work")
    record = (tmp_path / "model" / "model.json").read_text()
    assert '"trained_on_half": 1' in record
    out = tmp_path / "half0.star"
    method.run_predict(tmp_path / "model", entry, 0, out, params)
    star = io.read_particles_star(out).particles
    assert "rlnImageOriginalName" not in star.columns
    assert (star["rlnImageName"] == entry.read_star(0).particles["rlnImageOriginalName"]).all()
    fom = star["rlnParticleFigureOfMerit"].to_numpy()
    assert np.all((fom > 0) & (fom <= 1))
    with pytest.raises(InputError, match="other half"):
        method.run_predict(tmp_path / "model", entry, 1, tmp_path / "x.star", params)


def test_bad_parameters_name_the_problem(entry, tmp_path):
    method = get_method("image2sphere")
    with pytest.raises(InputError, match="resnet"):
        method.run_train(entry, 0, tmp_path, parse_params(method, ["resnet=resnet7"]))
    with pytest.raises(InputError, match="unknown parameter"):
        parse_params(method, ["lmaxx=3"])


def test_model_file_round_trip(entry, tmp_path):
    _train(entry, tmp_path, epochs=1)
    model, saved = load_model(tmp_path / "model.pt")
    assert saved["epoch"] == 1 and model.config == Image2SphereConfig(**TINY)
    x = ParticlesDataset(entry, 1, image_size=32).get_batch([0, 1])[1]
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # evaluation is deterministic (all projector points)


@pytest.mark.slow
def test_training_learns_poses(tmp_path):
    """Six epochs (~4 min on 2 cores) on the default suite's C4 entry (SNR 0.1, 3,000 particles per
    half, 30 % preferred views) bring the cross-predicted median error far below random's (94°)."""
    from cryopose.methods.image2sphere.prediction import predict_image2sphere
    from cryopose.simulate import SUITES

    spec = next(s for s in SUITES["default"] if s.name == "sim_c4")
    entry = Entry(
        write_preprocessed_entry(
            simulate_entry(spec, tmp_path / "b", progress=False), tmp_path / "p", image_size=32, progress=False
        )
    )
    train_image2sphere(
        entry,
        0,
        tmp_path / "m",
        Image2SphereConfig(image_size=32),
        TrainConfig(max_epochs=6, lr_patience=3, early_stop_patience=5, device="cpu"),
        progress=False,
    )
    model, _ = load_model(tmp_path / "m" / "model.pt")
    ds = ParticlesDataset(entry, 1, image_size=32)
    rot, confidence = predict_image2sphere(model, ds, progress=False)
    err = angular_errors(ds._rotmats.double(), rot, "C4")
    guess = random_rotations(len(ds), generator=torch.Generator().manual_seed(0)).double()
    random_err = angular_errors(ds._rotmats.double(), guess, "C4")
    assert err.median() < 0.6 * random_err.median()
    # The confidence means something: the more confident half of the particles is the more accurate.
    confident = confidence > confidence.median()
    assert err[confident].median() < err[~confident].median()
