"""Half-map reconstruction from particles and poses: RELION's ``relion_reconstruct`` or a PyTorch
direct Fourier inversion.

Both backends read a RELION 3.1 particle STAR file (poses, origins, CTF, optional
rlnParticleFigureOfMerit weights) and its stacks, and return ``(map[D, D, D], pixel_size)``.

The torch backend accumulates, on a Fourier grid padded ``pad`` times,

    D(k) = Σ_i Σ_g w_i CTF_i(k_i) F_i(k_i),    W(k) = Σ_i Σ_g w_i CTF_i(k_i)²

where each particle i's Fourier transform F_i, re-centred by its origin, is inserted as the
central slice rotated by ``g·R_i`` for every operator g of the symmetry group (trilinear
splatting into an accumulator stored in 4³-voxel bricks, so that the eight corners of neighbouring
slice points share cache lines: on the CPU by the numba kernel of :mod:`cryopose.reconstruct_kernels`, on a
GPU by one ``index_add_`` per batch) and w_i are the per-particle weights.
How the slices are sampled and how D is divided by W is the ``scheme``:

* ``"relion"`` (the default of :func:`reconstruct_torch`): ``relion_reconstruct --ctf --pad P``
  of RELION 3.1 (``BackProjector::reconstruct`` without ``--fsc``), step by step. Each image is
  transformed at its own size S and its S² coefficients are splatted ``pad`` voxels apart (no
  real-space padding) with the DC term zeroed; D is multiplied by inverse weights found by ten
  iterations of Pipe & Menon's density compensation (the weights u with
  ``(u·W) ⊛ blob ≈ 1``, blob = Kaiser-Bessel of order 0, radius 3.8 padded voxels, α = 15) inside
  the Nyquist sphere, and nothing else: no Wiener or τ² term. The inverse transform is windowed to
  the box, replaced outside the inscribed sphere by its mean there (3-voxel raised-cosine edge,
  ``softMaskOutsideMap``), then divided by the radial trilinear correction sinc²(r/(pad·S)).
  RELION symmetrises the accumulated grid by trilinear interpolation; this backend inserts each
  slice at every ``g·R`` instead: its half-maps correlate with relion_reconstruct's at PCC
  0.997-0.999 on noisy simulated 64 px entries, C1 and C4, as closely as RELION's own maps do
  after a 1e-5° change of the poses.
* ``"wiener"``: each image is zero-padded to ``pad·S`` in real space, so the slices are
  sampled on every voxel, and ``V̂ = D / (W + λ)`` with λ a small Wiener constant relative to the
  mean W (``wiener``); the inverse transform is divided by the separable sinc² of the trilinear
  kernel and cropped. Its half-maps are less noisy than RELION's (the images' periodic copies and
  the smoothed weights of the "relion" scheme add noise): on a noisy simulated entry (64 px,
  SNR 0.1, 3,000 particles a half) its masked PCC(GT0, GT1) is 0.035 (C4) to 0.074 (C1) higher,
  so its metrics are not RELION's. It is the map :func:`write_half_map` gives reference-based
  methods.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import io
from .ctf import ctf_from_parameters, ctf_parameters
from .device import select_device
from .errors import InputError
from .geometry import euler_to_matrix
from .predictions import EULER, ORIGIN
from .reconstruct_kernels import (
    divide_by_magnitude,
    kernel_threads,
    multiply_radial,
    slice_values,
    splat_slices,
    using_threads,
    weighted_inverse,
)
from .symmetry import symmetry_matrices

__all__ = [
    "reconstruct",
    "reconstruct_torch",
    "reconstruct_relion",
    "insert_particles",
    "RelionNotFound",
    "relion_command",
    "write_half_map",
    "SCHEMES",
    "DEFAULT_SCHEME",
    "KERNELS",
]


class RelionNotFound(InputError):
    """The configured RELION program cannot be run."""


def _slice_points(p: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the padded image's rfft2 coefficients inside the Nyquist circle, without the
    Friedel duplicates of the k_x = 0 column (k_y < 0), and their (k_x, k_y, 0) in index units.
    The same for every batch: built once per size and device (callers only read them)."""
    return _slice_points_cached(p, str(device))


