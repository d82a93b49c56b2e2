"""The CPU kernels of the torch reconstructor, compiled by numba: trilinear splatting of rotated
central slices into the bricked Fourier accumulator of :mod:`cryopose.reconstruct`, and the two
element-wise passes of each density-compensation iteration.

Why a kernel of its own: written with torch operations the splatting builds a dozen temporaries per
slice point and a scatter (``index_add_``) that serialises its writes; this loop computes each
point's eight corners and adds them in place, ~10× faster on the same cores (benchmarks/README.md,
"Reconstruction"). ``torch-projectors`` (a native back-projector) was the library to try first, but
its wheels are built against an older torch and do not load beside torch 2.14 (undefined symbols).

Threads own planes, not particles: thread ``t`` of ``T`` adds only the corners that fall in the
accumulator's z-planes ``z`` with ``(z // 4) % T == t`` (one brick of planes each in turn), and every
thread walks every slice point. No two threads write the same voxel, so there are no atomics, no
per-thread copies of the volume (memory stays one accumulator whatever ``T``), and the sums are added
in the same order whatever ``T``: the accumulated sums are identical bit for bit on 1 or 32 threads. The price
is that each thread rotates every point (six multiply-adds before it can skip one), small beside
the eight corner writes of the points it keeps.

On a GPU the reconstructor keeps torch's ``index_add_``, whose atomic adds are what GPUs are fast at.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import types

import numba
import numpy as np
import torch

__all__ = [
    "slice_values",
    "splat_slices",
    "kernel_threads",
    "using_threads",
    "weighted_inverse",
    "divide_by_magnitude",
    "multiply_radial",
]

_BRICK_PLANES = 4  # the z-extent of the accumulator's bricks (cryopose.reconstruct._BRICK)

# numba would pick its OpenMP threading layer (torch loads libgomp), whose threads spin after each
# parallel loop: beside a busy core (any Snakemake run) that spinning takes the other job's core,
# and a 1-thread evaluation took 10.8 s instead of 2 s. The workqueue layer's threads sleep; a
# user's NUMBA_THREADING_LAYER still wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
# The workqueue layer aborts when two Python threads enter a parallel kernel at once: parallel
# calls are serialised by this lock. One-thread calls run a serial build of the same kernel, which
# never enters the layer, so that evaluate(jobs=2) can reconstruct the two halves side by side,
# one core each, without waiting for each other.
_LOCK = threading.Lock()
_SETTING = threading.local()


class _Kernel:
    """One kernel, built twice by numba: ``parallel=True`` (``numba.prange`` spread over threads) and
    serial (the same loops, ``prange`` as ``range``). Calling it runs the build that
    :func:`kernel_threads` asks for."""

    def __init__(self, fn):
        self.parallel = numba.njit(parallel=True, cache=True, nogil=True)(fn)
        # A copy under its own name: numba's cache names its files after the function, so the two
        # builds must not share a name.
        serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
        serial.__qualname__ = fn.__qualname__ + "_serial"
        self.serial = numba.njit(cache=True, nogil=True)(serial)

    def __call__(self, *args, threads: int | None = None) -> None:
        threads = threads or kernel_threads()
        if threads == 1:
            self.serial(*args)
            return
        with _LOCK:
            previous = numba.get_num_threads()
            numba.set_num_threads(threads)
            try:
                self.parallel(*args)
            finally:
                numba.set_num_threads(previous)


def kernel_threads() -> int:
    """Threads the CPU kernels (and the reconstructor's FFTs) use in the calling thread: its
    :func:`using_threads` setting, else torch's (``OMP_NUM_THREADS`` under Snakemake); at most
    numba's pool."""
    wanted = getattr(_SETTING, "threads", None) or torch.get_num_threads()
    return max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))


@contextlib.contextmanager
def using_threads(threads: int | None):
    """Within the block, the calling thread's kernels use ``threads`` threads (``None``: torch's).
    Per thread: e.g. two reconstructions in two threads, one each."""
    previous = getattr(_SETTING, "threads", None)
    _SETTING.threads = threads
    try:
        yield
    finally:
        _SETTING.threads = previous


@numba.njit(inline="always")
def _add_corner(accumulator, k, c0, c1, c2, w):  # pragma: no cover - jit
    accumulator[k, 0] += c0 * w
    accumulator[k, 1] += c1 * w
    accumulator[k, 2] += c2 * w


@numba.njit(inline="always")
def _add_plane(accumulator, zo, wz, rows, columns, c0, c1, c2):  # pragma: no cover - jit
    """The four corners of one z-plane (offset ``zo``, weight ``wz``): rows ``(y0, y1, wy0, wy1)``
    and columns ``(x0, x1, wx0, wx1)`` as offsets and weights."""
    y0, y1, wy0, wy1 = rows
    x0, x1, wx0, wx1 = columns
    w = wz * wy0
    _add_corner(accumulator, zo + y0 + x0, c0, c1, c2, w * wx0)
    _add_corner(accumulator, zo + y0 + x1, c0, c1, c2, w * wx1)
    w = wz * wy1
    _add_corner(accumulator, zo + y1 + x0, c0, c1, c2, w * wx0)
    _add_corner(accumulator, zo + y1 + x1, c0, c1, c2, w * wx1)


