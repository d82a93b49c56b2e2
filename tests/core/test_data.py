import subprocess

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cryopose import cli, io
from cryopose.data import ParticlesDataset, write_preprocessed_entry
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.geometry import euler_to_matrix, random_rotations
from cryopose.metrics import fsc_curve, pearson_correlation
from cryopose.simulate import SimulationSpec, simulate_entry
from cryopose.symmetry import symmetry_matrices


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="ds_c2", symmetry="C2", box_size=48, pixel_size=2.9, n_particles=120, snr=0.5, seed=4)
    return simulate_entry(spec, tmp_path_factory.mktemp("bench"), progress=False)


def test_item_structure_and_labels(entry):
    ds = ParticlesDataset(entry.name, 1, entry.parent)
    assert len(ds) == 120 and ds.symmetry == "C2" and ds.image_size == 48 and ds.sampling_rate == pytest.approx(2.9)
    pid, img, (rot, shift, conf), md = ds[7]
    parts = io.read_particles_star(entry / "particles_1.star").particles
    row = parts.iloc[7]
    assert pid == row["rlnImageName"] == "000008@particles_1.mrcs"
    assert img.shape == (1, 48, 48) and img.dtype == torch.float32
    expected = euler_to_matrix(torch.tensor(row[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)))
    assert torch.allclose(rot.double(), expected, atol=1e-6)
    assert torch.allclose(
        shift.double(), torch.tensor(row[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)), atol=1e-5
    )
    assert conf.shape == (1,) and float(conf) == pytest.approx(row["rlnMaxValueProbDistribution"], abs=1e-6)
    assert md["rlnDefocusU"] == pytest.approx(row["rlnDefocusU"]) and md["sampling_rate"] == pytest.approx(2.9)
    assert ds[-1][0] == ds[119][0]
    with pytest.raises(IndexError):
        ds[120]


def test_cesped_keyword_names_work(entry):
    ds = ParticlesDataset(
        targetName=entry.name, halfset=0, benchmarkDir=entry.parent, image_size=32, ctf_correction="none"
    )
    assert ds.image_size == 32 and ds.config.ctf_correction is None and len(ds) == 120
    with pytest.raises(TypeError, match="halfset"):
        ParticlesDataset(entry)


def test_crop_and_resize_carry_the_pixel_size(entry):
    ds = ParticlesDataset(entry, 0, image_size=32, crop_fraction=0.75)
    assert ds.image_size == 32 and ds[0][1].shape == (1, 32, 32)
    assert ds.sampling_rate * ds.image_size == pytest.approx(36 * 2.9)  # crop 36 px of 2.9 Å


def test_batched_reads_are_contiguous_and_equal_single_items(entry, monkeypatch):
    ds = ParticlesDataset(entry, 0)
    calls = []
    real = io.read_images
    monkeypatch.setattr(io, "read_images", lambda stack, idx: calls.append(np.asarray(idx).copy()) or real(stack, idx))
    ids, images, (rot, shifts, conf), records = ds.get_batch(list(range(10, 42)))
    assert len(calls) == 1 and len(calls[0]) == 32
    data = io.read_images(io.open_stack(entry / "particles_0.mrcs"), [10, 41])
    assert len(data) == 2
    for i in (10, 25, 41):
        single = ds[i]
        k = i - 10
        assert ids[k] == single[0] and torch.allclose(images[k], single[1], atol=1e-5)
        assert torch.equal(rot[k], single[2][0])


def test_dataloader_with_workers_matches_serial(entry):
    ds = ParticlesDataset(entry, 0, image_size=32)
    serial = torch.cat([b[1] for b in DataLoader(ds, batch_size=16, num_workers=0)])
    parallel = torch.cat([b[1] for b in DataLoader(ds, batch_size=16, num_workers=2)])
    assert torch.allclose(serial, parallel, atol=1e-4)  # thread counts differ: float32 rounding only
    batch = next(iter(DataLoader(ds, batch_size=8, num_workers=2)))
    assert len(batch[0]) == 8 and batch[2][0].shape == (8, 3, 3) and batch[2][2].shape == (8, 1)