@functools.lru_cache(maxsize=8)
def _slice_points_cached(p: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    ky = torch.fft.fftfreq(p, device=device) * p
    kx = torch.fft.rfftfreq(p, device=device) * p
    kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
    mask = (kxx**2 + kyy**2 <= (p / 2) ** 2) & ~((kxx == 0) & (kyy < 0))
    pts = torch.stack([kxx[mask], kyy[mask], torch.zeros_like(kxx[mask])], -1)
    return mask, pts


_BRICK = 4  # accumulator bricks of 4³ voxels: a slice's trilinear corners stay in cache (≈3× faster)


def accumulator_shape(p: int) -> tuple[int, int, int]:
    """Storage extent ``(z, y, x)`` of the accumulator of a padded size ``p``: ``(p, p, p//2+1)``
    rounded up to whole bricks."""
    up = lambda n: -(-n // _BRICK) * _BRICK  # noqa: E731
    return up(p), up(p), up(p // 2 + 1)


def _axis_offsets(p: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis parts of a voxel's bricked flat index: ``flat(z, y, x) = Z[z] + Y[y] + X[x]``
    (built once per size and device; callers only read them).

    Tables are indexed by ``coordinate + p//2 + 1`` for coordinates in ``[-p//2 - 1, p//2 + 1]``;
    z and y wrap modulo ``p`` (FFT order), x is clamped to the last stored column."""
    return _axis_offsets_cached(p, str(device))


@functools.lru_cache(maxsize=8)
def _axis_offsets_cached(p: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, ny, nx = accumulator_shape(p)
    b = _BRICK
    v = torch.arange(-(p // 2) - 1, p // 2 + 2, device=device)
    z = v % p
    x = v.clamp(0, p // 2)
    brick = b * b * b
    zt = (z // b) * (ny // b) * (nx // b) * brick + (z % b) * b * b
    yt = (z // b) * (nx // b) * brick + (z % b) * b
    xt = (x // b) * brick + x % b
    # int32 halves the traffic of the index arithmetic (accumulators stay far below 2³¹ voxels);
    # the scatter itself takes int64 (its int32 path is several times slower).
    return zt.int(), yt.int(), xt.int()


def _unbrick(accumulator: torch.Tensor, p: int) -> torch.Tensor:
    """``(N, C)`` bricked accumulator → ``(C, p, p, p//2+1)``."""
    nz, ny, nx = accumulator_shape(p)
    b = _BRICK
    c = accumulator.shape[-1]
    grid = accumulator.reshape(nz // b, ny // b, nx // b, b, b, b, c).permute(6, 0, 3, 1, 4, 2, 5)
    return grid.reshape(c, nz, ny, nx)[:, :p, :p, : p // 2 + 1]


def _unbrick_channel(accumulator: torch.Tensor, channel: int, p: int) -> torch.Tensor:
    """One channel of the bricked accumulator as a contiguous ``(p, p, p//2+1)`` grid (one
    channel's copy at a time: a third of the memory of unbricking all three)."""
    return _unbrick(accumulator[:, channel : channel + 1], p)[0].contiguous()


#: The torch backend's reconstruction schemes (module docstring), and the one it uses unless told:
#: a cache of torch-backend maps must record the scheme, as maps of the two differ.
SCHEMES = ("relion", "wiener")
DEFAULT_SCHEME = "relion"


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise InputError(f"unknown reconstruction scheme {scheme!r}; expected 'relion' or 'wiener'", where="scheme")


_POINTS_PER_SCATTER = 1 << 17

#: How :func:`insert_particles` splats (``kernel``): ``"numba"``, the CPU kernel of
#: :mod:`cryopose.reconstruct_kernels`; ``"torch"``, torch operations and one ``index_add_`` per chunk (any
#: device: the GPU's path, and the CPU reference the kernel is tested against); ``"torch-compile"``,
#: the same fused by ``torch.compile`` (CPU; needs a C++ compiler and ~20 s to build; kept so that
#: benchmarks/reconstruct_speed.py can compare the three).
KERNELS = ("numba", "torch", "torch-compile")
# Pixels per insertion batch when no batch size is given: each batch costs a fixed few milliseconds
# (a parallel kernel launch, its threads' uneven share of the planes, small tensor operations), so
# small images go in larger batches: 512 of 64², 128 of 128² (20,000 × 64²: 2.9 s → 2.0 s).
_BATCH_PIXELS = 1 << 21
_MIN_BATCH = 128


def default_kernel(device) -> str:
    """``"numba"`` on the CPU, ``"torch"`` elsewhere (a GPU's atomic adds are its fast scatter)."""
    return "numba" if torch.device(device).type == "cpu" else "torch"


def _splat(
    points: torch.Tensor,
    rotmats: torch.Tensor,
    channels: torch.Tensor,
    accumulator: torch.Tensor,
    zt: torch.Tensor,
    yt: torch.Tensor,
    xt: torch.Tensor,
    p: int,
) -> None:
    """Trilinear splatting of slice values into the bricked accumulator, in place.

    ``points``: ``(M, 3)`` slice coordinates (index units); ``rotmats``: ``(b, 3, 3)`` (``g·R``);
    ``channels``: ``(b, M, 3)`` (Re, Im of w·CTF·F, and w·CTF²); ``zt, yt, xt``:
    :func:`_axis_offsets` tables.
    """
    h = p // 2 + 1
    coords = points @ rotmats.transpose(-1, -2)  # (b, M, 3) x, y, z
    flip = coords[..., 0] < 0  # the other half of the transform: use the Friedel mate (conjugate)
    coords = torch.where(flip[..., None], -coords, coords)
    channels = torch.stack(
        [channels[..., 0], torch.where(flip, -channels[..., 1], channels[..., 1]), channels[..., 2]], -1
    )
    base = torch.floor(coords)
    frac = coords - base
    i0 = base.int() + (p // 2 + 1)  # table rows of the lower corner
    # The 8 corners as (z, y, x) = (2, 2, 2) broadcasts of separable table lookups and weights.
    fx, fy, fz = frac.unbind(-1)
    wx = torch.stack([1 - fx, fx * (i0[..., 0] + 1 < h + p // 2 + 1)], -1)  # x = P/2 + 1: weight 0
    wy = torch.stack([1 - fy, fy], -1)
    wz = torch.stack([1 - fz, fz], -1)
    corner_weight = wz[..., :, None, None] * (wy[..., None, :, None] * wx[..., None, None, :])
    iz = zt[torch.stack([i0[..., 2], i0[..., 2] + 1], -1)]
    iy = yt[torch.stack([i0[..., 1], i0[..., 1] + 1], -1)]
    ix = xt[torch.stack([i0[..., 0], i0[..., 0] + 1], -1)]
    flat = iz[..., :, None, None] + (iy[..., None, :, None] + ix[..., None, None, :])
    # All 8 corners of a point side by side in one scatter: neighbouring writes share bricks.
    accumulator.index_add_(
        0,
        flat.reshape(-1).long(),
        (channels[..., None, :] * corner_weight.reshape(*channels.shape[:-1], 8, 1)).reshape(-1, 3),
    )


@functools.cache
def _compiled_splat():
    """:func:`_splat` fused into one parallel loop by ``torch.compile`` (built once per process)."""
    return torch.compile(_splat, dynamic=False)


def insert_particles(
    images: torch.Tensor,
    rotmats: torch.Tensor,
    origins_px: torch.Tensor,
    ctf: torch.Tensor,
    weights: torch.Tensor,
    symmetry_ops: torch.Tensor,
    pad: int,
    accumulator: torch.Tensor | None = None,
    kernel: str | None = None,
    scheme: str = DEFAULT_SCHEME,
) -> torch.Tensor:
    """Insert a batch of particles into a padded 3D Fourier accumulator (trilinear splatting).

    Args:
        images: ``(B, S, S)`` particle images (box centre ``S//2``).
        rotmats: ``(B, 3, 3)`` poses R (see :mod:`cryopose.geometry`): the image frequency
            ``(k_x, k_y)`` lands at ``g·R·(k_x, k_y, 0)`` of the map's transform.
        origins_px: ``(B, 2)`` RELION origins in pixels (the image is shifted by +origin).
        ctf: ``(B, P, P//2+1)`` CTF at the padded size ``P = pad·S`` (``rfft2`` layout), or ones;
            with ``scheme="relion"`` ``(B, S, S//2+1)`` at the image size.
        weights: ``(B,)`` per-particle weights.
        symmetry_ops: ``(G, 3, 3)`` rotations g; each particle is inserted at every ``g·R``.
        pad: integer padding factor.
        accumulator: ``(prod(accumulator_shape(P)), 3)`` float32 to add to (real and imaginary parts
            of Σ w·CTF·F, and Σ w·CTF², over z, y in FFT order and x ≥ 0, stored in bricks of
            4³ voxels), or ``None`` to start one.
        kernel: one of :data:`KERNELS`; ``None``: :func:`default_kernel` of the images' device.
        scheme: ``"wiener"``: the image is zero-padded to ``P`` and its ``P²`` coefficients inserted
            one voxel apart; ``"relion"``: as ``relion_reconstruct``, its own ``S²`` coefficients
            (DC set to 0) are inserted ``pad`` voxels apart (module docstring).

    Returns:
        The accumulator.
    """
    _check_scheme(scheme)
    return _insert_spectra(
        _image_spectra(images, pad, scheme),
        images.shape[-1],
        rotmats,
        origins_px,
        ctf,
        weights,
        symmetry_ops,
        pad,
        accumulator,
        kernel,
        scheme,
    )


def _image_spectra(images: torch.Tensor, pad: int, scheme: str) -> torch.Tensor:
    """``(B, n, n//2+1)`` complex64: the transforms :func:`insert_particles` inserts, of the
    ``(B, S, S)`` images centred at the origin; ``n = S`` (DC set to 0) with ``scheme="relion"``,
    else ``n = pad·S`` (zero-padded)."""
    if scheme == "relion":
        ft = torch.fft.rfft2(torch.fft.ifftshift(images.float(), dim=(-2, -1)))
        ft[:, 0, 0] = 0  # relion_reconstruct zeroes each image's DC term (its weight still counts)
        return ft
    s = images.shape[-1]
    p = pad * s
    extra = (p - s) // 2
    padded = F.pad(images.float(), (extra, p - s - extra, extra, p - s - extra))
    return torch.fft.rfft2(torch.fft.ifftshift(padded, dim=(-2, -1)))


def _insert_spectra(
    ft: torch.Tensor,
    s: int,
    rotmats: torch.Tensor,
    origins_px: torch.Tensor,
    ctf: torch.Tensor,
    weights: torch.Tensor,
    symmetry_ops: torch.Tensor,
    pad: int,
    accumulator: torch.Tensor | None,
    kernel: str | None,
    scheme: str,
) -> torch.Tensor:
    """:func:`insert_particles` of the images' :func:`_image_spectra` ``ft`` (box size ``s``)."""
    b = ft.shape[0]
    dev = ft.device
    kernel = kernel or default_kernel(dev)
    if kernel not in KERNELS or (kernel != "torch" and dev.type != "cpu"):
        raise InputError(
            f"kernel {kernel!r} on {dev.type}; expected one of {KERNELS} ('torch' off the CPU)", where="kernel"
        )
    p = pad * s
    n, spacing = (s, pad) if scheme == "relion" else (p, 1)  # relion: the image's own samples, pad voxels apart
    h = n // 2 + 1
    mask, pts = _slice_points(n, dev)
    if accumulator is None:
        accumulator = torch.zeros(int(np.prod(accumulator_shape(p))), 3, dtype=torch.float32, device=dev)
    zt, yt, xt = _axis_offsets(p, dev)
    iy = torch.remainder(pts[:, 1], n).long()
    ix = pts[:, 0].long()
    if kernel == "numba":  # the slice values in one pass, then the splatting (cryopose.reconstruct_kernels)
        channels = slice_values(ft, ctf.float(), origins_px, weights, iy, ix)
        pts = pts * spacing
        for g in symmetry_ops.to(device=dev, dtype=torch.float32):
            splat_slices(pts, g @ rotmats.float(), channels, accumulator, zt, yt, xt, p)
        return accumulator
    shift = origins_px.float()
    # Re-centre each particle: a shift by +origin is a phase ramp, separable in x and y, so two
    # short exponentials per particle and a gather replace one exponential per slice point.
    k = torch.fft.fftfreq(n, d=1.0 / n, device=dev)
    ramp_x = torch.exp(-2j * torch.pi * shift[:, 0, None] * k[None, :h].abs() / n)  # (B, h): k_x ≥ 0
    ramp_y = torch.exp(-2j * torch.pi * shift[:, 1, None] * k[None, :] / n)  # (B, n), FFT order
    pts = pts * spacing  # slice coordinates in voxels of the padded grid
    phase = ramp_y[:, iy] * ramp_x[:, ix]
    ctf_m = ctf.float()[:, mask]
    w = weights.float()[:, None]
    value = ft[:, mask] * phase * (ctf_m * w)
    weight = ctf_m * ctf_m * w
    channels = torch.stack([value.real, value.imag, weight], -1)  # (B, M, 3)
    compiled = kernel == "torch-compile"
    chunk = max(1, _POINTS_PER_SCATTER // pts.shape[0])  # particles per scatter: bounds the temporaries
    splat = _compiled_splat() if compiled else _splat
    for g in symmetry_ops.to(device=dev, dtype=torch.float32):
        rotated = g @ rotmats.float()
        for c0 in range(0, b, chunk):
            rot_c, ch_c = rotated[c0 : c0 + chunk], channels[c0 : c0 + chunk]
            if compiled and rot_c.shape[0] < chunk:  # one shape for the compiled kernel: pad with zeros
                missing = chunk - rot_c.shape[0]
                rot_c = torch.cat([rot_c, rot_c.new_zeros(missing, 3, 3)])
                ch_c = torch.cat([ch_c, ch_c.new_zeros(missing, *ch_c.shape[1:])])
            splat(pts, rot_c, ch_c, accumulator, zt, yt, xt, p)
    return accumulator


def _finish(holder: list[torch.Tensor], s: int, pad: int, wiener: float, scheme: str = DEFAULT_SCHEME) -> np.ndarray:
    """The map from the accumulator of :func:`insert_particles` (module docstring, ``scheme``).

    ``holder`` is a one-element list holding the accumulator, which is taken out of it and freed
    as soon as its three channels are copied out: the caller keeps no reference, so the
    accumulator does not live on through the Fourier steps (at 256 px, pad 2, it is 0.8 GB)."""
    _check_scheme(scheme)
    p = pad * s
    accumulator = holder.pop()
    # The x = 0 plane holds both members of Friedel pairs (k and −k): add each point's mate.
    mirror = lambda a: torch.roll(torch.flip(a, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    if scheme == "relion":
        # Single precision, channel by channel: the sums are float32 already, and the peak memory
        # must stay below relion_reconstruct's at real box sizes (benchmarks/README.md).
        num = torch.complex(_unbrick_channel(accumulator, 0, p), _unbrick_channel(accumulator, 1, p))
        den = _unbrick_channel(accumulator, 2, p)
        del accumulator
        num[..., 0] += mirror(num[..., 0]).conj()
        den[..., 0] += mirror(den[..., 0])
        return _finish_relion(num, den, s, pad)
    acc = _unbrick(accumulator, p).double()
    del accumulator
    num = torch.complex(acc[0], acc[1])
    den = acc[2].clone()
    del acc
    num[..., 0] = num[..., 0] + mirror(num[..., 0]).conj()
    den[..., 0] = den[..., 0] + mirror(den[..., 0])
    populated = den > 0
    lam = wiener * float(den[populated].mean()) if populated.any() else 1.0
    vol_ft = torch.where(populated, num / (den + lam), torch.zeros_like(num))
    vol = torch.fft.fftshift(torch.fft.irfftn(vol_ft, s=(p, p, p), dim=(-3, -2, -1)), dim=(-3, -2, -1))
    # Trilinear splatting blurs by a separable triangle: divide by its transform, sinc², per axis.
    c = torch.sinc(torch.fft.fftshift(torch.fft.fftfreq(p, dtype=torch.float64, device=vol.device))) ** 2
    vol = vol / (c[:, None, None] * c[None, :, None] * c[None, None, :])
    start = (p - s) // 2
    return vol[start : start + s, start : start + s, start : start + s].cpu().numpy().astype(np.float32)


# relion_reconstruct's defaults: --iter 10, --blob_r 1.9, --blob_a 15, --blob_m 0 (the blob radius
# is doubled for the padded grid whatever --pad is: BackProjector's tab_ftblob).
_RELION_ITERATIONS = 10
_SLAB = 16  # z-planes per slab of the padded grid in the Fourier steps (16 × 256² floats: 4 MB)
_RELION_BLOB_RADIUS = 2 * 1.9
_RELION_BLOB_ALPHA = 15.0


def _blob_transform(rval: torch.Tensor) -> torch.Tensor:
    """Fourier transform of RELION's order-0 Kaiser-Bessel blob at ``rval`` (cycles per padded
    voxel), normalised to 1 at 0, and 0 from 0.5 on (the extent of RELION's table).

    In 3D it is ∝ I_{3/2}(σ)/σ^{3/2} with σ = √(α² − (2π a r)²) (real here: 2π a r < α for
    r < 0.5), and I_{3/2}(σ)/σ^{3/2} = √(2/π)·(cosh σ − sinh σ / σ)/σ²."""
    a, alpha = _RELION_BLOB_RADIUS, _RELION_BLOB_ALPHA

    def f(sig: torch.Tensor) -> torch.Tensor:  # I_{3/2}(σ) / σ^{3/2}, up to a constant
        return (torch.cosh(sig) - torch.sinh(sig) / sig) / sig**2

    sig = torch.sqrt(torch.clamp(alpha**2 - (2 * torch.pi * a * rval) ** 2, min=1e-12))
    out = f(sig) / f(torch.tensor(alpha, dtype=sig.dtype, device=sig.device))
    return torch.where(rval < 0.5, out, torch.zeros_like(out))


def _real_space_blob(p: int, device) -> torch.Tensor:
    """``(p, p, p)`` float32: :func:`_blob_transform` at each voxel's distance from the origin
    (FFT order) over ``p`` — the convolution kernel as a product in the padded real space.
    Built a slab at a time in float64, so the temporaries stay small."""
    k2 = (torch.fft.fftfreq(p, d=1.0 / p, dtype=torch.float64, device=device)) ** 2
    out = torch.empty(p, p, p, dtype=torch.float32, device=device)
    step = max(1, (1 << 22) // (p * p))
    for z0 in range(0, p, step):
        r2 = k2[z0 : z0 + step, None, None] + k2[None, :, None] + k2[None, None, :]
        out[z0 : z0 + step] = _blob_transform(torch.sqrt(r2) / p).float()
    return out


def _fft_leading_axes(grid: torch.Tensor, inverse: bool) -> None:
    """The (inverse) FFT of a ``(p, p, n)`` complex grid over its first two axes, in place.

    On the CPU scipy's pocketfft transforms the buffer itself (``overwrite_x``; torch's FFTs would
    allocate the result and copy it back, which costs as much as the transform); elsewhere torch
    transforms it a slab at a time."""
    if grid.device.type == "cpu":
        data = grid.numpy()
        transform = scipy.fft.ifftn if inverse else scipy.fft.fftn
        result = transform(data, axes=(0, 1), overwrite_x=True, workers=kernel_threads())
        if not np.shares_memory(result, data):  # not observed with complex64 input, but allowed
            data[...] = result
        return
    _fft_leading_axes_slabs(grid, inverse)


def _fft_leading_axes_slabs(grid: torch.Tensor, inverse: bool) -> None:
    """:func:`_fft_leading_axes` with torch's FFTs, a slab at a time (off the CPU)."""
    transform = torch.fft.ifft if inverse else torch.fft.fft
    p = grid.shape[0]
    for z0 in range(0, p, _SLAB):
        grid[z0 : z0 + _SLAB] = transform(grid[z0 : z0 + _SLAB], dim=1)
    for y0 in range(0, p, _SLAB):
        grid[:, y0 : y0 + _SLAB] = transform(grid[:, y0 : y0 + _SLAB], dim=0)


def _convolve_in_place(spectrum: torch.Tensor, blob: torch.Tensor, buffer: torch.Tensor) -> None:
    """``spectrum ← rfftn(irfftn(spectrum) · blob)`` for a ``(p, p, p//2+1)`` grid, in place: the
    convolution of the spectrum with the blob's transform.

    The padded real-space grid is never whole: after the inverse transform of the first two axes,
    each slab of ``z``-planes goes through the last axis's inverse transform into ``buffer``
    (``(_SLAB, p, p)`` float32), is multiplied by the blob and transformed back into its place, all
    while it is in cache; then the first two axes go forward. The same transforms of the same lines
    as a whole-grid ``irfftn``/``rfftn``, without the 4·p³ bytes of the real grid (0.5 GB at 256 px,
    pad 2) or its two trips through memory. ``blob``: on the CPU a table by squared radius
    (:func:`_radial_blob_table`), elsewhere the ``(p, p, p)`` grid of :func:`_real_space_blob`."""
    p = spectrum.shape[0]
    _fft_leading_axes(spectrum, inverse=True)
    for z0 in range(0, p, _SLAB):
        n = min(_SLAB, p - z0)
        real = buffer[:n]
        torch.fft.irfft(spectrum[z0 : z0 + n], n=p, dim=2, out=real)
        if blob.dim() == 1:  # a table by squared radius (the CPU's), else the grid itself
            multiply_radial(real, blob, z0)
        else:
            real.mul_(blob[z0 : z0 + n])
        torch.fft.rfft(real, dim=2, out=spectrum[z0 : z0 + n])
    _fft_leading_axes(spectrum, inverse=False)


def _window_of_inverse(spectrum: torch.Tensor, s: int, buffer: torch.Tensor) -> torch.Tensor:
    """The central ``(s, s, s)`` box of ``fftshift(irfftn(spectrum))`` for a ``(p, p, p//2+1)``
    grid, overwriting ``spectrum``: only the box's ``z``-planes go through the last axis's
    transform (through ``buffer``, a slab at a time), and the box is gathered without shifting the
    padded grid."""
    p = spectrum.shape[0]
    _fft_leading_axes(spectrum, inverse=True)
    start = (p - s) // 2
    window = (torch.arange(start, start + s, device=spectrum.device) + p // 2) % p
    vol = torch.empty(s, s, s, dtype=torch.float32, device=spectrum.device)
    for k0 in range(0, s, _SLAB):
        planes = window[k0 : k0 + _SLAB]
        real = buffer[: len(planes)]
        torch.fft.irfft(spectrum.index_select(0, planes), n=p, dim=2, out=real)
        vol[k0 : k0 + len(planes)] = real.index_select(1, window).index_select(2, window)
    return vol


def _radial_blob_table(p: int, device) -> torch.Tensor:
    """float32 :func:`_blob_transform` at each integer squared radius ``0 .. 3·(p//2)²`` of the
    padded grid (over ``p``): the values :func:`_real_space_blob` puts at the voxels of that
    squared radius."""
    r2 = torch.arange(3 * (p // 2) ** 2 + 1, dtype=torch.float64, device=device)
    return _blob_transform(torch.sqrt(r2) / p).float()


def _finish_relion(num: torch.Tensor, den: torch.Tensor, s: int, pad: int, fused: bool | None = None) -> np.ndarray:
    """``BackProjector::reconstruct`` of RELION 3.1 without a τ² prior (relion_reconstruct
    without --fsc): Pipe-Menon inverse weights, windowing, outer soft mask, radial sinc².

    ``fused``: the numba kernels and the radial blob table (the CPU's way, the default there), or
    torch operations and a blob grid (the way on other devices, the default there)."""
    p = pad * s
    dev = num.device
    kz = torch.fft.fftfreq(p, d=1.0 / p, device=dev).to(torch.int32)
    kx = torch.arange(p // 2 + 1, dtype=torch.int32, device=dev)
    r2 = kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2
    max_r2 = (s // 2 * pad) ** 2
    kept = r2 <= max_r2  # what RELION's decenter keeps of the data and the weights
    inside = r2 < max_r2  # where its inverse weights start at 1 and are updated
    del r2
    weight = den.masked_fill_(~kept, 0.0)
    # Pipe & Menon (1999) eq. 14: u ← u / max(|(u·W) ⊛ blob|, 1e-6), from u = 1 inside the
    # sphere; the convolution is a product with the blob's transform in the padded real space
    # (single precision: RELION keeps u in double, as here). Outside the sphere u is 0 and stays 0
    # (0 / x), so the update is one in-place division.
    cpu = dev.type == "cpu" if fused is None else fused
    # On the CPU the blob is applied from a table by squared radius (cryopose.reconstruct_kernels),
    # not stored as a (p, p, p) grid: 0.5 GB less at 256 px.
    blob = _radial_blob_table(p, dev) if cpu else _real_space_blob(p, dev)
    inverse = inside.to(torch.float64)
    del inside
    # Buffers reused by every iteration: the spectrum of u·W (the FFTs work in it in place) and one
    # slab of the padded real space (_convolve_in_place); on the CPU the element-wise passes are fused.
    spectrum = torch.empty_like(num)
    buffer = torch.empty(min(_SLAB, p), p, p, dtype=torch.float32, device=dev)
    for _ in range(_RELION_ITERATIONS):
        if cpu:
            weighted_inverse(inverse, weight, spectrum)
        else:
            spectrum.copy_(inverse * weight)
        _convolve_in_place(spectrum, blob, buffer)
        if cpu:
            divide_by_magnitude(inverse, spectrum, 1e-6)
        else:
            inverse.div_(spectrum.abs().clamp_min_(1e-6))
    del spectrum, blob, weight
    vol_ft = num.masked_fill_(~kept, 0.0)
    # u grows without bound where no slice reached (W = 0): in float32 it would overflow, and
    # 0·inf is NaN; the product is formed in double a slab at a time, as RELION forms it.
    for z0 in range(0, p, _SLAB):
        vol_ft[z0 : z0 + _SLAB] = (vol_ft[z0 : z0 + _SLAB].to(torch.complex128) * inverse[z0 : z0 + _SLAB]).to(
            torch.complex64
        )
    del inverse
    vol = _window_of_inverse(vol_ft, s, buffer)
    del vol_ft, buffer
    # softMaskOutsideMap(vol): beyond radius S/2 the map becomes its (edge-weighted) mean there,
    # over a raised-cosine edge of 3 voxels; then the radial gridding correction.
    c = torch.arange(s, dtype=torch.float64, device=dev) - s // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    radius, width = s / 2, 3.0
    edge = 0.5 + 0.5 * torch.cos(torch.pi * (radius + width - r) / width)
    outer = torch.where(r < radius, 0.0, torch.where(r > radius + width, 1.0, edge))
    background = (outer * vol).sum() / outer.sum()
    vol = (1 - outer) * vol + outer * background
    vol = vol / torch.where(r > 0, torch.sinc(r / p) ** 2, torch.ones_like(r))
    return vol.cpu().numpy().astype(np.float32)


def _read_star(star: str | Path | io.ParticleStar) -> tuple[io.ParticleStar, Path]:
    """``(particles, their STAR file)`` from a path or an already read :class:`~cryopose.io.ParticleStar`
    (e.g. one half of a STAR file holding both, :meth:`cryopose.entry.Entry.read_star`): image names
    are resolved and errors named against that file."""
    if isinstance(star, io.ParticleStar):
        if star.path is None:
            raise ValueError("a ParticleStar to reconstruct needs .path (its image names are relative to it)")
        return star, Path(star.path)
    return io.read_particles_star(star), Path(star)


def _checked_weights(particles, star_path: Path) -> torch.Tensor:
    """The rlnParticleFigureOfMerit weights, refused unless finite, >= 0 and not all 0: all-zero
    weights insert nothing, and the zero map they make would be scored as if it were a map."""
    if "rlnParticleFigureOfMerit" not in particles.columns:
        raise InputError("use_weights needs per-particle weights", path=star_path, where="rlnParticleFigureOfMerit")
    weights = torch.tensor(particles["rlnParticleFigureOfMerit"].to_numpy(np.float64))
    bad = torch.nonzero(~torch.isfinite(weights) | (weights < 0)).flatten()
    if len(bad):
        row = int(bad[0])
        raise InputError(
            f"weight {float(weights[row])} in row {row} (0-based); weights must be finite and >= 0",
            path=star_path,
            where="rlnParticleFigureOfMerit",
        )
    if not bool((weights > 0).any()):
        raise InputError(
            f"all {len(weights)} weights are 0: nothing would be reconstructed; expected at least one weight > 0",
            path=star_path,
            where="rlnParticleFigureOfMerit",
        )
    return weights


def reconstruct_torch(
    star_path: str | Path | io.ParticleStar,
    symmetry: str = "C1",
    use_weights: bool = False,
    pad: int = 2,
    wiener: float = 1e-3,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
    kernel: str | None = None,
    scheme: str = DEFAULT_SCHEME,
    threads: int | None = None,
) -> tuple[np.ndarray, float]:
    """Direct Fourier inversion of the particles of a STAR file (module docstring).

    Args:
        star_path: RELION 3.1 (or 3.0) particle STAR file, or a :class:`~cryopose.io.ParticleStar`
            read from one; stacks found as :func:`cryopose.io.resolve_stack_path`.
        symmetry: point group applied during insertion.
        use_weights: weight particles by rlnParticleFigureOfMerit (as relion_reconstruct --fom_weighting).
        pad: padding factor of the Fourier grid (RELION's --pad).
        wiener: λ relative to the mean CTF² weight (``scheme="wiener"`` only).
        batch_size: particles per insertion batch (memory ~ batch·pad²·S²·16 bytes); ``None``:
            ``2²¹ / S²`` pixels' worth, at least 128.
        device: ``"cuda"``/``"cpu"``; default a GPU when there is one.
        kernel: how slices are splatted, one of :data:`KERNELS`; ``None``: the numba kernel on
            the CPU, torch's ``index_add_`` on a GPU. A failed ``"torch-compile"`` build falls back
            to ``"torch"`` with a warning.
        scheme: ``"relion"`` (default): relion_reconstruct's sampling and weighting, so that the
            two backends give the same maps and metrics; ``"wiener"``: padded images and
            ``D / (W + λ)`` (module docstring).
        threads: CPU threads of the numba kernels and the Fourier steps (``None``: torch's, as
            :func:`cryopose.reconstruct_kernels.kernel_threads`); 1 runs serial kernels, which two
            reconstructions in two Python threads can run at once (``evaluate(jobs=2)``).

    Returns:
        ``(map, pixel_size)``: ``(S, S, S)`` float32 indexed ``[z, y, x]``, Å per voxel.
    """
    with using_threads(threads):
        return _reconstruct_torch(
            star_path, symmetry, use_weights, pad, wiener, batch_size, device, progress, kernel, scheme
        )


def _reconstruct_torch(star_path, symmetry, use_weights, pad, wiener, batch_size, device, progress, kernel, scheme):
    """:func:`reconstruct_torch`'s work, under the thread setting it has made (same arguments)."""
    _check_scheme(scheme)
    star, star_path = _read_star(star_path)
    dev = select_device(device)
    table = io.particles_with_optics(star).reset_index(drop=True)
    sizes = table["rlnImageSize"].unique()
    pixel_sizes = table["rlnImagePixelSize"].unique()
    if len(sizes) != 1 or len(pixel_sizes) != 1:
        raise InputError(
            f"one box and pixel size needed, found {sizes.tolist()} px and {pixel_sizes.tolist()} Å",
            path=star_path,
            where="data_optics",
        )
    s, px = int(sizes[0]), float(pixel_sizes[0])
    if batch_size is None:
        batch_size = max(_MIN_BATCH, _BATCH_PIXELS // (s * s))
    for col in EULER:
        if col not in table.columns:
            raise InputError("missing pose column", path=star_path, where=col)
    if "rlnCtfDataArePhaseFlipped" in table.columns and (table["rlnCtfDataArePhaseFlipped"] == 1).any():
        raise InputError(
            "phase-flipped stacks are not supported by the torch backend; reconstruct the unflipped entry",
            path=star_path,
            where="rlnCtfDataArePhaseFlipped",
        )
    params = ctf_parameters(table, source=str(star_path))
    rot = euler_to_matrix(torch.tensor(table[EULER].to_numpy(np.float64)))
    origins = torch.zeros(len(table), 2, dtype=torch.float64)
    for j, col in enumerate(ORIGIN):
        if col in table.columns:
            origins[:, j] = torch.tensor(table[col].to_numpy(np.float64)) / px
    weights = _checked_weights(table, star_path) if use_weights else torch.ones(len(table), dtype=torch.float64)
    ops = symmetry_matrices(symmetry)

    kernel = kernel or default_kernel(dev)
    locations = [io.parse_image_name(n, star_path, r) for r, n in enumerate(table["rlnImageName"])]
    stacks: dict[str, object] = {}
    ctf_size = s if scheme == "relion" else pad * s

    def load(start: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """The rows of the batch from ``start``, their images (checked finite) and CTFs."""
        rows = np.arange(start, min(len(table), start + batch_size))
        images = torch.empty(len(rows), s, s)
        by_stack: dict[str, list[int]] = {}
        for k, r in enumerate(rows):
            by_stack.setdefault(locations[r][1], []).append(k)
        for name, ks in by_stack.items():
            if name not in stacks:
                stacks[name] = io.open_stack(io.resolve_stack_path(star_path, name))
            idx = [locations[rows[k]][0] for k in ks]
            images[ks] = torch.from_numpy(io.read_images(stacks[name], idx))
            io.release_pages(stacks[name])  # memory stays the batch's, not the stack's
        # A finite sum means every pixel is finite (NaN and ±inf propagate); only a non-finite
        # sum, or an overflowing one, pays for the element-wise test (10× the cost).
        if not torch.isfinite(images.sum()) and not torch.isfinite(images).all():
            bad = int(rows[int(torch.nonzero(~torch.isfinite(images).flatten(1).all(1))[0])])
            index, stack = locations[bad]
            raise InputError(
                f"image {index + 1} of {stack} has NaN or infinite pixels; finite values expected",
                path=star_path,
                where=f"row {bad} (0-based), {table['rlnImageName'].iloc[bad]}",
            )
        ctf = ctf_from_parameters({k: v[rows] for k, v in params.items()}, ctf_size, px, dtype=torch.float32)
        # On the CPU the images' transforms are taken here too, beside the previous batch's insertion.
        return rows, _image_spectra(images, pad, scheme) if dev.type == "cpu" else images, ctf

    acc = None
    bar = tqdm(total=len(table), desc=f"reconstruct {star_path.name}", unit="img", disable=not progress)
    # The next batch is read and its CTFs computed in a second thread while this one is inserted:
    # reading is one thread's work, and the insertion's kernels leave a core idle between them
    # (20,000 × 64², 2 cores: 2.2 → 2.05 s). Batches are inserted in order: the map is the same bit for bit.
    with bar, ThreadPoolExecutor(max_workers=1) as loader:
        pending = loader.submit(load, 0) if len(table) else None
        for start in range(0, len(table), batch_size):
            rows, loaded, ctf = pending.result()
            if start + batch_size < len(table):
                pending = loader.submit(load, start + batch_size)
            ft = loaded if dev.type == "cpu" else _image_spectra(loaded.to(dev), pad, scheme)
            args = (ft, s, rot[rows].to(dev), origins[rows].to(dev), ctf.to(dev), weights[rows].to(dev), ops, pad)
            try:
                acc = _insert_spectra(*args, acc, kernel, scheme)
            except Exception as err:  # noqa: BLE001 - any failure to build the kernel: run eagerly
                if kernel != "torch-compile":
                    raise
                warnings.warn(
                    f"torch.compile failed ({type(err).__name__}: {err}); reconstructing without it", stacklevel=2
                )
                kernel = "torch"
                acc = _insert_spectra(*args, acc, kernel, scheme)
            bar.update(len(rows))
    for mrc in stacks.values():
        mrc.close()
    holder = [acc]
    del acc  # _finish frees the accumulator once read (its docstring)
    return _finish(holder, s, pad, wiener, scheme), px


def relion_command(launcher: list[str] | None = None, mpi_processes: int = 1) -> list[str]:
    """The command prefix that runs relion_reconstruct as configured; raises :class:`RelionNotFound`
    when its first program is not on PATH (so a caller can fail before doing any work).

    ``launcher`` is prepended (e.g. ``["apptainer", "exec", "relion.sif"]``); ``mpi_processes > 1``
    runs ``mpirun -np N relion_reconstruct_mpi``.
    """
    if mpi_processes > 1:
        cmd = list(launcher or []) + ["mpirun", "-np", str(mpi_processes), "relion_reconstruct_mpi"]
    else:
        cmd = list(launcher or []) + ["relion_reconstruct"]
    if shutil.which(cmd[0]) is None:
        raise RelionNotFound(
            f"{cmd[0]} not found on PATH (Debian/Ubuntu: apt-get install relion; or configure an Apptainer launcher)",
            where="relion backend",
        )
    return cmd


def reconstruct_relion(
    star_path: str | Path | io.ParticleStar,
    symmetry: str = "C1",
    use_weights: bool = False,
    pad: int = 2,
    launcher: list[str] | None = None,
    mpi_processes: int = 1,
    log_path: str | Path | None = None,
) -> tuple[np.ndarray, float]:
    """``relion_reconstruct --ctf --sym SYM --pad PAD [--fom_weighting] [--ctf_phase_flipped]``.

    RELION is given a copy of the STAR file whose image names are absolute, resolved by
    :func:`cryopose.io.resolve_stack_path` (the working directory, then the STAR file's folder), so
    it reads exactly the images the torch backend reads, from wherever it runs; it runs in a
    scratch folder of the system's temporary space (the STAR file's own folder, e.g. a RELION
    project's job folder, is never written to). ``launcher`` is prepended to the command (e.g.
    ``["apptainer", "exec", "relion.sif"]``: the stacks' absolute paths must then be visible inside
    the container, as with any bind mount); ``mpi_processes > 1`` uses ``mpirun -np N
    relion_reconstruct_mpi``. RELION exits 0 on bad options, so the output file is what decides
    success.
    """
    star, star_path = _read_star(star_path)
    if use_weights:  # relion_reconstruct would make a zero map of all-zero weights without a word
        _checked_weights(star.particles, star_path)
    cmd = relion_command(launcher, mpi_processes)
    flipped = "rlnCtfDataArePhaseFlipped" in star.optics.columns and bool(
        (star.optics["rlnCtfDataArePhaseFlipped"] == 1).any()
    )
    absolute = io.with_absolute_image_names(star, star_path)
    with tempfile.TemporaryDirectory(prefix="cryopose-relion-reconstruct-") as tmp:
        tmp = Path(tmp)
        io.write_particles_star(tmp / "particles.star", absolute)
        out = tmp / "map.mrc"
        cmd = cmd + ["--i", "particles.star", "--o", "map.mrc", "--ctf", "--sym", symmetry, "--pad", str(pad)]
        if use_weights:
            cmd.append("--fom_weighting")
        if flipped:
            cmd.append("--ctf_phase_flipped")  # 3.1.3 ignores the optics column
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
        if log_path is not None:
            Path(log_path).write_text(
                f"# {star_path} with absolute image names, in {tmp}\n$ {shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
            )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"{shlex.join(cmd)} (run in {tmp} on {star_path} with absolute image names) failed (exit "
                f"{proc.returncode}, output {'present' if out.exists() else 'missing'}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
        vol, px = io.read_map(out)
    return vol, px


def reconstruct(
    star_path: str | Path | io.ParticleStar,
    symmetry: str = "C1",
    backend: str = "torch",
    use_weights: bool = False,
    **options,
) -> tuple[np.ndarray, float]:
    """Reconstruct a map from a particle STAR file with the ``"torch"`` or ``"relion"`` backend."""
    if backend == "torch":
        return reconstruct_torch(star_path, symmetry=symmetry, use_weights=use_weights, **options)
    if backend == "relion":
        options.pop("progress", None)  # relion_reconstruct reports nothing we could turn into a bar
        return reconstruct_relion(star_path, symmetry=symmetry, use_weights=use_weights, **options)
    raise InputError(f"unknown backend {backend!r}; expected 'torch' or 'relion'", where="backend")


def write_half_map(entry, half: int, path: str | Path) -> Path:
    """Write ``path``: half ``half`` of ``entry`` reconstructed from its true poses with the torch
    backend (RELION's padding 2, no weights), the map a reference-based method is given of its
    training half. It uses the ``"wiener"`` scheme (padded images, ``D / (W + λ)``): a less noisy
    map than the evaluation's RELION-scheme ground truth of that half, and the reference the
    recorded predictions of tests/data/recorded_predictions/ were made with."""
    volume, pixel_size = reconstruct_torch(
        entry.read_star(half), symmetry=entry.symmetry, progress=False, scheme="wiener"
    )
    io.write_map(path, volume, pixel_size)
    return Path(path)
