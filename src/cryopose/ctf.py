"""The RELION 3.1 contrast transfer function, batched over particles.

``CTF(k) = −sin γ(k) · exp(−B k²/4)`` with

``γ = −π λ Δf(θ) k² + (π/2) Cs λ³ k⁴ − φ − atan(w / √(1 − w²))``,
``Δf(θ) = (U + V)/2 + (U − V)/2 · cos 2(θ − θ_ast)``, ``θ = atan2(k_y, k_x)``,

x = image columns, y = image rows (as RELION), U, V = rlnDefocusU/V (Å), θ_ast = rlnDefocusAngle,
φ = rlnPhaseShift, w = rlnAmplitudeContrast, Cs in Å (from mm), λ the relativistic electron
wavelength (Å), B = rlnCtfBfactor (Å²), k in 1/Å.

``relion_project --ctf`` (3.1.3) multiplies the projection's spectrum by exactly this CTF, evaluated
at the STAR file's rlnImagePixelSize (``--angpix`` overrides it; the map header's is not used);
``tests/core/test_ctf.py`` checks it coefficient by coefficient, phase shift and B-factor included.

Layouts: ``rfft=True`` gives ``(..., S, S//2 + 1)`` matching ``torch.fft.rfft2`` of an S×S image
(DC at ``[0, 0]``, rows = k_y in ``fftfreq`` order, columns = k_x ≥ 0); ``rfft=False`` the full
``(..., S, S)`` ``fft2`` layout; ``fftshift=True`` moves DC to the centre (row ``S//2``, and
column ``S//2`` in the full layout).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import torch

from .errors import InputError

__all__ = [
    "electron_wavelength",
    "ctf_2d",
    "apply_ctf",
    "phase_flip",
    "wiener_filter",
    "ctf_from_star_columns",
    "ctf_parameters",
    "ctf_from_parameters",
    "CTF_COLUMNS",
]


def electron_wavelength(voltage_kv: float | torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength.

    Args:
        voltage_kv: ``(...)`` acceleration voltage in kV.

    Returns:
        ``(...)`` float64 wavelength in Å (0.019687 Å at 300 kV).
    """
    v = torch.as_tensor(voltage_kv, dtype=torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(v * (1 + 0.978466e-6 * v))


def _frequency_grid(
    image_size: int, pixel_size: float, rfft: bool, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_y, k_x)``, each ``(S, S//2+1)`` (or ``(S, S)``), in 1/Å, in FFT order."""
    ky = torch.fft.fftfreq(image_size, d=pixel_size, dtype=torch.float64, device=device)
    kx_fn = torch.fft.rfftfreq if rfft else torch.fft.fftfreq
    kx = kx_fn(image_size, d=pixel_size, dtype=torch.float64, device=device)
    return ky[:, None].expand(-1, len(kx)), kx[None, :].expand(image_size, -1)


@functools.lru_cache(maxsize=16)
def _polar_grid(
    image_size: int, pixel_size: float, rfft: bool, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k², cos 2θ, sin 2θ)`` on the FFT grid, θ = atan2(k_y, k_x); cached (read-only use)."""
    ky, kx = _frequency_grid(image_size, pixel_size, rfft, device=torch.device(device))
    theta = torch.atan2(ky, kx)
    return ((kx**2 + ky**2).to(dtype), torch.cos(2 * theta).to(dtype), torch.sin(2 * theta).to(dtype))


def _as_float64(values, device: torch.device | None) -> list[torch.Tensor]:
    return [torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]


def ctf_2d(
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage,
    spherical_aberration,
    amplitude_contrast,
    pixel_size: float,
    image_size: int,
    phase_shift=0.0,
    bfactor=0.0,
    rfft: bool = True,
    fftshift: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """RELION's 2D CTF for a batch of particles.

    Every per-particle argument is a float or a tensor; their shapes ``(...)`` broadcast together
    and become the leading dimensions of the result.

    Args:
        defocus_u, defocus_v: ``(...)`` defocus in Å (rlnDefocusU/V, underfocus positive); either may
            be the larger.
        defocus_angle: ``(...)`` astigmatism angle in degrees (rlnDefocusAngle), the direction of U
            measured from the x (column) axis towards y (rows).
        voltage: ``(...)`` kV. spherical_aberration: ``(...)`` mm.
        amplitude_contrast: ``(...)`` fraction w in [0, 1).
        pixel_size: Å per pixel of the images the CTF will multiply. image_size: S (square box).
        phase_shift: ``(...)`` degrees (rlnPhaseShift, phase plate).
        bfactor: ``(...)`` Å² (rlnCtfBfactor), envelope ``exp(−B k²/4)``; 0 for none.
        rfft, fftshift: output layout (see the module docstring).
        dtype: of the result; float32 halves the cost for large batches (phases stay accurate
            to ~1e-5 rad), float64 is the default for reference use.

    Returns:
        ``(..., S, S//2+1)`` (or ``(..., S, S)`` with ``rfft=False``) CTF of ``dtype``, on the
        device of the tensor arguments.
    """
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"ctf_2d: image_size must be a positive integer, got {image_size!r}")
    if not pixel_size > 0:
        raise ValueError(f"ctf_2d: pixel_size must be > 0 Å, got {pixel_size!r}")
    values = (
        defocus_u,
        defocus_v,
        defocus_angle,
        voltage,
        spherical_aberration,
        amplitude_contrast,
        phase_shift,
        bfactor,
    )
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
    params = torch.broadcast_tensors(*_as_float64(values, device))
    u, v, ang, kv, cs, w, phi, b = (p[..., None, None] for p in params)

    k2, cos2t, sin2t = _polar_grid(int(image_size), float(pixel_size), rfft, str(device or "cpu"), dtype)
    lam = electron_wavelength(kv)
    # cos 2(θ − θ_ast) expanded, so the per-pixel angle terms are computed once per grid.
    a2 = 2 * torch.deg2rad(ang)
    half_sum, half_diff = (0.5 * (u + v)).to(dtype), (0.5 * (u - v)).to(dtype)
    defocus = half_sum + half_diff * (cos2t * torch.cos(a2).to(dtype) + sin2t * torch.sin(a2).to(dtype))
    cs_angstrom = cs * 1e7
    amplitude_phase = torch.atan(w / torch.sqrt(1 - w**2))
    gamma = (
        (-math.pi * lam).to(dtype) * defocus * k2
        + (0.5 * math.pi * cs_angstrom * lam**3).to(dtype) * k2**2
        - (torch.deg2rad(phi) + amplitude_phase).to(dtype)
    )
    ctf = -torch.sin(gamma)
    if bool((b != 0).any()):
        ctf = ctf * torch.exp(-b.to(dtype) * k2 / 4)
    if fftshift:
        ctf = torch.fft.fftshift(ctf, dim=(-2,) if rfft else (-2, -1))
    return ctf


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply images by a CTF (or any real filter) in Fourier space.

    Args:
        images: ``(..., S, S)`` real images (box centre at ``S//2``; a real filter that is even in k
            commutes with the centring, so no shift is needed).
        ctf: ``(..., S, S//2+1)`` in ``rfft2`` layout (:func:`ctf_2d` default), broadcasting with
            the images' batch dimensions.

    Returns:
        ``(..., S, S)`` filtered images in the input dtype (computed in float64 for float64 input,
        else float32).
    """
    s = images.shape[-2:]
    work = images if images.dtype == torch.float64 else images.float()
    ft = torch.fft.rfft2(work)
    return torch.fft.irfft2(ft * ctf.to(device=ft.device, dtype=work.dtype), s=s).to(images.dtype)


def phase_flip(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Phase flipping: multiply each Fourier coefficient by the sign of the CTF.

    Args:
        images: ``(..., S, S)`` real images. ctf: ``(..., S, S//2+1)`` ``rfft2`` layout.

    Returns:
        ``(..., S, S)`` images in the input dtype.
    """
    return apply_ctf(images, torch.sign(ctf))


def wiener_filter(images: torch.Tensor, ctf: torch.Tensor, constant: float = 0.1) -> torch.Tensor:
    """Wiener-filter CTF correction: multiply by ``CTF / (CTF² + constant)``.

    Args:
        images: ``(..., S, S)`` real images. ctf: ``(..., S, S//2+1)`` ``rfft2`` layout.
        constant: > 0, the inverse signal-to-noise ratio (1/SNR); small values approach
            ``1/CTF``, large ones ``CTF/constant``. Every coefficient keeps the sign that
            :func:`phase_flip` gives it.

    Returns:
        ``(..., S, S)`` images in the input dtype.
    """
    if not constant > 0:
        raise ValueError(f"wiener_filter: constant (1/SNR) must be > 0, got {constant}")
    return apply_ctf(images, ctf / (ctf**2 + constant))


CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
)
OPTIONAL_CTF_COLUMNS = ("rlnPhaseShift", "rlnCtfBfactor")


def ctf_from_star_columns(
    particles: pd.DataFrame,
    image_size: int,
    pixel_size: float | None = None,
    use_bfactor: bool = True,
    source: str | None = None,
    rfft: bool = True,
    fftshift: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """CTFs of the particles of a STAR table whose rows carry their optics (see
    :func:`cryopose.io.particles_with_optics`).

    Args:
        particles: N rows with rlnDefocusU/V/Angle, rlnVoltage, rlnSphericalAberration,
            rlnAmplitudeContrast, rlnImagePixelSize and optionally rlnPhaseShift, rlnCtfBfactor.
        image_size: S of the images the CTF will multiply.
        pixel_size: Å per pixel of those images; default the rows' rlnImagePixelSize (which must
            then be one value).
        use_bfactor: apply rlnCtfBfactor when present.
        source: file name for error messages.
        rfft, fftshift: output layout, as :func:`ctf_2d`.

    Returns:
        ``(N, S, S//2+1)`` (or ``(N, S, S)``) float64.

    Raises:
        InputError: a needed column is missing, or a value is not finite or out of range.
    """
    for col in CTF_COLUMNS:
        if col not in particles.columns:
            raise InputError(
                f"missing column needed for the CTF; expected {', '.join(CTF_COLUMNS)}", path=source, where=col
            )
    cols = list(CTF_COLUMNS) + [c for c in OPTIONAL_CTF_COLUMNS if c in particles.columns]
    try:
        values = particles[cols].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"CTF columns must be numeric ({exc})", path=source, where=", ".join(cols)) from None
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(
            f"non-finite value {values[row, col]} (expected a finite number)",
            path=source,
            where=f"row {row} (0-based), column {cols[col]}",
        )
    table = dict(zip(cols, values.T))
    for col, ok, expected in (
        ("rlnAmplitudeContrast", lambda x: (x >= 0) & (x < 1), "in [0, 1)"),
        ("rlnImagePixelSize", lambda x: x > 0, "> 0"),
        ("rlnVoltage", lambda x: x > 0, "> 0"),
    ):
        wrong = ~ok(table[col])
        if wrong.any():
            row = int(np.argmax(wrong))
            raise InputError(
                f"value {table[col][row]} out of range (expected {expected})",
                path=source,
                where=f"row {row} (0-based), column {col}",
            )
    if pixel_size is None:
        sizes = np.unique(table["rlnImagePixelSize"])
        if len(sizes) > 1:
            raise InputError(
                f"particles have several pixel sizes {sizes.tolist()}; pass the images' pixel size",
                path=source,
                where="rlnImagePixelSize",
            )
        pixel_size = float(sizes[0]) if len(sizes) else 1.0  # no rows: any grid gives (0, S, ·)
    params = {c: torch.tensor(x) for c, x in table.items()}
    return ctf_from_parameters(
        params, image_size, pixel_size, use_bfactor=use_bfactor, rfft=rfft, fftshift=fftshift, dtype=dtype
    )


def ctf_from_parameters(
    params: dict[str, torch.Tensor],
    image_size: int,
    pixel_size: float,
    use_bfactor: bool = True,
    rfft: bool = True,
    fftshift: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """CTFs from per-particle RELION columns already validated and held as ``(N,)`` tensors
    (e.g. by :func:`ctf_from_star_columns`' checks, done once for a whole table)."""
    return ctf_2d(
        params["rlnDefocusU"],
        params["rlnDefocusV"],
        params["rlnDefocusAngle"],
        params["rlnVoltage"],
        params["rlnSphericalAberration"],
        params["rlnAmplitudeContrast"],
        pixel_size,
        image_size,
        phase_shift=params.get("rlnPhaseShift", 0.0),
        bfactor=params.get("rlnCtfBfactor", 0.0) if use_bfactor else 0.0,
        rfft=rfft,
        fftshift=fftshift,
        dtype=dtype,
    )


def ctf_parameters(particles: pd.DataFrame, source: str | None = None) -> dict[str, torch.Tensor]:
    """Validate a table's CTF columns once and return them as ``(N,)`` float64 tensors."""
    # All checks (columns, finiteness, ranges) on a 2-pixel grid: cheap for any N.
    ctf_from_star_columns(particles, 2, 1.0, source=source)
    cols = list(CTF_COLUMNS) + [c for c in OPTIONAL_CTF_COLUMNS if c in particles.columns]
    values = particles[cols].to_numpy(dtype=np.float64)
    return {c: torch.tensor(values[:, i]) for i, c in enumerate(cols)}
