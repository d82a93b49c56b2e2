"""Particle image preprocessing: normalisation, CTF correction, cropping and Fourier resizing.

All functions take ``(B, S, S)`` image batches (box centre at pixel ``S//2``, x = columns,
y = rows, as RELION) and return new tensors; nothing is changed in place. The order the paper
uses, and :func:`preprocess_images` applies, is normalise → CTF correction → crop → resize.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "PreprocessConfig",
    "background_normalise",
    "center_crop",
    "fourier_resize",
    "fourier_resize_map",
    "preprocess_images",
    "output_geometry",
]


@dataclass(frozen=True)
class PreprocessConfig:
    """What to do to each particle image, in order.

    normalise: background mean 0, std 1, measured outside the circle inscribed in the box.
    ctf_correction: ``"phase_flip"``, ``"wiener"`` or ``None``.
    wiener_constant: the Wiener filter's 1/SNR constant.
    crop_fraction: keep this central fraction of the box (1.0 keeps all).
    image_size: final size in pixels after Fourier resampling; ``None`` keeps the cropped size.
    """

    normalise: bool = True
    ctf_correction: str | None = "phase_flip"
    wiener_constant: float = 0.1
    crop_fraction: float = 1.0
    image_size: int | None = None

    def __post_init__(self):
        if self.ctf_correction not in (None, "phase_flip", "wiener"):
            raise ValueError(f"ctf_correction must be 'phase_flip', 'wiener' or None, got {self.ctf_correction!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.image_size is not None and self.image_size < 2:
            raise ValueError(f"image_size must be >= 2 pixels, got {self.image_size}")
        if self.wiener_constant <= 0:
            raise ValueError(f"wiener_constant must be > 0, got {self.wiener_constant}")


def output_geometry(box_size: int, pixel_size: float, config: PreprocessConfig) -> tuple[int, int, float]:
    """``(crop_size, image_size, pixel_size)`` of images preprocessed with ``config``.

    The crop is rounded to an even number of pixels (keeps the box centre on a pixel); the pixel
    size grows by ``crop_size / image_size`` so Å-valued labels and metadata stay true.
    """
    crop = box_size if config.crop_fraction >= 1 else max(2, int(round(box_size * config.crop_fraction / 2)) * 2)
    size = config.image_size or crop
    return crop, size, pixel_size * crop / size


@functools.lru_cache(maxsize=8)
def _background_weights(s: int, device: str) -> torch.Tensor:
    c = torch.arange(s, dtype=torch.float32) - s // 2
    outside = (c[:, None] ** 2 + c[None, :] ** 2) > (s / 2) ** 2
    return outside.flatten().float().to(device)


def background_normalise(images: torch.Tensor) -> torch.Tensor:
    """Per image: subtract the mean and divide by the std of the pixels outside the inscribed circle.

    Args:
        images: ``(B, S, S)``.

    Returns:
        ``(B, S, S)`` with background mean 0 and std 1 (images with a flat background are only
        centred, never divided by zero).
    """
    s = images.shape[-1]
    w = _background_weights(s, str(images.device)).to(images.dtype)
    flat = images.reshape(*images.shape[:-2], s * s)
    n = float(w.sum())
    # Masked sums as matrix-vector products: one pass each, no gather of the background pixels.
    mean = flat @ w / n
    var = ((flat * flat) @ w - n * mean * mean) / max(n - 1, 1)
    std = torch.sqrt(var.clamp(min=0))
    std = torch.where(std > 1e-12 * (mean.abs() + 1), std, torch.ones_like(std))
    return (images - mean[..., None, None]) / std[..., None, None]


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size × size`` pixels, keeping pixel ``S//2`` as the new ``size//2``."""
    s = images.shape[-1]
    if size > s:
        raise ValueError(f"center_crop: {size} px is larger than the {s} px box")
    start = s // 2 - size // 2
    return images[..., start : start + size, start : start + size]


