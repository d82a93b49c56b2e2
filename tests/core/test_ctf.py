"""The RELION 3.1 CTF: against relion_project, analytic values, filters, STAR-column errors."""

import math
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryopose.ctf import apply_ctf, ctf_2d, ctf_from_star_columns, electron_wavelength, phase_flip, wiener_filter
from cryopose.errors import InputError

PX, S = 1.3, 64
KV, CS, W = 300.0, 2.7, 0.1


def _gamma(defocus, k, kv=KV, cs=CS, w=W):
    lam = float(electron_wavelength(kv))
    return -math.pi * lam * defocus * k**2 + 0.5 * math.pi * cs * 1e7 * lam**3 * k**4 - math.asin(w)


# ---------------------------------------------------------------------------------------------
# Against RELION 3.1.3: relion_project --ctf divided by relion_project is RELION's CTF.


def _anisotropic_gaussians(d, rng):
    """An asymmetric map: a dozen randomly oriented anisotropic Gaussians, some narrow (high-k power)."""
    grid = np.stack(np.meshgrid(*(np.arange(d) - d // 2,) * 3, indexing="ij"), -1).astype(np.float64)
    vol = np.zeros((d, d, d))
    for _ in range(12):
        centre = rng.uniform(-14, 14, 3)
        sigmas = rng.uniform(0.8, 3.0, 3)
        axes = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        local = (grid - centre) @ axes
        vol += rng.uniform(0.5, 1.5) * np.exp(-0.5 * ((local / sigmas) ** 2).sum(-1))
    return vol.astype(np.float32)


# Strongly astigmatic, varied angles, V > U in two rows; phase shift and B-factor on some.
RELION_PARTICLES = pd.DataFrame(
    {
        "rlnDefocusU": [21000.0, 9000.0, 16000.0, 26000.0, 12000.0],
        "rlnDefocusV": [12000.0, 17000.0, 11000.0, 15000.0, 20000.0],
        "rlnDefocusAngle": [0.0, 35.0, 70.0, 120.0, 160.0],
        "rlnPhaseShift": [0.0, 0.0, 30.0, 0.0, 90.0],
        "rlnCtfBfactor": [0.0, 0.0, 0.0, 80.0, 20.0],
    }
)


def _relion_tables(rng, pixel_size=PX):
    n = len(RELION_PARTICLES)
    particles = RELION_PARTICLES.assign(
        rlnImageName=[f"{i + 1:06d}@unused.mrcs" for i in range(n)],
        rlnAngleRot=rng.uniform(-180, 180, n),
        rlnAngleTilt=rng.uniform(0, 180, n),
        rlnAnglePsi=rng.uniform(-180, 180, n),
        rlnOriginXAngst=0.0,
        rlnOriginYAngst=0.0,
        rlnOpticsGroup=1,
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [pixel_size],
            "rlnImageSize": [S],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [KV],
            "rlnSphericalAberration": [CS],
            "rlnAmplitudeContrast": [W],
        }
    )
    return optics, particles


def _relion_project(cwd, vol, star, root, *extra):
    """Spectra (rfft2) of relion_project's images. It exits 0 even on a bad option: check the output."""
    cmd = ["relion_project", "--i", vol, "--o", root, "--ang", star, *extra]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    out = cwd / f"{root}.mrcs"
    assert proc.returncode == 0 and out.exists(), f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    images = mrcfile.read(out).astype(np.float64)
    assert images.shape == (len(RELION_PARTICLES), S, S)
    return images


def _strong(plain_ft):
    """Coefficients where the plain projection has power, so the ratio is well defined."""
    return np.abs(plain_ft) > 0.05 * np.abs(plain_ft).max()


needs_relion_project = pytest.mark.skipif(
    shutil.which("relion_project") is None, reason="relion_project not on PATH (apt-get install relion)"
)


@pytest.mark.relion
@needs_relion_project
def test_ctf_matches_relion_project_and_a_mirrored_astigmatism_does_not(tmp_path):
    rng = np.random.default_rng(3)
    with mrcfile.new(tmp_path / "vol.mrc") as m:
        m.set_data(_anisotropic_gaussians(S, rng))
        m.voxel_size = PX
    optics, particles = _relion_tables(rng)
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "particles.star")
    # No --angpix: the CTF's pixel size comes from the STAR file (see the next test).
    plain_img = _relion_project(tmp_path, "vol.mrc", "particles.star", "plain")
    ctf_img = _relion_project(tmp_path, "vol.mrc", "particles.star", "withctf", "--ctf")
    plain, withctf = np.fft.rfft2(plain_img), np.fft.rfft2(ctf_img)

    merged = particles.merge(optics, on="rlnOpticsGroup")
    ours = ctf_from_star_columns(merged, S).numpy()
    assert ours.shape == (len(particles), S, S // 2 + 1)
    # theta = atan2(kx, ky) instead of atan2(ky, kx) (rows called x: the ij-meshgrid bug) is the
    # same as measuring the angle from the other axis: angle -> 90 - angle.
    mirrored = ctf_from_star_columns(merged.assign(rlnDefocusAngle=90.0 - merged["rlnDefocusAngle"]), S).numpy()
    other_px = ctf_from_star_columns(merged, S, pixel_size=1.5).numpy()
    no_extras = ctf_from_star_columns(merged.drop(columns=["rlnPhaseShift", "rlnCtfBfactor"]), S).numpy()

    for i in range(len(particles)):
        strong = _strong(plain[i])
        assert strong.sum() > 80
        ratio = withctf[i][strong] / plain[i][strong]
        # A real multiplicative filter: CTF·projection, not phase-flipped (|CTF|) and not CTF².
        assert np.abs(ratio.imag).max() < 1e-5
        relion_ctf = ratio.real
        mine = ours[i][strong]
        assert np.corrcoef(relion_ctf, mine)[0, 1] > 0.99
        assert (np.sign(relion_ctf) == np.sign(mine)).mean() > 0.99
        assert np.abs(relion_ctf - mine).max() < 1e-5  # float32 output rounding only
        assert np.abs(relion_ctf - np.abs(mine)).max() > 0.5
        assert np.abs(relion_ctf - mine**2).max() > 0.5
        # The tests can fail: a mirrored astigmatism, another pixel size clearly disagree.
        assert np.corrcoef(relion_ctf, mirrored[i][strong])[0, 1] < 0.9
        assert (np.sign(relion_ctf) == np.sign(mirrored[i][strong])).mean() < 0.9
        assert np.corrcoef(relion_ctf, other_px[i][strong])[0, 1] < 0.9
        if particles["rlnPhaseShift"][i] or particles["rlnCtfBfactor"][i]:
            assert np.abs(relion_ctf - no_extras[i][strong]).max() > 0.05

    # apply_ctf reproduces RELION's CTF-affected images in real space (box centre S//2).
    applied = apply_ctf(torch.from_numpy(plain_img), torch.from_numpy(ours)).numpy()
    np.testing.assert_allclose(applied, ctf_img, atol=1e-5 * np.abs(ctf_img).max())


@pytest.mark.relion
@needs_relion_project
def test_relion_project_ctf_uses_the_star_pixel_size_not_the_map_header(tmp_path):
    rng = np.random.default_rng(4)
    with mrcfile.new(tmp_path / "vol.mrc") as m:
        m.set_data(_anisotropic_gaussians(S, rng))
        m.voxel_size = 1.0  # deliberately not the STAR's 1.3 Å
    optics, particles = _relion_tables(rng, pixel_size=PX)
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "particles.star")
    plain = np.fft.rfft2(_relion_project(tmp_path, "vol.mrc", "particles.star", "plain"))
    withctf = np.fft.rfft2(_relion_project(tmp_path, "vol.mrc", "particles.star", "withctf", "--ctf"))
    merged = particles.merge(optics, on="rlnOpticsGroup")
    at_star, at_header = (ctf_from_star_columns(merged, S, pixel_size=p).numpy() for p in (PX, 1.0))
    for i in range(len(particles)):
        strong = _strong(plain[i])
        relion_ctf = (withctf[i][strong] / plain[i][strong]).real
        assert np.abs(relion_ctf - at_star[i][strong]).max() < 1e-5
        assert np.corrcoef(relion_ctf, at_header[i][strong])[0, 1] < 0.9


# ---------------------------------------------------------------------------------------------
# Analytic checks.


def test_wavelength_300kv_and_200kv():
    assert float(electron_wavelength(300.0)) == pytest.approx(0.019687, rel=1e-4)
    assert float(electron_wavelength(200.0)) == pytest.approx(0.025079, rel=1e-4)


@pytest.mark.parametrize("w", [0.0, 0.07, 0.1, 0.3])
def test_value_at_k0_is_the_amplitude_contrast(w):
    c = ctf_2d(15000.0, 9000.0, 30.0, KV, CS, w, PX, S)
    expected = -math.sin(-math.atan(w / math.sqrt(1 - w**2)))
    assert expected == pytest.approx(w, abs=1e-12)
    assert float(c[0, 0]) == pytest.approx(expected, abs=1e-12)
    # Underfocus: the first lobe rises from w towards +1 (RELION's sign, CTF = -sin γ).
    assert float(c[0, 1]) > w


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_isotropic_ctf_vanishes_where_gamma_is_a_multiple_of_pi(n):
    defocus = 20000.0
    lam = float(electron_wavelength(KV))
    # γ = -nπ is a quadratic in k²: a k⁴ + b k² + c = 0, the smaller root is the n-th zero.
    a, b, c = 0.5 * math.pi * CS * 1e7 * lam**3, -math.pi * lam * defocus, n * math.pi - math.asin(W)
    k_n = math.sqrt((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a))
    assert _gamma(defocus, k_n) == pytest.approx(-n * math.pi)
    col = 10
    px = col / (S * k_n)  # puts k_n on column `col`
    ctf = ctf_2d(defocus, defocus, 0.0, KV, CS, W, px, S)
    assert abs(float(ctf[0, col])) < 1e-9
    assert abs(float(ctf[col, 0])) < 1e-9  # isotropic: the same zero along ky
    # A sign change across the zero (slightly lower and higher k).
    lo = ctf_2d(defocus, defocus, 0.0, KV, CS, W, px * 1.02, S)[0, col]
    hi = ctf_2d(defocus, defocus, 0.0, KV, CS, W, px / 1.02, S)[0, col]
    assert float(lo) * float(hi) < 0


def test_full_grid_equals_minus_sine_of_gamma():
    u = 18000.0
    k = torch.sqrt(
        torch.fft.fftfreq(S, d=PX, dtype=torch.float64)[:, None] ** 2
        + torch.fft.fftfreq(S, d=PX, dtype=torch.float64)[None, :] ** 2
    )
    expected = -torch.sin(torch.tensor(_gamma(u, k.numpy())))
    np.testing.assert_allclose(ctf_2d(u, u, 0.0, KV, CS, W, PX, S, rfft=False).numpy(), expected.numpy(), atol=1e-12)


def test_astigmatism_direction_follows_the_x_axis():
    # U lies along rlnDefocusAngle measured from the x (column) axis.
    k = 10 / (S * PX)
    c = ctf_2d(25000.0, 10000.0, 0.0, KV, CS, W, PX, S, rfft=False)
    assert float(c[0, 10]) == pytest.approx(-math.sin(_gamma(25000.0, k)), abs=1e-9)  # along kx: U
    assert float(c[10, 0]) == pytest.approx(-math.sin(_gamma(10000.0, k)), abs=1e-9)  # along ky: V
    c90 = ctf_2d(25000.0, 10000.0, 90.0, KV, CS, W, PX, S, rfft=False)
    assert float(c90[10, 0]) == pytest.approx(-math.sin(_gamma(25000.0, k)), abs=1e-9)
    # An oblique angle, measured from +x towards +y: U along (kx, ky) ∝ (2, 1), V along (-1, 2).
    # The mirrored convention (θ = atan2(kx, ky)) would put U along (1, 2).
    angle = math.degrees(math.atan2(1, 2))
    c = ctf_2d(25000.0, 10000.0, angle, KV, CS, W, PX, S, rfft=False)
    k = math.hypot(8, 4) / (S * PX)
    assert float(c[4, 8]) == pytest.approx(-math.sin(_gamma(25000.0, k)), abs=1e-9)  # row = ky, col = kx
    assert float(c[8, -4]) == pytest.approx(-math.sin(_gamma(10000.0, k)), abs=1e-9)
    assert abs(float(c[8, 4]) - (-math.sin(_gamma(25000.0, k)))) > 0.1


def test_v_larger_than_u_is_finite_and_equals_swapped_plus_90():
    a = ctf_2d(
        torch.tensor([12000.0, 8000.0]), torch.tensor([18000.0, 20000.0]), torch.tensor([30.0, 160.0]), KV, CS, W, PX, S
    )
    b = ctf_2d(
        torch.tensor([18000.0, 20000.0]),
        torch.tensor([12000.0, 8000.0]),
        torch.tensor([120.0, 250.0]),
        KV,
        CS,
        W,
        PX,
        S,
    )
    assert torch.isfinite(a).all()
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-10)
    # ... and not the same as ignoring the swap.
    c = ctf_2d(
        torch.tensor([18000.0, 20000.0]), torch.tensor([12000.0, 8000.0]), torch.tensor([30.0, 160.0]), KV, CS, W, PX, S
    )
    assert (a - c).abs().max() > 0.5


