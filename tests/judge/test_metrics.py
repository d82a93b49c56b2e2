"""Metrics on cases whose answer is known."""

import json

import numpy as np
import pytest
import torch

from cryopose.geometry import random_rotations, rotation_about_axis
from cryopose.metrics import (
    angular_errors,
    compare_maps,
    fsc_curve,
    fsc_resolution,
    pearson_correlation,
    pose_error_summary,
    shift_errors,
)
from cryopose.symmetry import symmetry_matrices


def test_angular_error_of_a_known_rotation():
    gen = torch.Generator().manual_seed(0)
    truth = random_rotations(200, generator=gen).double()
    axes = torch.nn.functional.normalize(torch.randn(200, 3, generator=gen, dtype=torch.float64), dim=-1)
    angles = torch.linspace(0.5, 179.0, 200, dtype=torch.float64)
    pred = rotation_about_axis(axes, angles) @ truth
    assert torch.allclose(angular_errors(truth, pred), angles, atol=1e-6)
    # Right-multiplied perturbations have the same geodesic size.
    assert torch.allclose(angular_errors(truth, truth @ rotation_about_axis(axes, angles)), angles, atol=1e-6)


@pytest.mark.parametrize("group", ["C4", "D2", "O"])
def test_angular_error_ignores_symmetry_mates(group):
    gen = torch.Generator().manual_seed(1)
    truth = random_rotations(50, generator=gen).double()
    g = symmetry_matrices(group)
    mates = g[torch.arange(50) % g.shape[0]] @ truth
    assert angular_errors(truth, mates, group).max() < 1e-5
    # ... but only for that group: C1 sees the mates as far apart.
    assert angular_errors(truth, mates, "C1")[torch.arange(50) % g.shape[0] != 0].min() > 60
    small = rotation_about_axis(torch.tensor([0.3, 0.4, 0.5], dtype=torch.float64), 7.0)
    assert torch.allclose(
        angular_errors(truth, small @ mates, group), torch.full((50,), 7.0, dtype=torch.float64), atol=1e-5
    )


def test_angular_error_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        angular_errors(torch.eye(3).expand(4, 3, 3), torch.eye(3).expand(5, 3, 3))


def test_pose_error_summary_known_values():
    s = pose_error_summary([1.0, 2.0, 3.0, 40.0], confidence=[1.0, 1.0, 1.0, 0.0])
    assert s["MAnE"] == pytest.approx(11.5)
    assert s["wMAnE"] == pytest.approx(2.0)
    assert s["median_angular_error"] == pytest.approx(2.5)
    assert s["acc_5deg"] == pytest.approx(0.75) and s["acc_30deg"] == pytest.approx(0.75)
    assert s["acc_10deg"] == pytest.approx(0.75) and s["n"] == 4
    assert pose_error_summary([10.0, 30.0])["wMAnE"] == pytest.approx(20.0)
    assert all(type(v) is float for v in s.values())
    json.dumps(s)


@pytest.mark.parametrize("conf", [[0.0, 0.0], [1.0, -1.0], [1.0, float("nan")], [1.0]])
def test_pose_error_summary_rejects_bad_confidence(conf):
    with pytest.raises(ValueError):
        pose_error_summary([1.0, 2.0], confidence=conf)


def test_shift_errors():
    d = shift_errors([[0.0, 0.0], [1.0, 1.0]], [[3.0, 4.0], [1.0, 1.0]])
    assert d.tolist() == pytest.approx([5.0, 0.0])