def _resize_rfft(ft: torch.Tensor, s: int, size: int) -> torch.Tensor:
    """Crop or zero-pad an ``rfft2`` spectrum ``(..., s, s//2+1)`` to ``(..., size, size//2+1)``."""
    m = min(s, size)
    pos, neg, cols = (m + 1) // 2, m // 2, m // 2 + 1
    out = torch.zeros(*ft.shape[:-2], size, size // 2 + 1, dtype=ft.dtype, device=ft.device)
    out[..., :pos, :cols] = ft[..., :pos, :cols]
    if neg:
        out[..., size - neg :, :cols] = ft[..., s - neg :, :cols]
    return out


@functools.lru_cache(maxsize=16)
def _checkerboard(s: int, device: str) -> torch.Tensor:
    """``(−1)^(i+j)`` on an ``rfft2`` grid: multiplying a spectrum by it shifts an even-sized image by S/2."""
    i = torch.arange(s)[:, None]
    j = torch.arange(s // 2 + 1)[None, :]
    return (1 - 2 * ((i + j) % 2)).float().to(device)


def _centred_rfft2(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.rfft2(torch.fft.ifftshift(x, dim=(-2, -1)))


def _centred_irfft2(ft: torch.Tensor, size: int) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.irfft2(ft, s=(size, size)), dim=(-2, -1))


def fourier_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resample ``(B, S, S)`` images to ``(B, size, size)`` by cropping or zero-padding their DFT.

    Downsampling this way is ideally antialiased (nothing above the new Nyquist survives), and the
    box centre ``S//2`` maps to ``size//2``. Pixel values keep their scale (a constant image stays
    the same constant).
    """
    s = images.shape[-1]
    if size == s:
        return images
    dtype = images.dtype
    x = images if dtype == torch.float64 else images.float()
    out = _centred_irfft2(_resize_rfft(_centred_rfft2(x), s, size), size)
    return (out * (size / s) ** 2).to(dtype)


def fourier_resize_map(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Resample a cubic ``(D, D, D)`` map to ``(size,)*3`` by cropping or zero-padding its 3D DFT
    (the 3D counterpart of :func:`fourier_resize`; the centre ``D//2`` maps to ``size//2``)."""
    d = volume.shape[-1]
    if size == d:
        return volume
    dims = (-3, -2, -1)
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume.double(), dim=dims), dim=dims), dim=dims)
    out = torch.zeros(size, size, size, dtype=ft.dtype)
    m = min(d, size)
    a, b = d // 2 - m // 2, size // 2 - m // 2
    out[b : b + m, b : b + m, b : b + m] = ft[a : a + m, a : a + m, a : a + m]
    res = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(out, dim=dims), dim=dims), dim=dims).real
    return (res * (size / d) ** 3).to(volume.dtype)


def preprocess_images(images: torch.Tensor, config: PreprocessConfig, ctf: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``config`` to a batch.

    Args:
        images: ``(B, S, S)`` raw particle images.
        config: what to do.
        ctf: ``(B, S, S//2+1)`` the particles' CTFs at the raw box and pixel size (``rfft2``
            layout, see :mod:`cryopose.ctf`); required when ``config.ctf_correction`` is set.

    Returns:
        ``(B, image_size, image_size)`` float32.
    """
    x = images.float()
    if config.normalise:
        x = background_normalise(x)
    s = x.shape[-1]
    crop, size, _ = output_geometry(s, 1.0, config)
    if config.ctf_correction is not None:
        if ctf is None:
            raise ValueError("preprocess_images: CTF correction needs the particles' CTFs")
        ctf = ctf.to(device=x.device, dtype=x.dtype)
        filt = torch.sign(ctf) if config.ctf_correction == "phase_flip" else ctf / (ctf**2 + config.wiener_constant)
        if crop == s and s % 2 == 0 and size % 2 == 0:
            # No crop in between: correction and resizing share one forward and one inverse FFT,
            # and the centring shifts become sign patterns folded into the filter.
            dev = str(x.device)
            ft = torch.fft.rfft2(x) * (filt * _checkerboard(s, dev))
            if size != s:
                ft = _resize_rfft(ft, s, size)
            ft = ft * (_checkerboard(size, dev) * (size / s) ** 2)
            return torch.fft.irfft2(ft, s=(size, size))
        x = _centred_irfft2(_centred_rfft2(x) * filt, s)
    if crop != s:
        x = center_crop(x, crop)
    if size != crop:
        x = fourier_resize(x, size)
    return x