def test_batch_shapes_broadcast_and_match_single_particles():
    u = torch.tensor([[10000.0], [20000.0]])  # (2, 1)
    angle = torch.tensor([0.0, 45.0, 90.0])  # (3,)
    c = ctf_2d(u, u - 3000, angle, KV, CS, W, PX, S, phase_shift=torch.tensor([0.0, 10.0, 20.0]))
    assert c.shape == (2, 3, S, S // 2 + 1) and c.dtype == torch.float64
    one = ctf_2d(20000.0, 17000.0, 90.0, KV, CS, W, PX, S, phase_shift=20.0)
    assert one.shape == (S, S // 2 + 1)
    np.testing.assert_allclose(c[1, 2].numpy(), one.numpy(), atol=1e-14)
    assert ctf_2d(u, u, 0.0, KV, CS, W, PX, S, rfft=False).shape == (2, 1, S, S)


def test_layouts_rfft_full_and_fftshift():
    u, v, a = 15000.0, 11000.0, 25.0
    half = ctf_2d(u, v, a, KV, CS, W, PX, S)
    full = ctf_2d(u, v, a, KV, CS, W, PX, S, rfft=False)
    # Columns below Nyquist agree (at Nyquist fftfreq says -1/2, rfftfreq +1/2).
    np.testing.assert_allclose(full[:, : S // 2].numpy(), half[:, : S // 2].numpy(), atol=1e-14)
    # Point symmetry CTF(k) = CTF(-k) ties the Nyquist column to the full grid (but for the
    # corner, where k_y = -1/2 on both grids).
    rows = torch.tensor([r for r in range(S) if r != S // 2])
    np.testing.assert_allclose(half[rows, S // 2].numpy(), full[(-rows) % S, S // 2].numpy(), atol=1e-14)
    shifted = ctf_2d(u, v, a, KV, CS, W, PX, S, rfft=False, fftshift=True)
    np.testing.assert_allclose(shifted.numpy(), torch.fft.fftshift(full).numpy())
    assert float(shifted[S // 2, S // 2]) == pytest.approx(W)
    half_shifted = ctf_2d(u, v, a, KV, CS, W, PX, S, fftshift=True)
    assert float(half_shifted[S // 2, 0]) == pytest.approx(W)


def test_bfactor_envelope():
    plain = ctf_2d(15000.0, 15000.0, 0.0, KV, CS, W, PX, S)
    damped = ctf_2d(15000.0, 15000.0, 0.0, KV, CS, W, PX, S, bfactor=100.0)
    k2 = (10 / (S * PX)) ** 2
    assert float(damped[0, 10] / plain[0, 10]) == pytest.approx(math.exp(-100 * k2 / 4), rel=1e-9)


def test_bad_scalar_arguments():
    with pytest.raises(ValueError, match="pixel_size"):
        ctf_2d(1e4, 1e4, 0.0, KV, CS, W, 0.0, S)
    with pytest.raises(ValueError, match="image_size"):
        ctf_2d(1e4, 1e4, 0.0, KV, CS, W, PX, 0)


# ---------------------------------------------------------------------------------------------
# Filters.


def test_apply_ctf_multiplies_the_spectrum_and_keeps_dtype():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, S, S, generator=g, dtype=torch.float64)
    c = ctf_2d(torch.full((3,), 15000.0), torch.full((3,), 15000.0), 0.0, KV, CS, W, PX, S)
    out = apply_ctf(images, c)
    np.testing.assert_allclose(torch.fft.rfft2(out).numpy(), (torch.fft.rfft2(images) * c).numpy(), atol=1e-9)
    np.testing.assert_allclose(apply_ctf(images, torch.ones_like(c)).numpy(), images.numpy(), atol=1e-12)
    out32 = apply_ctf(images.float(), c)
    assert out32.shape == images.shape and out32.dtype == torch.float32
    # One CTF broadcasts over a batch.
    np.testing.assert_allclose(apply_ctf(images, c[0]).numpy(), out.numpy(), atol=1e-12)


def test_phase_flip_twice_is_identity_and_wiener_keeps_the_flip_direction():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, S, S, generator=g, dtype=torch.float64)
    # Isotropic: an astigmatic CTF is not mirror-symmetric along the Nyquist column, where the
    # real-FFT layout stores one coefficient for two frequencies, so no filter is exactly invertible there.
    c = ctf_2d(
        torch.tensor([9000.0, 12000.0, 15000.0, 25000.0]),
        torch.tensor([9000.0, 12000.0, 15000.0, 25000.0]),
        10.0,
        KV,
        CS,
        W,
        PX,
        S,
    )
    flipped = phase_flip(images, c)
    assert (flipped - images).abs().max() > 0.1  # it did something
    np.testing.assert_allclose(phase_flip(flipped, c).numpy(), images.numpy(), atol=1e-10)
    # Phase flipping makes the CTF-affected spectrum non-negative times the original.
    ratio = torch.fft.rfft2(phase_flip(apply_ctf(images, c), c)) / torch.fft.rfft2(images)
    assert (ratio.real > -1e-9).all() and ratio.imag.abs().max() < 1e-9
    # Wiener = CTF/(CTF²+c) has the sign of the CTF in every coefficient: the same direction as phase flipping.
    ft_w = torch.fft.rfft2(wiener_filter(images, c, 0.1))
    ft_f = torch.fft.rfft2(flipped)
    assert ((ft_w * ft_f.conj()).real >= -1e-9).all()
    # Large constant: proportional to the CTF; tiny constant: close to 1/CTF where |CTF| is not small.
    np.testing.assert_allclose((1e6 * wiener_filter(images, c, 1e6)).numpy(), apply_ctf(images, c).numpy(), atol=1e-5)
    restored = torch.fft.rfft2(wiener_filter(apply_ctf(images, c), c, 1e-8))
    good = c.abs() > 0.3
    np.testing.assert_allclose(restored[good].numpy(), torch.fft.rfft2(images)[good].numpy(), atol=1e-5)
    with pytest.raises(ValueError):
        wiener_filter(images, c, 0.0)


# ---------------------------------------------------------------------------------------------
# STAR columns.


def _particles(n=3):
    return pd.DataFrame(
        {
            "rlnDefocusU": [15000.0, 9000.0, 21000.0][:n],
            "rlnDefocusV": [14000.0, 12000.0, 20000.0][:n],
            "rlnDefocusAngle": [10.0, 80.0, 150.0][:n],
            "rlnVoltage": [KV] * n,
            "rlnSphericalAberration": [CS] * n,
            "rlnAmplitudeContrast": [W] * n,
            "rlnImagePixelSize": [PX] * n,
        }
    )


def test_ctf_from_star_columns_equals_ctf_2d_with_optional_columns():
    df = _particles().assign(rlnPhaseShift=[0.0, 20.0, 40.0], rlnCtfBfactor=[0.0, 50.0, 100.0])
    expected = ctf_2d(
        torch.tensor(df.rlnDefocusU.values),
        torch.tensor(df.rlnDefocusV.values),
        torch.tensor(df.rlnDefocusAngle.values),
        KV,
        CS,
        W,
        PX,
        S,
        phase_shift=torch.tensor(df.rlnPhaseShift.values),
        bfactor=torch.tensor(df.rlnCtfBfactor.values),
    )
    np.testing.assert_allclose(ctf_from_star_columns(df, S).numpy(), expected.numpy(), atol=1e-14)
    no_b = ctf_from_star_columns(df, S, use_bfactor=False)
    assert (no_b - expected).abs().max() > 0.01
    assert ctf_from_star_columns(_particles(), S, rfft=False).shape == (3, S, S)


@pytest.mark.parametrize(
    "column",
    [
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
    ],
)
def test_missing_column_raises_input_error_naming_it(column):
    with pytest.raises(InputError, match=column) as info:
        ctf_from_star_columns(_particles().drop(columns=column), S, source="p.star")
    assert info.value.where == column and str(info.value.path) == "p.star"


def test_bad_values_raise_input_errors_naming_row_and_column():
    df = _particles()
    df.loc[2, "rlnDefocusAngle"] = np.nan
    with pytest.raises(InputError, match=r"row 2 .*rlnDefocusAngle"):
        ctf_from_star_columns(df, S)
    df = _particles().assign(rlnPhaseShift=[0.0, np.inf, 0.0])
    with pytest.raises(InputError, match=r"row 1 .*rlnPhaseShift"):
        ctf_from_star_columns(df, S)
    df = _particles()
    df.loc[0, "rlnAmplitudeContrast"] = 1.0
    with pytest.raises(InputError, match=r"row 0 .*rlnAmplitudeContrast"):
        ctf_from_star_columns(df, S)
    df = _particles()
    df.loc[1, "rlnImagePixelSize"] = 2.0
    with pytest.raises(InputError, match="several pixel sizes"):
        ctf_from_star_columns(df, S)
    assert ctf_from_star_columns(df, S, pixel_size=PX).shape == (3, S, S // 2 + 1)


# ---------------------------------------------------------------------------------------------
# An independent implementation.


def test_agrees_with_teamtomo_torch_ctf():
    """teamtomo's torch-ctf (float32) gives the same CTF (defocus in µm, astigmatism (U-V)/2)."""
    torch_ctf = pytest.importorskip("torch_ctf")
    u = torch.tensor([20000.0, 15000.0, 8000.0])
    v = torch.tensor([12000.0, 9000.0, 7000.0])
    angle = torch.tensor([0.0, 35.0, 160.0])
    ours = ctf_2d(u, v, angle, KV, CS, W, PX, S, phase_shift=20.0)
    theirs = torch_ctf.calculate_ctf_2d(
        defocus=(u + v) / 2e4,
        astigmatism=(u - v) / 2e4,
        astigmatism_angle=angle,
        voltage=KV,
        spherical_aberration=CS,
        amplitude_contrast=W,
        phase_shift=20.0,
        pixel_size=PX,
        image_shape=(S, S),
        rfft=True,
        fftshift=False,
    )
    assert (theirs.double() - ours)[..., : S // 2].abs().max() < 5e-3
