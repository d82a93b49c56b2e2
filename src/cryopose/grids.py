"""HEALPix grids on the sphere and on SO(3), and nearest-cell labels with symmetry.

The SO(3) grid of order ``k`` (Yershova et al. 2010, as used by Image2Sphere) pairs the
``12·4^k`` HEALPix pixel centres of ``nside = 2^k`` (the viewing direction: tilt = colatitude,
rot = longitude) with ``6·2^k`` equally spaced in-plane angles psi: ``72·8^k`` rotations in all,
here in RELION's convention ``R = Rz(rot)·Ry(tilt)·Rz(psi)`` (:mod:`cryopose.geometry`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .geometry import euler_to_matrix, matrix_to_quaternion
from .symmetry import symmetry_matrices

__all__ = [
    "so3_grid_size",
    "so3_healpix_grid",
    "nearest_grid_index",
    "symmetric_grid_target",
    "symmetric_grid_cells",
    "target_from_cells",
    "grid_quaternions_of",
]


def so3_grid_size(order: int) -> int:
    """Number of rotations of the SO(3) HEALPix grid of ``order``: ``72·8^order``."""
    return 72 * 8**order


@functools.cache
def _grid_float64(order: int) -> torch.Tensor:
    import healpy as hp

    if order < 0:
        raise ValueError(f"grid order must be >= 0, got {order}")
    nside = 2**order
    tilt, rot = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)), nest=True)
    psi = np.linspace(0.0, 2 * np.pi, 6 * nside, endpoint=False)
    angles = np.stack([np.repeat(rot, psi.size), np.repeat(tilt, psi.size), np.tile(psi, rot.size)], -1)
    return euler_to_matrix(torch.tensor(np.degrees(angles)))


def so3_healpix_grid(order: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``(72·8^order, 3, 3)`` rotation matrices, viewing direction major (HEALPix NESTED pixel
    order), psi minor. Built once per order and cached."""
    return _grid_float64(order).to(dtype=dtype, device=device)


def nearest_grid_index(
    rotmats: torch.Tensor, grid: torch.Tensor, chunk_size: int = 1024, grid_quaternions: torch.Tensor | None = None
) -> torch.Tensor:
    """Index of the grid rotation nearest (in geodesic angle) to each rotation.

    The geodesic angle is monotone in ``|⟨q, q_g⟩|`` of unit quaternions, so the nearest cell is
    one matrix product and an argmax per chunk.

    Args:
        rotmats: ``(N, 3, 3)``.
        grid: ``(G, 3, 3)`` (e.g. :func:`so3_healpix_grid`).
        grid_quaternions: ``(G, 4)`` float64, :func:`grid_quaternions` of ``grid``, when a caller
            looks up many batches on one grid (converting 36,864 matrices per call costs more than
            the lookup itself).

    Returns:
        ``(N,)`` int64 indices into ``grid``.
    """
    q_grid = grid_quaternions if grid_quaternions is not None else grid_quaternions_of(grid)
    q = matrix_to_quaternion(torch.as_tensor(rotmats).double())
    out = [(q[i : i + chunk_size] @ q_grid.T).abs().argmax(-1) for i in range(0, q.shape[0], chunk_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def grid_quaternions_of(grid: torch.Tensor) -> torch.Tensor:
    """``(G, 4)`` float64 unit quaternions of the grid rotations ``(G, 3, 3)`` (for :func:`nearest_grid_index`)."""
    return matrix_to_quaternion(grid.double())


def symmetric_grid_target(rotmats: torch.Tensor, grid: torch.Tensor, symmetry: str) -> torch.Tensor:
    """Training targets over the grid: ``1/|G|`` on the cell of each symmetry mate ``g·R``.

    Poses related by the map's symmetry are indistinguishable, so the target spreads evenly over
    the mates; the mates are ``g·R`` (left multiplication, in this package's convention where R
    maps image coordinates into the volume). Mates falling in one cell add up.

    Args:
        rotmats: ``(N, 3, 3)`` ground-truth poses.
        grid: ``(M, 3, 3)``.
        symmetry: point group.

    Returns:
        ``(N, M)`` float32, each row summing to 1. (Dense: size it to a batch, not a dataset.)
    """
    return target_from_cells(symmetric_grid_cells(rotmats, grid, symmetry), grid.shape[0])


def symmetric_grid_cells(
    rotmats: torch.Tensor, grid: torch.Tensor, symmetry: str, grid_quaternions: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N, |G|)`` int64: the grid cell of each symmetry mate ``g·R`` (the sparse form of
    :func:`symmetric_grid_target`, small enough to keep for a whole validation set; the training
    loss reads the target through these cells, see :func:`cryopose.methods.image2sphere.training.weighted_loss`).
    ``grid_quaternions``: optional :func:`grid_quaternions_of` ``grid``, computed once by the caller."""
    rotmats = torch.as_tensor(rotmats).double()
    ops = symmetry_matrices(symmetry)
    mates = (ops[None] @ rotmats[:, None]).reshape(-1, 3, 3)  # (N·|G|, 3, 3): g·R
    return nearest_grid_index(mates, grid, grid_quaternions=grid_quaternions).reshape(rotmats.shape[0], ops.shape[0])


def target_from_cells(cells: torch.Tensor, n_cells: int) -> torch.Tensor:
    """``(N, n_cells)`` float32 targets, ``1/|G|`` on each of the ``cells (N, |G|)`` (mates in one cell add up)."""
    target = torch.zeros(cells.shape[0], n_cells, dtype=torch.float32, device=cells.device)
    return target.scatter_add_(1, cells, torch.full(cells.shape, 1.0 / cells.shape[1], device=cells.device))
