import math
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryopose.ctf import (apply_ctf, ctf_2d, ctf_from_star_columns, electron_wavelength, phase_flip,
                          wiener_filter)
from cryopose.errors import InputError

PX, S = 1.3, 64


def test_wavelength_300kv():
    assert float(electron_wavelength(300.0)) == pytest.approx(0.019687, rel=1e-4)


def test_dc_value_is_the_amplitude_contrast():
    w = 0.1
    c = ctf_2d(15000.0, 15000.0, 0.0, 300.0, 2.7, w, PX, S)
    # γ(0) = −atan(w/√(1−w²)) = −asin(w), so CTF(0) = −sin γ = w.
    assert float(c[0, 0]) == pytest.approx(w, abs=1e-12)


def test_isotropic_zeros_where_gamma_is_a_multiple_of_pi():
    u, cs, w, kv = 20000.0, 2.7, 0.07, 300.0
    lam = float(electron_wavelength(kv))
    k = torch.fft.rfftfreq(1024, d=0.5, dtype=torch.float64)
    c = ctf_2d(u, u, 0.0, kv, cs, w, 0.5, 1024)[0]
    gamma = -math.pi * lam * u * k ** 2 + 0.5 * math.pi * cs * 1e7 * lam ** 3 * k ** 4 - math.asin(w)
    np.testing.assert_allclose(c.numpy(), (-torch.sin(gamma)).numpy(), atol=1e-12)
    # The first zero: −πλuk² − asin(w) = −π.
    k0 = math.sqrt((math.pi - math.asin(w)) / (math.pi * lam * u))
    near = float(ctf_2d(u, u, 0.0, kv, 0.0, w, 1.0, 2)[0, 0])  # DC only; check the root directly below
    assert near == pytest.approx(w)
    single = ctf_2d(u, u, 0.0, kv, 0.0, w, 1 / (k0 * 4), 4)  # pixel size puts k0 at column 1
    assert abs(float(single[0, 1])) < 1e-9


def test_astigmatism_direction_follows_the_x_axis():
    # U (the larger defocus) lies along the angle from the x (column) axis: at angle 0 the rings
    # are denser along kx than along ky.
    c = ctf_2d(25000.0, 10000.0, 0.0, 300.0, 2.7, 0.1, PX, S, rfft=False)
    lam = float(electron_wavelength(300.0))
    k = 10 / (S * PX)
    gamma = lambda df: -math.pi * lam * df * k ** 2 + 0.5 * math.pi * 2.7e7 * lam ** 3 * k ** 4 - math.asin(0.1)
    assert float(c[0, 10]) == pytest.approx(-math.sin(gamma(25000.0)), abs=1e-9)  # along kx: U
    assert float(c[10, 0]) == pytest.approx(-math.sin(gamma(10000.0)), abs=1e-9)  # along ky: V
    c90 = ctf_2d(25000.0, 10000.0, 90.0, 300.0, 2.7, 0.1, PX, S, rfft=False)
    assert float(c90[10, 0]) == pytest.approx(-math.sin(gamma(25000.0)), abs=1e-9)


def test_v_larger_than_u_equals_swapped_plus_90():
    a = ctf_2d(12000.0, 18000.0, 30.0, 300.0, 2.7, 0.1, PX, S)
    b = ctf_2d(18000.0, 12000.0, 120.0, 300.0, 2.7, 0.1, PX, S)
    assert torch.isfinite(a).all()
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-10)