def test_pearson_correlation_linear_and_masked():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 16, 16)).astype(np.float32)
    assert pearson_correlation(x, 2 * x + 3) == pytest.approx(1.0, abs=1e-9)
    assert pearson_correlation(x, -x) == pytest.approx(-1.0, abs=1e-9)
    y = x.copy()
    y[8:] = rng.normal(size=(8, 16, 16))  # agree only in the first half of the box
    mask = np.zeros_like(x)
    mask[:8] = 1
    assert pearson_correlation(x, y, mask=mask) == pytest.approx(1.0, abs=1e-9)
    assert pearson_correlation(x, y) == pytest.approx(0.5, abs=0.08)
    np.testing.assert_allclose(pearson_correlation(x, y), np.corrcoef(x.ravel(), y.ravel())[0, 1], atol=1e-9)


def _reference_fsc(a, b):
    """Textbook FSC over the full complex FFT: the slow, obvious version."""
    d = a.shape[0]
    fa, fb = np.fft.fftn(a.astype(np.float64)), np.fft.fftn(b.astype(np.float64))
    k = np.fft.fftfreq(d) * d
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shell = np.round(r).astype(int)
    out = []
    for s in range(d // 2 + 1):
        sel = shell == s
        num = np.sum(fa[sel] * np.conj(fb[sel])).real
        out.append(num / np.sqrt(np.sum(np.abs(fa[sel]) ** 2) * np.sum(np.abs(fb[sel]) ** 2)))
    return np.array(out)


@pytest.mark.parametrize("d", [24, 25])
def test_fsc_curve_equals_the_full_fourier_space_definition(d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(d, d, d)).astype(np.float32)
    b = (a + rng.normal(size=(d, d, d))).astype(np.float32)
    freqs, fsc = fsc_curve(a, b, pixel_size=1.7)
    np.testing.assert_allclose(fsc, _reference_fsc(a, b), atol=1e-5)
    np.testing.assert_allclose(freqs, np.arange(d // 2 + 1) / (d * 1.7))
    _, same = fsc_curve(a, a, 1.0)
    np.testing.assert_allclose(same, 1.0, atol=1e-6)


def test_fsc_curve_sees_where_two_maps_stop_agreeing():
    """Two maps sharing their Fourier content below shell 8 and independent above it."""
    d = 32
    rng = np.random.default_rng(3)
    k = np.fft.fftfreq(d) * d
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    common = np.fft.fftn(rng.normal(size=(d,) * 3))
    own = [np.fft.fftn(rng.normal(size=(d,) * 3)) for _ in range(2)]
    maps = [np.fft.ifftn(np.where(r < 7.5, common, o)).real for o in own]
    freqs, fsc = fsc_curve(*maps, pixel_size=2.0)
    assert fsc[1:8].min() > 0.999 and np.abs(fsc[9:]).max() < 0.15
    res = fsc_resolution(freqs, fsc, 0.5)
    assert 1 / freqs[8] < res < 1 / freqs[7]


def test_fsc_resolution_interpolates_in_frequency():
    freqs = np.arange(33) / (64 * 1.5)  # a 64-voxel box at 1.5 Å
    fsc = 1 - freqs / freqs[-1]  # linear in frequency: the crossing is exact
    for t in (0.143, 0.5):
        assert fsc_resolution(freqs, fsc, t) == pytest.approx(1 / ((1 - t) * freqs[-1]))


def test_fsc_resolution_edge_cases():
    freqs = np.arange(17) / (32 * 4.0)  # shells at 128, 64, 42.7, 32, 25.6 ... 8 Å
    # No crossing: Nyquist, never another shell.
    assert fsc_resolution(freqs, np.ones(17), 0.143) == pytest.approx(8.0)
    # Below the threshold from shell 1 on (CESPED's evaluator wraps this to the last shell, i.e.
    # Nyquist): the coarsest measurable resolution, the box size.
    low = np.r_[1.0, np.full(16, 0.05)]
    assert fsc_resolution(freqs, low, 0.143) == pytest.approx(128.0)
    # A dip at low frequency that recovers inside the low-frequency region is not the crossing.
    dip = np.r_[1.0, 0.95, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    res = fsc_resolution(freqs, dip, 0.5)
    assert 1 / freqs[8] < res < 1 / freqs[7]
    # The same dip counts when the low-frequency region is made smaller than it.
    assert fsc_resolution(freqs, dip, 0.5, low_resolution_angstrom=100.0) > 1 / freqs[2]
    # A value exactly at the threshold is not below it.
    assert fsc_resolution(freqs, np.r_[1.0, np.full(16, 0.5)], 0.5) == pytest.approx(8.0)


def test_fsc_resolution_rejects_bad_curves():
    with pytest.raises(ValueError):
        fsc_resolution(np.arange(5.0), np.ones(4), 0.5)
    with pytest.raises(ValueError):
        fsc_resolution(np.arange(5.0), np.r_[1, 1, np.inf, 1, 1], 0.5)
    # NaN is an undefined shell (0/0), not bad input: the resolution is undefined, not a number.
    assert np.isnan(fsc_resolution(np.arange(5.0), np.r_[1, 1, np.nan, 1, 1], 0.5))


def test_compare_maps_masked_and_unmasked():
    d = 32
    rng = np.random.default_rng(5)
    x = rng.normal(size=(d, d, d)).astype(np.float32)
    y = x.copy()
    y[:, :, 20:] = rng.normal(size=(d, d, 12))
    mask = np.zeros_like(x)
    mask[:, :, :16] = 1
    cmp = compare_maps(x, y, 1.5, mask=mask)
    assert cmp.masked_pcc == pytest.approx(1.0, abs=1e-9) and cmp.pcc < 0.8
    assert cmp.masked_resolution[0.143] == pytest.approx(3.0) and cmp.masked_fsc.min() > 0.999
    flat = cmp.as_dict("(GT,V)")
    assert set(flat) == {
        "PCC(GT,V)",
        "FSCR0.143(GT,V)",
        "FSCR0.5(GT,V)",
        "masked_PCC(GT,V)",
        "masked_FSCR0.143(GT,V)",
        "masked_FSCR0.5(GT,V)",
    }
    assert all(type(v) is float for v in flat.values())
    json.dumps(flat)
    with pytest.raises(ValueError, match="mask shape"):
        compare_maps(x, y, 1.5, mask=np.ones((d, d, d - 1)))
    with pytest.raises(ValueError, match="cubic"):
        compare_maps(x, y[:-1], 1.5)


def test_compare_maps_pcc_equals_the_real_space_pcc():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(20, 20, 20)).astype(np.float32) + 3.0
    y = (0.6 * x + rng.normal(size=x.shape)).astype(np.float32)
    mask = np.clip(rng.uniform(-0.5, 1.5, size=x.shape), 0, 1).astype(np.float32)
    cmp = compare_maps(x, y, 1.0, mask=mask)
    assert cmp.pcc == pytest.approx(pearson_correlation(x, y), abs=1e-6)
    assert cmp.masked_pcc == pytest.approx(pearson_correlation(x, y, mask=mask), abs=1e-6)
    np.testing.assert_allclose(cmp.masked_pcc, np.corrcoef((x * mask).ravel(), (y * mask).ravel())[0, 1], atol=1e-6)


@pytest.mark.parametrize("d", [24, 25])
def test_compare_maps_is_exactly_symmetric(d):
    """(A, B) and (B, A) give the same numbers bit for bit: the cross-half agreement's reference,
    (GT_h, GT_1-h) for either h, is then (GT0,GT1) exactly, and the true poses score Δ = 0 exactly."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(d,) * 3).astype(np.float32)
    y = (0.7 * x + rng.normal(size=x.shape)).astype(np.float32)
    mask = np.clip(rng.uniform(-0.5, 1.5, size=x.shape), 0, 1).astype(np.float32)
    ab = compare_maps(x, y, 1.3, mask=mask).as_dict()
    ba = compare_maps(y, x, 1.3, mask=mask).as_dict()
    assert ab == ba and all(np.isfinite(v) for v in ab.values())