@_Kernel
def _splat_kernel(points, rotmats, channels, accumulator, zt, yt, xt, owner, p, threads):  # pragma: no cover - jit
    """points (M, 2) float32 slice (k_x, k_y) in padded voxels; rotmats (B, 3, 3) float32; channels
    (B, M, 3) float32; accumulator (N, 3) float32, added to in place; zt, yt, xt the per-axis
    bricked offsets and owner the owning thread of each z table row (int64, rows = coordinate +
    p//2 + 1)."""
    # The eight corners are written out, not looped over with a branch per corner: 30 % faster on
    # one thread, 22 % on two (benchmarks/README.md), with the same products in the same order.
    off = p // 2 + 1
    h = p // 2 + 1
    n_b = rotmats.shape[0]
    n_m = points.shape[0]
    for t in numba.prange(threads):
        for b in range(n_b):
            r00, r01 = rotmats[b, 0, 0], rotmats[b, 0, 1]
            r10, r11 = rotmats[b, 1, 0], rotmats[b, 1, 1]
            r20, r21 = rotmats[b, 2, 0], rotmats[b, 2, 1]
            for m in range(n_m):
                kx = points[m, 0]
                ky = points[m, 1]
                x = r00 * kx + r01 * ky
                z = r20 * kx + r21 * ky
                flip = x < 0  # the other half of the transform: the Friedel mate, conjugated
                if flip:
                    x = -x
                    z = -z
                fz = np.floor(z)
                iz = np.int64(fz) + off
                own0 = owner[iz] == t
                own1 = owner[iz + 1] == t
                if not (own0 or own1):
                    continue
                y = r10 * kx + r11 * ky
                c1 = channels[b, m, 1]
                if flip:
                    y = -y
                    c1 = -c1
                fy = np.floor(y)
                fx = np.floor(x)
                iy = np.int64(fy) + off
                ix = np.int64(fx) + off
                dz = z - fz
                dy = y - fy
                dx = x - fx
                wx1 = dx if ix + 1 < h + off else np.float32(0.0)  # x = p/2 + 1 is not stored
                wx0 = np.float32(1.0) - dx
                wy0 = np.float32(1.0) - dy
                c0 = channels[b, m, 0]
                c2 = channels[b, m, 2]
                y0, y1 = yt[iy], yt[iy + 1]
                x0, x1 = xt[ix], xt[ix + 1]
                rows = (y0, y1, wy0, dy)
                columns = (x0, x1, wx0, wx1)
                if own0:
                    _add_plane(accumulator, zt[iz], np.float32(1.0) - dz, rows, columns, c0, c1, c2)
                if own1:
                    _add_plane(accumulator, zt[iz + 1], dz, rows, columns, c0, c1, c2)


