"""Data augmentation that keeps pose labels true.

Geometry: an image transform ``I'(p) = I(A⁻¹(p − t))`` with ``A = z·Q(φ)`` (zoom z, in-plane
rotation φ counter-clockwise in (x = column, y = row) coordinates about the box centre ``S//2``,
translation t in pixels) turns a particle with pose R and displacement s (pixels) into one with

    R' = R · Rz(−φ)          s' = t + z·Q(φ)·s

because RELION's projection ``P_R(q) = ∫V(R·(q, z))dz`` satisfies ``P_R(Q⁻¹q) = P_{R·Rz(−φ)}(q)``.
Shifts are carried as RELION origins in Å, ``o = −s·pixel_size``. Zoom rescales the projection
(the pose is unchanged; a model sees a slightly larger particle) and the displacement.
Rotations by multiples of 90° are done by exact pixel permutation, not interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .geometry import euler_to_matrix

__all__ = ["AugmentConfig", "augment_batch", "rotate90_about_centre", "affine_about_centre", "inplane_rotation"]


@dataclass(frozen=True)
class AugmentConfig:
    """Each transform with its probability; defaults follow the paper's Appendix B (blur is ours, off).

    Ranges: shift up to ``shift_fraction`` of the box per axis; rotation uniform in
    ±``rotation_deg``; a random multiple of 90° with ``rot90_prob``; uniform noise of width
    ``a`` ~ U(0, uniform_noise_scale); Gaussian noise of σ ~ U(0, gaussian_noise_std); zoom-in
    by a factor 1 + U(0, zoom_fraction); random erasing of a rectangle of up to
    ``erase_fraction`` of the image area (set to 0, the normalised background mean); Gaussian
    blur of σ ~ U(0, blur_sigma) pixels.
    """

    shift_fraction: float = 0.05
    shift_prob: float = 0.5
    rotation_deg: float = 20.0
    rotation_prob: float = 0.5
    rot90_prob: float = 1.0
    uniform_noise_scale: float = 2.0
    uniform_noise_prob: float = 0.2
    gaussian_noise_std: float = 0.5
    gaussian_noise_prob: float = 0.2
    zoom_fraction: float = 0.05
    zoom_prob: float = 0.2
    erase_fraction: float = 0.02
    erase_prob: float = 0.1
    blur_sigma: float = 1.0
    blur_prob: float = 0.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if name.endswith("_prob") and not 0 <= value <= 1:
                raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {value}")
            if not name.endswith("_prob") and value < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {value}")


def inplane_rotation(angle_deg: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` rotation about the beam axis z by ``angle_deg``: ``Rz(angle)``."""
    a = torch.as_tensor(angle_deg, dtype=torch.float64)
    zeros = torch.zeros_like(a)
    return euler_to_matrix(torch.stack([a, zeros, zeros], -1))


