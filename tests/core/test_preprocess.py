import numpy as np
import pytest
import torch

from cryopose.ctf import ctf_2d
from cryopose.geometry import random_rotations
from cryopose.metrics import pearson_correlation
from cryopose.preprocess import (
    PreprocessConfig,
    background_normalise,
    center_crop,
    fourier_resize,
    fourier_resize_map,
    output_geometry,
    preprocess_images,
)
from cryopose.simulate import pseudo_molecule, simulate_images


def test_background_normalise_uses_the_outside_of_the_circle():
    g = torch.Generator().manual_seed(0)
    s = 64
    img = 3.0 * torch.randn(4, s, s, generator=g) + 7.0
    c = torch.arange(s) - s // 2
    inside = (c[:, None] ** 2 + c[None, :] ** 2) <= (s / 2) ** 2
    img[:, inside] += 50.0  # a strong "particle" inside must not bias the statistics
    out = background_normalise(img)
    bg = out[:, ~inside]
    assert torch.allclose(bg.mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(bg.std(-1), torch.ones(4), atol=1e-5)
    flat = background_normalise(torch.full((1, 8, 8), 5.0))
    assert torch.isfinite(flat).all() and flat.abs().max() == 0


def test_center_crop_keeps_the_centre_pixel():
    img = torch.zeros(1, 10, 10)
    img[0, 5, 5] = 1
    out = center_crop(img, 6)
    assert out.shape == (1, 6, 6) and out[0, 3, 3] == 1
    with pytest.raises(ValueError):
        center_crop(img, 12)


def test_fourier_resize_keeps_centre_scale_and_width():
    s = 64
    c = torch.arange(s, dtype=torch.float64) - s // 2
    sigma = 4.0
    blob = torch.exp(-(c[:, None] ** 2 + (c[None, :] - 6) ** 2) / (2 * sigma**2))[None]
    small = fourier_resize(blob, 32)  # pixel size doubles: sigma 2 px, offset 3 px
    c2 = torch.arange(32, dtype=torch.float64) - 16
    expected = torch.exp(-(c2[:, None] ** 2 + (c2[None, :] - 3) ** 2) / (2 * 2.0**2))
    assert torch.allclose(small[0], expected, atol=2e-3)
    assert torch.allclose(fourier_resize(torch.full((1, 10, 10), 2.5), 6), torch.full((1, 6, 6), 2.5), atol=1e-6)
    # Band-limited images survive up- then down-sampling exactly.
    up = fourier_resize(small, 48)
    assert torch.allclose(fourier_resize(up, 32), small, atol=1e-6)


def test_fourier_resize_map_matches_2d_on_each_axis():
    d = 32
    c = torch.arange(d, dtype=torch.float64) - d // 2
    vol = torch.exp(-(c[:, None, None] ** 2 + c[None, :, None] ** 2 + (c[None, None, :] - 4) ** 2) / 18.0)
    out = fourier_resize_map(vol, 16)
    assert out.shape == (16, 16, 16)
    peak = np.unravel_index(int(out.argmax()), out.shape)
    assert peak == (8, 8, 10)
    assert float(out.max()) == pytest.approx(float(vol.max()), rel=0.05)


def test_output_geometry_carries_the_pixel_size():
    crop, size, px = output_geometry(184, 1.5, PreprocessConfig(crop_fraction=0.75, image_size=128))
    assert crop == 138 and size == 128 and px == pytest.approx(1.5 * 138 / 128)
    assert output_geometry(64, 2.0, PreprocessConfig()) == (64, 64, 2.0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="ctf_correction"):
        PreprocessConfig(ctf_correction="flip")
    with pytest.raises(ValueError, match="crop_fraction"):
        PreprocessConfig(crop_fraction=0)


def test_phase_flip_uses_the_right_axes():
    """Strongly astigmatic particles: flipping with the true CTF restores the projection; flipping
    with x and y swapped (angle mirrored) restores it clearly worse."""
    s, px = 64, 2.0
    vol = torch.from_numpy(pseudo_molecule(s, px, "C1", seed=3))
    n = 8
    rot = random_rotations(n, generator=torch.Generator().manual_seed(1))
    u, v = torch.full((n,), 22000.0), torch.full((n,), 12000.0)
    angle = torch.tensor([0.0, 5.0, 15.0, 25.0, 65.0, 75.0, 85.0, 90.0], dtype=torch.float64)  # far from 45°
    ctf = ctf_2d(u, v, angle, 300.0, 2.7, 0.1, px, s)
    clean = simulate_images(vol, rot, torch.zeros(n, 2), torch.ones(n, s, s // 2 + 1), torch.ones(n))
    observed = simulate_images(vol, rot, torch.zeros(n, 2), ctf, torch.ones(n))
    config = PreprocessConfig(normalise=False, ctf_correction="phase_flip")
    good = preprocess_images(observed, config, ctf)
    mirrored = preprocess_images(observed, config, ctf_2d(u, v, 90.0 - angle, 300.0, 2.7, 0.1, px, s))
    # Compare in Fourier amplitude-weighted sign agreement: correlation with |CTF|-weighted truth.
    target = preprocess_images(clean, PreprocessConfig(normalise=False, ctf_correction=None), None)
    target = torch.fft.irfft2(torch.fft.rfft2(target.double()) * ctf.abs(), s=(s, s))
    pcc_good = [pearson_correlation(a, b) for a, b in zip(good, target)]
    pcc_bad = [pearson_correlation(a, b) for a, b in zip(mirrored, target)]
    assert min(pcc_good) > 0.99
    assert max(pcc_bad) < min(pcc_good) - 0.1


def test_preprocess_order_and_shapes():
    g = torch.Generator().manual_seed(0)
    raw = 5 + 2 * torch.randn(3, 64, 64, generator=g)
    ctf = ctf_2d(torch.full((3,), 15000.0), torch.full((3,), 14000.0), 0.0, 300.0, 2.7, 0.1, 1.5, 64)
    out = preprocess_images(raw, PreprocessConfig(crop_fraction=0.5, image_size=16), ctf)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="CTF"):
        preprocess_images(raw, PreprocessConfig(), None)
    # Normalisation happens first: shifting and scaling the raw image changes nothing after it.
    a = preprocess_images(raw, PreprocessConfig(), ctf)
    b = preprocess_images(3 * raw + 11, PreprocessConfig(), ctf)
    assert torch.allclose(a, b, atol=1e-4)