def test_batch_broadcast_layouts_and_envelope():
    u = torch.tensor([10000.0, 20000.0, 30000.0])
    c = ctf_2d(u, u - 500, torch.tensor([0.0, 45.0, 90.0]), 300.0, 2.7, 0.1, PX, S)
    assert c.shape == (3, S, S // 2 + 1)
    full = ctf_2d(u, u - 500, torch.tensor([0.0, 45.0, 90.0]), 300.0, 2.7, 0.1, PX, S, rfft=False)
    # Columns below Nyquist agree (at Nyquist fftfreq says -1/2, rfftfreq +1/2).
    np.testing.assert_allclose(full[..., : S // 2].numpy(), c[..., : S // 2].numpy(), atol=1e-12)
    shifted = ctf_2d(u, u - 500, 0.0, 300.0, 2.7, 0.1, PX, S, rfft=False, fftshift=True)
    assert float(shifted[0, S // 2, S // 2]) == pytest.approx(0.1)
    env = ctf_2d(u, u, 0.0, 300.0, 2.7, 0.1, PX, S, bfactor=100.0) / ctf_2d(u, u, 0.0, 300.0, 2.7, 0.1, PX, S)
    k2 = (10 / (S * PX)) ** 2
    assert float(env[0, 0, 10]) == pytest.approx(math.exp(-100 * k2 / 4), rel=1e-9)


def test_phase_flip_twice_is_identity_and_wiener_keeps_the_sign():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, S, S, generator=g, dtype=torch.float64)
    # Isotropic: an astigmatic CTF is not mirror-symmetric along the Nyquist column, where the
    # real-FFT layout stores one coefficient for two frequencies, so no filter is exactly invertible there.
    c = ctf_2d(torch.full((4,), 15000.0), torch.full((4,), 15000.0), 10.0, 300.0, 2.7, 0.1, PX, S)
    np.testing.assert_allclose(phase_flip(phase_flip(images, c), c).numpy(), images.numpy(), atol=1e-10)
    # Wiener = CTF/(CTF²+c): the same sign as the CTF in every coefficient, so its product with the
    # phase-flipped image spectrum is non-negative.
    ft_w = torch.fft.rfft2(wiener_filter(images, c, 0.1))
    ft_f = torch.fft.rfft2(phase_flip(images, c))
    assert ((ft_w * ft_f.conj()).real >= -1e-9).all()
    with pytest.raises(ValueError):
        wiener_filter(images, c, 0.0)


def test_apply_ctf_keeps_dtype_and_shape():
    images = torch.randn(2, S, S)
    c = ctf_2d(torch.full((2,), 15000.0), torch.full((2,), 15000.0), 0.0, 300.0, 2.7, 0.1, PX, S)
    out = apply_ctf(images, c)
    assert out.shape == images.shape and out.dtype == torch.float32


def _particles(n=3):
    return pd.DataFrame({
        "rlnDefocusU": [15000.0] * n, "rlnDefocusV": [14000.0] * n, "rlnDefocusAngle": [10.0] * n,
        "rlnVoltage": [300.0] * n, "rlnSphericalAberration": [2.7] * n, "rlnAmplitudeContrast": [0.1] * n,
        "rlnImagePixelSize": [PX] * n,
    })


def test_ctf_from_star_columns_errors_name_the_field():
    df = _particles().drop(columns="rlnDefocusV")
    with pytest.raises(InputError, match="rlnDefocusV"):
        ctf_from_star_columns(df, S, source="p.star")
    df = _particles()
    df.loc[2, "rlnDefocusAngle"] = np.nan
    with pytest.raises(InputError, match=r"row 2 .*rlnDefocusAngle"):
        ctf_from_star_columns(df, S)
    df = _particles()
    df.loc[1, "rlnImagePixelSize"] = 2.0
    with pytest.raises(InputError, match="several pixel sizes"):
        ctf_from_star_columns(df, S)
    assert ctf_from_star_columns(df, S, pixel_size=PX).shape == (3, S, S // 2 + 1)


@pytest.mark.relion
def test_ctf_matches_relion_project_and_mirrored_astigmatism_does_not(tmp_path):
    """relion_project --ctf divided by relion_project without it is RELION's CTF, coefficient by coefficient."""
    d = S
    z, y, x = np.indices((d, d, d)) - d // 2
    rng = np.random.default_rng(0)
    vol = np.zeros((d, d, d))
    for _ in range(40):  # small blobs: power out to high frequency
        c = rng.uniform(-15, 15, 3)
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * 1.2 ** 2))
    with mrcfile.new(tmp_path / "vol.mrc") as m:
        m.set_data(vol.astype(np.float32))
        m.voxel_size = PX
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@dummy.mrcs" for i in range(4)],
        "rlnAngleRot": [0.0, 30.0, 60.0, 90.0], "rlnAngleTilt": [0.0, 40.0, 80.0, 120.0],
        "rlnAnglePsi": [0.0, 10.0, 20.0, 30.0],
        "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0,
        # Strong astigmatism at several angles, V > U included.
        "rlnDefocusU": [20000.0, 9000.0, 15000.0, 25000.0], "rlnDefocusV": [12000.0, 16000.0, 15000.0, 17000.0],
        "rlnDefocusAngle": [0.0, 35.0, 0.0, 120.0],
        "rlnOpticsGroup": 1,
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnImagePixelSize": [PX],
                           "rlnImageSize": [d], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    starfile.write({"optics": optics, "particles": parts}, tmp_path / "p.star")
    for root, extra in (("plain", []), ("withctf", ["--ctf"])):
        cmd = ["relion_project", "--i", "vol.mrc", "--o", root, "--ang", "p.star", "--angpix", str(PX)] + extra
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0 and (tmp_path / f"{root}.mrcs").exists(), proc.stdout + proc.stderr
    plain = np.fft.rfft2(mrcfile.read(tmp_path / "plain.mrcs").astype(np.float64))
    withctf = np.fft.rfft2(mrcfile.read(tmp_path / "withctf.mrcs").astype(np.float64))
    ours = ctf_2d(torch.tensor(parts["rlnDefocusU"].values), torch.tensor(parts["rlnDefocusV"].values),
                  torch.tensor(parts["rlnDefocusAngle"].values), 300.0, 2.7, 0.1, PX, d).numpy()
    mirrored = ctf_2d(torch.tensor(parts["rlnDefocusU"].values), torch.tensor(parts["rlnDefocusV"].values),
                      90.0 - torch.tensor(parts["rlnDefocusAngle"].values), 300.0, 2.7, 0.1, PX, d).numpy()
    for i in range(4):
        strong = np.abs(plain[i]) > 0.05 * np.abs(plain[i]).max()
        relion_ctf = (withctf[i][strong] / plain[i][strong]).real
        assert np.corrcoef(relion_ctf, ours[i][strong])[0, 1] > 0.99
        assert (np.sign(relion_ctf) == np.sign(ours[i][strong])).mean() > 0.97
        if parts["rlnDefocusU"][i] != parts["rlnDefocusV"][i] and parts["rlnDefocusAngle"][i] not in (45.0,):
            # Swapping x and y (the classic ij-meshgrid bug) mirrors the astigmatism: clearly worse.
            assert np.corrcoef(relion_ctf, mirrored[i][strong])[0, 1] < 0.9


def test_agrees_with_teamtomo_torch_ctf():
    """An independent implementation (teamtomo's torch-ctf, float32) gives the same CTF."""
    import torch_ctf

    u = torch.tensor([20000.0, 15000.0, 8000.0])
    v = torch.tensor([12000.0, 9000.0, 7000.0])
    angle = torch.tensor([0.0, 35.0, 160.0])
    ours = ctf_2d(u, v, angle, 300.0, 2.7, 0.1, PX, S, phase_shift=20.0)
    theirs = torch_ctf.calculate_ctf_2d(
        defocus=(u + v) / 2e4, astigmatism=(u - v) / 2e4, astigmatism_angle=angle, voltage=300.0,
        spherical_aberration=2.7, amplitude_contrast=0.1, phase_shift=20.0, pixel_size=PX, image_shape=(S, S),
        rfft=True, fftshift=False)
    assert (theirs.double() - ours)[..., : S // 2].abs().max() < 5e-3
