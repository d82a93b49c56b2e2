"""The RELION 3.1 contrast transfer function, batched over particles.

``CTF(k) = −sin γ(k) · exp(−B k²/4)`` with

``γ = −π λ Δf(θ) k² + (π/2) Cs λ³ k⁴ − φ − atan(w / √(1 − w²))``,
``Δf(θ) = (U + V)/2 + (U − V)/2 · cos 2(θ − θ_ast)``, ``θ = atan2(k_y, k_x)``,

x = image columns, y = image rows (as RELION), U, V = rlnDefocusU/V (Å), θ_ast = rlnDefocusAngle,
φ = rlnPhaseShift, w = rlnAmplitudeContrast, Cs in Å (from mm), λ the relativistic electron
wavelength (Å), B = rlnCtfBfactor (Å²), k in 1/Å.

Layouts: ``rfft=True`` gives ``(..., S, S//2 + 1)`` matching ``torch.fft.rfft2`` of an S×S image
(DC at ``[0, 0]``, rows = k_y in ``fftfreq`` order, columns = k_x ≥ 0); ``rfft=False`` the full
``(..., S, S)`` ``fft2`` layout; ``fftshift=True`` moves DC to the centre (row ``S//2``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from .errors import InputError

__all__ = ["electron_wavelength", "ctf_2d", "apply_ctf", "phase_flip", "wiener_filter", "ctf_from_star_columns"]


def electron_wavelength(voltage_kv: float | torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = torch.as_tensor(voltage_kv, dtype=torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(v * (1 + 0.978466e-6 * v))


def _frequency_grid(image_size: int, pixel_size: float, rfft: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    ky = torch.fft.fftfreq(image_size, d=pixel_size, dtype=torch.float64, device=device)
    kx = (torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(image_size, d=pixel_size, dtype=torch.float64,
                                                            device=device)
    return ky[:, None].expand(-1, len(kx)), kx[None, :].expand(image_size, -1)


def ctf_2d(defocus_u, defocus_v, defocus_angle, voltage, spherical_aberration, amplitude_contrast,
           pixel_size: float, image_size: int, phase_shift=0.0, bfactor=0.0, rfft: bool = True,
           fftshift: bool = False) -> torch.Tensor:
    """RELION's 2D CTF for a batch of particles.

    Args:
        defocus_u, defocus_v: ``(...)`` defocus in Å (rlnDefocusU/V); either may be the larger.
        defocus_angle: ``(...)`` astigmatism angle in degrees from the x (column) axis.
        voltage: kV. spherical_aberration: mm. amplitude_contrast: fraction in [0, 1).
        pixel_size: Å per pixel. image_size: S.
        phase_shift: ``(...)`` degrees (phase plate). bfactor: ``(...)`` Å², envelope exp(−B k²/4).
        rfft, fftshift: output layout (module docstring).

    Returns:
        ``(..., S, S//2+1)`` (or ``(..., S, S)``) float64 CTF values in [−1, 1].
    """
    params = [torch.as_tensor(p, dtype=torch.float64) for p in
              (defocus_u, defocus_v, defocus_angle, voltage, spherical_aberration, amplitude_contrast,
               phase_shift, bfactor)]
    u, v, ang, kv, cs, w, phi, b = (p[..., None, None] for p in torch.broadcast_tensors(*params))
    ky, kx = _frequency_grid(image_size, pixel_size, rfft, device=u.device)
    k2 = kx ** 2 + ky ** 2
    theta = torch.atan2(ky, kx)
    lam = electron_wavelength(kv)
    defocus = 0.5 * (u + v) + 0.5 * (u - v) * torch.cos(2 * (theta - torch.deg2rad(ang)))
    cs_a = cs * 1e7
    gamma = (-math.pi * lam * defocus * k2 + 0.5 * math.pi * cs_a * lam ** 3 * k2 ** 2
             - torch.deg2rad(phi) - torch.atan(w / torch.sqrt(1 - w ** 2)))
    ctf = -torch.sin(gamma) * torch.exp(-b * k2 / 4)
    if fftshift:
        ctf = torch.fft.fftshift(ctf, dim=(-2,) if rfft else (-2, -1))
    return ctf


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply images by a CTF in Fourier space.

    Args:
        images: ``(..., S, S)`` real images (box centre at ``S//2``; a real, even CTF commutes
            with the centring, so no shift is needed).
        ctf: ``(..., S, S//2+1)`` in ``rfft2`` layout.

    Returns:
        ``(..., S, S)`` images of the input dtype.
    """
    s = images.shape[-2:]
    ft = torch.fft.rfft2(images.double() if images.dtype == torch.float64 else images.float())
    return torch.fft.irfft2(ft * ctf.to(ft.real.dtype), s=s).to(images.dtype)


def phase_flip(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Phase flipping: multiply each Fourier coefficient by the sign of the CTF."""
    return apply_ctf(images, torch.sign(ctf))


def wiener_filter(images: torch.Tensor, ctf: torch.Tensor, constant: float = 0.1) -> torch.Tensor:
    """Wiener-filter CTF correction ``CTF / (CTF² + constant)``; ``constant`` ≈ 1/SNR, > 0."""
    if constant <= 0:
        raise ValueError(f"wiener_filter: constant must be > 0, got {constant}")
    return apply_ctf(images, ctf / (ctf ** 2 + constant))


CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
               "rlnAmplitudeContrast", "rlnImagePixelSize")


def ctf_from_star_columns(particles: pd.DataFrame, image_size: int, pixel_size: float | None = None,
                          use_bfactor: bool = True, source: str | None = None) -> torch.Tensor:
    """CTFs of the particles of a STAR table whose rows carry their optics (see
    :func:`cryopose.io.particles_with_optics`).

    Args:
        particles: rows with rlnDefocusU/V/Angle, rlnVoltage, rlnSphericalAberration,
            rlnAmplitudeContrast, rlnImagePixelSize and optionally rlnPhaseShift, rlnCtfBfactor.
        image_size: S of the images the CTF will multiply.
        pixel_size: Å per pixel of those images; default the rows' rlnImagePixelSize (which must
            then be one value).
        source: file name for error messages.

    Returns:
        ``(N, S, S//2+1)`` float64.
    """
    for col in CTF_COLUMNS:
        if col not in particles.columns:
            raise InputError(f"missing column needed for the CTF; expected {', '.join(CTF_COLUMNS)}",
                             path=source, where=col)
    cols = list(CTF_COLUMNS) + [c for c in ("rlnPhaseShift", "rlnCtfBfactor") if c in particles.columns]
    values = particles[cols].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(f"non-finite value {values[row, col]} (expected a finite number)", path=source,
                         where=f"row {row} (0-based), column {cols[col]}")
    if pixel_size is None:
        sizes = np.unique(particles["rlnImagePixelSize"].to_numpy(dtype=np.float64))
        if len(sizes) != 1:
            raise InputError(f"particles have several pixel sizes {sizes.tolist()}; pass the images' pixel size",
                             path=source, where="rlnImagePixelSize")
        pixel_size = float(sizes[0])
    col = {c: torch.tensor(particles[c].to_numpy(dtype=np.float64)) for c in cols}
    return ctf_2d(col["rlnDefocusU"], col["rlnDefocusV"], col["rlnDefocusAngle"], col["rlnVoltage"],
                  col["rlnSphericalAberration"], col["rlnAmplitudeContrast"], pixel_size, image_size,
                  phase_shift=col.get("rlnPhaseShift", 0.0),
                  bfactor=col.get("rlnCtfBfactor", 0.0) if use_bfactor else 0.0)
