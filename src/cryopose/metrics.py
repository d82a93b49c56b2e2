"""Map comparison metrics (real-space correlation and Fourier shell correlation)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pearson_correlation", "fsc_curve"]


def pearson_correlation(map1, map2, mask=None) -> float:
    """Real-space Pearson correlation of two maps, optionally weighted by a (soft) mask.

    Args:
        map1, map2: arrays or tensors of the same shape.
        mask: same shape, weights in [0, 1]; ``None`` means the whole box.
    """
    a = torch.as_tensor(np.asarray(map1), dtype=torch.float64).flatten()
    b = torch.as_tensor(np.asarray(map2), dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"pearson_correlation: shapes differ {tuple(np.shape(map1))} vs {tuple(np.shape(map2))}")
    w = torch.ones_like(a) if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.float64).flatten()
    w = w / w.sum()
    da, db = a - (w * a).sum(), b - (w * b).sum()
    return float((w * da * db).sum() / torch.sqrt((w * da * da).sum() * (w * db * db).sum()))


def fsc_curve(map1, map2, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation between two cubic maps.

    Shells are one Fourier voxel wide: shell ``i`` holds the voxels whose frequency radius
    rounds to ``i`` (in units of 1/(D·pixel_size)), for ``i = 0 .. D//2`` (Nyquist).

    Args:
        map1, map2: ``(D, D, D)``.
        pixel_size: Å per voxel.

    Returns:
        ``(frequencies, fsc)``: shell frequencies in 1/Å, shape ``(D//2 + 1,)``, and the FSC per shell.
    """
    a = torch.as_tensor(np.asarray(map1), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(map2), dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 3 or len(set(a.shape)) != 1:
        raise ValueError(f"fsc_curve expects two cubic maps of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.shape[0]
    fa, fb = torch.fft.rfftn(a), torch.fft.rfftn(b)
    kz = torch.fft.fftfreq(d, dtype=torch.float64) * d
    kx = torch.fft.rfftfreq(d, dtype=torch.float64) * d
    radius = torch.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2)
    shell = torch.round(radius).long().flatten()
    keep = shell <= d // 2
    shell = shell[keep]
    # rfft stores half the coefficients; the missing half are conjugates and give the same sums.
    cross = torch.zeros(d // 2 + 1, dtype=torch.float64).index_add_(0, shell, (fa * fb.conj()).real.flatten()[keep])
    pa = torch.zeros(d // 2 + 1, dtype=torch.float64).index_add_(0, shell, fa.abs().flatten()[keep] ** 2)
    pb = torch.zeros(d // 2 + 1, dtype=torch.float64).index_add_(0, shell, fb.abs().flatten()[keep] ** 2)
    fsc = cross / torch.sqrt(pa * pb).clamp(min=1e-30)
    freqs = torch.arange(d // 2 + 1, dtype=torch.float64) / (d * pixel_size)
    return freqs.numpy(), fsc.numpy()