def test_preprocessing_does_what_it_says(entry):
    raw = ParticlesDataset(entry, 0, normalise=False, ctf_correction=None)
    norm = ParticlesDataset(entry, 0, ctf_correction=None)
    imgs = norm.get_batch(range(20))[1][:, 0]
    c = torch.arange(48) - 24
    outside = (c[:, None] ** 2 + c[None, :] ** 2) > 24**2
    assert torch.allclose(imgs[:, outside].mean(-1), torch.zeros(20), atol=1e-4)
    assert torch.allclose(imgs[:, outside].std(-1), torch.ones(20), atol=1e-4)
    assert not torch.allclose(raw.get_batch(range(3))[1], norm.get_batch(range(3))[1])


def test_augmented_dataset_changes_images_and_labels_together(entry):
    ds = ParticlesDataset(entry, 0, augment=True, generator=torch.Generator().manual_seed(0))
    plain = ParticlesDataset(entry, 0)
    _, img_a, (rot_a, shift_a, _), _ = ds.get_batch(range(16))
    _, img_p, (rot_p, shift_p, _), _ = plain.get_batch(range(16))
    moved = ~torch.isclose(rot_a, rot_p, atol=1e-5).flatten(1).all(1)
    assert moved.sum() >= 8  # rot90 with probability 1 moves 3/4 of them
    assert not torch.allclose(img_a[moved], img_p[moved])


def test_symmetry_mates_helper(entry):
    ds = ParticlesDataset(entry, 0)
    r = random_rotations(5, generator=torch.Generator().manual_seed(0))
    mates = ds.symmetry_mates(r)
    g = symmetry_matrices("C2")
    assert mates.shape == (5, 2, 3, 3)
    assert torch.allclose(mates[:, 1], g[1] @ r)


def test_update_md_and_save_md_round_trip(entry, tmp_path):
    ds = ParticlesDataset(entry, 1)
    ids = ds.particle_ids[:4]
    r = random_rotations(4, generator=torch.Generator().manual_seed(2))
    ds.update_md(ids, r, shifts=np.array([[1.0, -2.0]] * 4), confidence=[0.1, 0.2, 0.3, 0.4])
    ds.update_md(ds.particle_ids[4:6], np.array([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]), angles_format="zyz_degrees")
    assert torch.allclose(ds[0][2][0].double(), r[0], atol=1e-5)
    out = tmp_path / "sub" / "predictions.star"
    ds.save_md(out)
    star = io.read_particles_star(out)
    p = star.particles
    np.testing.assert_allclose(p["rlnParticleFigureOfMerit"].to_numpy()[:5], [0.1, 0.2, 0.3, 0.4, 1.0])
    np.testing.assert_allclose(p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()[5], [40, 50, 60], atol=1e-4)
    assert torch.allclose(
        euler_to_matrix(torch.tensor(p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()[:4])), r, atol=1e-5
    )
    # Image names still find the stack from the new folder.
    index, stack = io.parse_image_name(p["rlnImageName"].iloc[3])
    assert index == 3 and io.resolve_stack_path(out, stack).resolve() == (entry / "particles_1.mrcs").resolve()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda ds: ds.update_md(["999999@nowhere.mrcs"], np.eye(3)[None]), "not in this half"),
        (lambda ds: ds.update_md(ds.particle_ids[:2], np.zeros((2, 3))), r"shape \(2, 3, 3\)"),
        (
            lambda ds: ds.update_md(ds.particle_ids[:2], np.stack([np.eye(3), 2 * np.eye(3)])),
            r"angles\[1\] is not a rotation",
        ),
        (lambda ds: ds.update_md(ds.particle_ids[:1], np.zeros((1, 3, 3)), angles_format="quat"), "angles_format"),
        (lambda ds: ds.update_md(ds.particle_ids[:1], np.zeros((1, 4)), angles_format="zyz_degrees"), r"\(1, 3\)"),
        (lambda ds: ds.update_md(ds.particle_ids[:1], np.eye(3)[None], confidence=[0.1, 0.2]), "confidence"),
    ],
)
def test_update_md_bad_input(entry, call, match):
    ds = ParticlesDataset(entry, 0)
    before = ds.metadata
    with pytest.raises(InputError, match=match):
        call(ds)
    assert ds.metadata.equals(before)  # nothing half-applied