def _rot2d(angle_deg: torch.Tensor) -> torch.Tensor:
    a = torch.deg2rad(torch.as_tensor(angle_deg, dtype=torch.float64))
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def rotate90_about_centre(images: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate ``(..., S, S)`` images by ``k``·90° counter-clockwise in (x, y) about pixel ``S//2``, exactly.

    An even box has no pixel at its geometric middle, so the image is padded by one row and one
    column to put ``S//2`` in the middle, rotated by permutation, and cropped back; the one row
    or column that rotates out of the box comes back as zeros.
    """
    k = k % 4
    if k == 0:
        return images
    s = images.shape[-1]
    if s % 2 == 0:
        padded = F.pad(images, (0, 1, 0, 1))
        return torch.rot90(padded, -k, dims=(-2, -1))[..., :s, :s]
    return torch.rot90(images, -k, dims=(-2, -1))


def affine_about_centre(
    images: torch.Tensor, angle_deg: torch.Tensor, shift_px: torch.Tensor, zoom: torch.Tensor
) -> torch.Tensor:
    """``I'(p) = I(A⁻¹(p − t))`` with ``A = zoom·Q(angle)`` about pixel ``S//2``, bilinear, zeros outside.

    Args:
        images: ``(B, S, S)``.
        angle_deg, zoom: ``(B,)``. shift_px: ``(B, 2)`` (x, y) in pixels.
    """
    s = images.shape[-1]
    dev = images.device
    c = s // 2
    coords = torch.arange(s, dtype=torch.float64, device=dev) - c
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    p = torch.stack([xx, yy], -1)  # (S, S, 2) output pixel (x, y) relative to the centre
    inv = _rot2d(-angle_deg.to(dev)) / zoom.to(dev, torch.float64)[:, None, None]  # A⁻¹
    q = torch.einsum("bij,bhwj->bhwi", inv, p[None] - shift_px.to(dev, torch.float64)[:, None, None, :])
    grid = (2 * (q + c) + 1) / s - 1  # align_corners=False: pixel centres at (2i+1)/S − 1
    return F.grid_sample(
        images[:, None].float(), grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False
    )[:, 0].to(images.dtype)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = images.shape[-1]
    ky = torch.fft.fftfreq(s, device=images.device)
    kx = torch.fft.rfftfreq(s, device=images.device)
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    kernel = torch.exp(-2 * math.pi**2 * sigma.float()[:, None, None] ** 2 * k2)
    return torch.fft.irfft2(torch.fft.rfft2(images.float()) * kernel, s=(s, s)).to(images.dtype)


def augment_batch(
    images: torch.Tensor,
    rotmats: torch.Tensor,
    shifts_angstrom: torch.Tensor,
    pixel_size: float,
    config: AugmentConfig = AugmentConfig(),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment a batch and update its labels so they stay true.

    Args:
        images: ``(B, S, S)`` (preprocessed, background-normalised).
        rotmats: ``(B, 3, 3)`` poses R (see :mod:`cryopose.geometry`).
        shifts_angstrom: ``(B, 2)`` RELION origins (rlnOriginX/YAngst) in Å at ``pixel_size``.
        pixel_size: Å per pixel of ``images``.
        config: which transforms, how strong, how often.
        generator: for reproducible draws (``None``: torch's global generator, which DataLoader
            seeds differently in every worker).

    Returns:
        ``(images, rotmats, shifts_angstrom)`` of the same shapes and dtypes.
    """
    b, s = images.shape[0], images.shape[-1]

    def u(n=b):
        return torch.rand(n, generator=generator, dtype=torch.float64)

    out = images.clone()
    r = rotmats.to(torch.float64)
    disp = -shifts_angstrom.to(torch.float64) / pixel_size  # particle displacement s in pixels

    # Exact 90° turns.
    k90 = torch.where(u() < config.rot90_prob, torch.floor(u() * 4).long(), torch.zeros(b, dtype=torch.long))
    for k in (1, 2, 3):
        sel = k90 == k
        if sel.any():
            out[sel] = rotate90_about_centre(out[sel], k)
    angle90 = 90.0 * k90.double()
    r = r @ inplane_rotation(-angle90)
    disp = torch.einsum("bij,bj->bi", _rot2d(angle90), disp)

    # Small rotation, shift and zoom in one interpolation.
    do_rot, do_shift, do_zoom = u() < config.rotation_prob, u() < config.shift_prob, u() < config.zoom_prob
    angle = torch.where(do_rot, (2 * u() - 1) * config.rotation_deg, torch.zeros(b, dtype=torch.float64))
    t = torch.where(
        do_shift[:, None],
        (2 * torch.rand(b, 2, generator=generator, dtype=torch.float64) - 1) * config.shift_fraction * s,
        torch.zeros(b, 2, dtype=torch.float64),
    )
    zoom = torch.where(do_zoom, 1 + u() * config.zoom_fraction, torch.ones(b, dtype=torch.float64))
    sel = do_rot | do_shift | do_zoom
    if sel.any():
        out[sel] = affine_about_centre(out[sel], angle[sel], t[sel], zoom[sel])
    r = r @ inplane_rotation(-angle)
    disp = t + zoom[:, None] * torch.einsum("bij,bj->bi", _rot2d(angle), disp)

    # Intensity transforms: labels unchanged.
    sel = u() < config.blur_prob
    if sel.any():
        out[sel] = _gaussian_blur(out[sel], u(int(sel.sum())) * config.blur_sigma)
    sel = u() < config.uniform_noise_prob
    if sel.any():
        width = (u(int(sel.sum())) * config.uniform_noise_scale).to(out.dtype)
        noise = torch.rand(int(sel.sum()), s, s, generator=generator, dtype=torch.float64).to(out.dtype) - 0.5
        out[sel] = out[sel] + noise * width[:, None, None]
    sel = u() < config.gaussian_noise_prob
    if sel.any():
        sigma = (u(int(sel.sum())) * config.gaussian_noise_std).to(out.dtype)
        noise = torch.randn(int(sel.sum()), s, s, generator=generator, dtype=torch.float64).to(out.dtype)
        out[sel] = out[sel] + noise * sigma[:, None, None]
    for i in torch.nonzero(u() < config.erase_prob).flatten().tolist():
        area = float(u(1)) * config.erase_fraction * s * s
        aspect = math.exp((float(u(1)) - 0.5) * math.log(3.0))  # aspect ratio in [1/√3, √3]
        h = max(1, min(s, int(round(math.sqrt(area * aspect)))))
        w = max(1, min(s, int(round(math.sqrt(area / aspect)))))
        y0, x0 = int(u(1) * (s - h + 1)), int(u(1) * (s - w + 1))
        out[i, y0 : y0 + h, x0 : x0 + w] = 0

    return out, r.to(rotmats.dtype), (-disp * pixel_size).to(shifts_angstrom.dtype)
