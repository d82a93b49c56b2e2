"""Soft masks for maps: threshold → dilation → raised-cosine edge."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["soft_mask_from_map", "spherical_mask", "lowpass_map", "mask_from_ground_truth"]


def soft_mask_from_map(
    volume: np.ndarray, threshold: float | None = None, dilate_px: float = 3.0, soft_edge_px: float = 4.0
) -> np.ndarray:
    """A soft mask around the density of ``volume``.

    Args:
        volume: ``(D, D, D)`` map.
        threshold: density level defining the molecule; ``None`` uses 10 % of the map's maximum,
            a default suited to noise-free simulated maps (give a level for real maps).
        dilate_px: binary dilation radius in voxels (a sphere), to include side chains and
            flexible surface the threshold cut off.
        soft_edge_px: width of the raised-cosine fall-off from 1 to 0 outside the dilated region.

    Returns:
        ``(D, D, D)`` float32 mask in [0, 1].
    """
    vol = np.asarray(volume, dtype=np.float32)
    if threshold is None:
        threshold = 0.1 * float(vol.max())
    binary = vol > threshold
    if not binary.any():
        raise ValueError(f"soft_mask_from_map: no voxel above threshold {threshold:g}")
    # The distance to the thresholded region drives both the dilation and the soft edge.
    dist = ndimage.distance_transform_edt(~binary)
    mask = np.zeros_like(vol)
    mask[dist <= dilate_px] = 1.0
    edge = (dist > dilate_px) & (dist <= dilate_px + soft_edge_px)
    if soft_edge_px > 0:
        mask[edge] = 0.5 * (1 + np.cos(np.pi * (dist[edge] - dilate_px) / soft_edge_px))
    return mask.astype(np.float32)


def spherical_mask(box_size: int, radius_px: float, soft_edge_px: float = 0.0, ndim: int = 3) -> np.ndarray:
    """A (soft) sphere or circle centred at ``box_size // 2`` (RELION's box centre).

    Returns ``(box,)*ndim`` float32 in [0, 1]: 1 inside ``radius_px``, a raised cosine to 0 over
    ``soft_edge_px`` beyond it.
    """
    coords = np.arange(box_size, dtype=np.float32) - box_size // 2
    grids = np.meshgrid(*([coords] * ndim), indexing="ij")
    r = np.sqrt(sum(g * g for g in grids))
    mask = (r <= radius_px).astype(np.float32)
    if soft_edge_px > 0:
        edge = (r > radius_px) & (r <= radius_px + soft_edge_px)
        mask[edge] = 0.5 * (1 + np.cos(np.pi * (r[edge] - radius_px) / soft_edge_px))
    return mask


def lowpass_map(volume: np.ndarray, pixel_size: float, resolution_angstrom: float) -> np.ndarray:
    """``volume`` with a Gaussian low-pass whose amplitude falls to 1/2 at ``resolution_angstrom``."""
    vol = np.asarray(volume, dtype=np.float32)
    k = [np.fft.fftfreq(n, d=pixel_size) for n in vol.shape[:-1]] + [np.fft.rfftfreq(vol.shape[-1], d=pixel_size)]
    k2 = sum(np.meshgrid(*[x**2 for x in k], indexing="ij", sparse=True))
    sigma2 = (1.0 / resolution_angstrom) ** 2 / (2 * np.log(2))
    filtered = np.fft.irfftn(np.fft.rfftn(vol) * np.exp(-k2 / (2 * sigma2)), s=vol.shape)
    return filtered.astype(np.float32)


def mask_from_ground_truth(
    volume: np.ndarray,
    pixel_size: float,
    resolution_angstrom: float = 15.0,
    threshold_fraction: float = 0.1,
    dilate_px: float = 3.0,
    soft_edge_px: float = 4.0,
) -> np.ndarray:
    """A soft mask for an entry that ships none, built from its ground-truth reconstruction.

    The map is low-passed to ``max(resolution_angstrom, 3·pixel_size)`` first so that noise does not
    punch holes in the threshold (as ``relion_mask_create --lowpass``), then thresholded at
    ``threshold_fraction`` of its maximum, dilated and given a soft edge (:func:`soft_mask_from_map`).
    """
    smooth = lowpass_map(volume, pixel_size, max(resolution_angstrom, 3 * pixel_size))
    return soft_mask_from_map(
        smooth, threshold=threshold_fraction * float(smooth.max()), dilate_px=dilate_px, soft_edge_px=soft_edge_px
    )