@_Kernel
def _slice_values(ft, ctf, shifts, weights, iy, ix, out):  # pragma: no cover - jit
    n_b, n, h = ft.shape
    for b in numba.prange(n_b):
        # The re-centring phase ramp is separable: h + n exponentials per particle, not one per point.
        ramp_x = np.empty(h, np.complex128)
        ramp_y = np.empty(n, np.complex128)
        for j in range(h):
            a = -2.0 * math.pi * shifts[b, 0] * j / n
            ramp_x[j] = complex(math.cos(a), math.sin(a))
        for j in range(n):
            a = -2.0 * math.pi * shifts[b, 1] * (j if j < n // 2 else j - n) / n
            ramp_y[j] = complex(math.cos(a), math.sin(a))
        w = weights[b]
        for m in range(iy.size):
            y, x = iy[m], ix[m]
            c = ctf[b, y, x]
            value = ft[b, y, x] * ramp_x[x] * ramp_y[y] * (c * w)
            out[b, m, 0] = value.real
            out[b, m, 1] = value.imag
            out[b, m, 2] = c * c * w


def slice_values(
    ft: torch.Tensor, ctf: torch.Tensor, shifts: torch.Tensor, weights: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor
) -> torch.Tensor:
    """The channels :func:`splat_slices` inserts, for the slice points ``(iy[m], ix[m])`` of each image.

    Args:
        ft: ``(B, n, n//2+1)`` complex64 ``rfft2`` of the images (box centre at the origin).
        ctf: ``(B, n, n//2+1)`` float32 CTFs on the same grid.
        shifts: ``(B, 2)`` origins in pixels (x, y): each image is shifted by +origin.
        weights: ``(B,)`` per-particle weights w.
        iy, ix: ``(M,)`` row (FFT order) and column of each slice point.

    Returns:
        ``(B, M, 3)`` float32: Re and Im of ``w·CTF·F·e^{−2πi k·origin/n}``, and ``w·CTF²``.
    """
    out = np.empty((ft.shape[0], iy.shape[0], 3), dtype=np.float32)
    args = (
        np.ascontiguousarray(ft.numpy(), dtype=np.complex64),
        np.ascontiguousarray(ctf.numpy(), dtype=np.float32),
        np.ascontiguousarray(shifts.numpy(), dtype=np.float64),
        np.ascontiguousarray(weights.numpy(), dtype=np.float32),
        iy.numpy().astype(np.int64),
        ix.numpy().astype(np.int64),
        out,
    )
    _slice_values(*args)
    return torch.from_numpy(out)


def splat_slices(
    points: torch.Tensor,
    rotmats: torch.Tensor,
    channels: torch.Tensor,
    accumulator: torch.Tensor,
    zt: torch.Tensor,
    yt: torch.Tensor,
    xt: torch.Tensor,
    p: int,
) -> None:
    """Trilinear splatting of slice values into the bricked accumulator, in place (CPU tensors).

    Same contract as :func:`cryopose.reconstruct._splat`: ``points`` ``(M, 3)`` slice coordinates in
    padded voxels (the third is 0); ``rotmats`` ``(B, 3, 3)`` (``g·R``); ``channels`` ``(B, M, 3)``
    (Re, Im of w·CTF·F, and w·CTF²); ``accumulator`` ``(N, 3)`` float32; ``zt, yt, xt`` the
    per-axis offset tables of :func:`cryopose.reconstruct._axis_offsets`.
    """
    threads = kernel_threads()
    planes = torch.arange(-(p // 2) - 1, p // 2 + 2) % p
    owner = ((planes // _BRICK_PLANES) % threads).numpy().astype(np.int64)
    pts = np.ascontiguousarray(points[:, :2].numpy(), dtype=np.float32)
    rot = np.ascontiguousarray(rotmats.numpy(), dtype=np.float32)
    ch = np.ascontiguousarray(channels.numpy(), dtype=np.float32)
    acc = accumulator.numpy()  # a view: the kernel adds into the torch tensor's memory
    tables = [t.numpy().astype(np.int64) for t in (zt, yt, xt)]
    _splat_kernel(pts, rot, ch, acc, *tables, owner, p, threads, threads=threads)


# Density compensation (cryopose.reconstruct._finish_relion): each of its ten iterations is two
# FFTs of the padded grid and a few element-wise passes; written with torch operations those passes
# cost more than the FFTs (each a full sweep, several allocating a temporary of the grid's size).
# Fused here, one sweep each and no allocation.


@_Kernel
def _weighted_inverse(inverse, weight, out):  # pragma: no cover - jit
    flat_u, flat_w, flat_out = inverse.reshape(-1), weight.reshape(-1), out.reshape(-1)
    for i in numba.prange(flat_u.size):
        flat_out[i] = np.complex64(flat_u[i] * flat_w[i])


@_Kernel
def _divide_by_magnitude(inverse, spectrum, floor):  # pragma: no cover - jit
    flat_u, flat_s = inverse.reshape(-1), spectrum.reshape(-1)
    for i in numba.prange(flat_u.size):
        # |s| as glibc's hypotf forms it (in double, rounded once to float), without its call
        re, im = np.float64(flat_s[i].real), np.float64(flat_s[i].imag)
        magnitude = np.float32(math.sqrt(re * re + im * im))
        flat_u[i] /= magnitude if magnitude > floor else floor


@_Kernel
def _multiply_radial(grid, table, z_start):  # pragma: no cover - jit
    n_z, p = grid.shape[0], grid.shape[1]
    half = p // 2
    for zi in numba.prange(n_z):
        z = np.int64(zi) + z_start  # prange's index may be unsigned, and unsigned - signed is a float in numba
        fz = z if z < half else z - p
        for y in range(p):
            fy = y if y < half else y - p
            base = fz * fz + fy * fy
            for x in range(p):
                fx = x if x < half else x - p
                grid[zi, y, x] *= table[base + fx * fx]


def multiply_radial(grid: torch.Tensor, table: torch.Tensor, z_start: int = 0) -> None:
    """``grid[z, y, x] *= table[k_z² + k_y² + k_x²]`` in place, with ``k`` each index's FFT-order
    integer frequency: a radial function applied from a table of its values at integer squared
    radii, so that no ``(p, p, p)`` copy of it is stored. ``grid`` ``(n, p, p)`` float32, contiguous:
    planes ``z_start .. z_start + n − 1`` of the ``(p, p, p)`` grid; ``table`` float32 of length
    ``3·(p//2)² + 1``."""
    _multiply_radial(grid.numpy(), table.numpy(), z_start)


def weighted_inverse(inverse: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """``out = u·W`` as complex64 (zero imaginary parts): ``inverse`` float64, ``weight`` float32,
    ``out`` complex64, all of one shape, contiguous, on the CPU."""
    _weighted_inverse(inverse.numpy(), weight.numpy(), out.numpy())


def divide_by_magnitude(inverse: torch.Tensor, spectrum: torch.Tensor, floor: float = 1e-6) -> None:
    """``u ← u / max(|spectrum|, floor)`` in place (``inverse`` float64, ``spectrum`` complex64)."""
    _divide_by_magnitude(inverse.numpy(), spectrum.numpy(), floor)