def test_save_md_needs_a_star_name(entry, tmp_path):
    ds = ParticlesDataset(entry, 0)
    with pytest.raises(InputError, match=r"\.star"):
        ds.save_md(tmp_path / "predictions.txt")
    assert list(tmp_path.iterdir()) == []


def test_unknown_entry_and_bad_half(entry, tmp_path):
    with pytest.raises(InputError, match="no entry"):
        ParticlesDataset("nope", 0, tmp_path)
    with pytest.raises(InputError, match="half must be 0 or 1"):
        ParticlesDataset(entry, 2)


def test_preprocessed_entry_reads_back_identically(entry, tmp_path):
    out = write_preprocessed_entry(entry, tmp_path, image_size=32, crop_fraction=0.75, progress=False)
    pre = Entry(out)
    pre.validate()
    assert pre.box_size == 32 and pre.pixel_size == pytest.approx(36 * 2.9 / 32)
    assert (pre.read_star(0).optics["rlnCtfDataArePhaseFlipped"] == 1).all()
    on_the_fly = ParticlesDataset(entry, 0, image_size=32, crop_fraction=0.75)
    # Reading the copy without normalising again: the default phase flip is skipped because the
    # STAR says the data are already flipped.
    from_disk = ParticlesDataset(out, 0, normalise=False)
    a, b = on_the_fly.get_batch(range(10))[1], from_disk.get_batch(range(10))[1]
    assert torch.allclose(a, b, atol=1e-4)
    assert from_disk.sampling_rate == pytest.approx(on_the_fly.sampling_rate)


def test_cli_preprocess(entry, tmp_path):
    assert cli.main(["preprocess", str(entry), "--out", str(tmp_path), "--image-size", "24", "--quiet"]) == 0
    assert Entry(tmp_path / entry.name).box_size == 24
    assert cli.main(["preprocess", str(entry), "--out", str(tmp_path), "--crop-fraction", "0", "--quiet"]) == 2


@pytest.mark.relion
def test_preprocessed_entry_is_consistent_for_relion(tmp_path):
    """relion_reconstruct on the cropped, resized, phase-flipped copy gives back the (resampled) source map."""
    spec = SimulationSpec(
        name="pre",
        symmetry="C1",
        box_size=64,
        pixel_size=2.37,
        n_particles=2500,
        snr=2.0,
        bfactor=0.0,
        contrast_sigma=0.0,
        seed=8,
    )
    src = simulate_entry(spec, tmp_path / "bench", progress=False)
    out = write_preprocessed_entry(src, tmp_path / "pre", image_size=40, crop_fraction=0.875, progress=False)
    # relion_reconstruct 3.1.3 ignores the optics table's rlnCtfDataArePhaseFlipped: it needs the flag
    # (without it this map correlates at about 0.76 instead of 0.98).
    proc = subprocess.run(
        [
            "relion_reconstruct",
            "--i",
            "particles_0.star",
            "--o",
            "rec.mrc",
            "--ctf",
            "--ctf_phase_flipped",
            "--pad",
            "2",
        ],
        cwd=out,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and (out / "rec.mrc").exists(), proc.stdout + proc.stderr
    rec, px = io.read_map(out / "rec.mrc")
    truth, px_truth = io.read_map(out / "pre_source_map.mrc")
    assert px == pytest.approx(px_truth, rel=1e-4) and px == pytest.approx(2.37 * 56 / 40, rel=1e-4)
    assert pearson_correlation(rec, truth) > 0.9
    freqs, fsc = fsc_curve(rec, truth, px)
    assert fsc[freqs <= 1 / 10.0].min() > 0.8
