"""Half-map reconstruction from particles and poses: RELION's ``relion_reconstruct`` or a PyTorch
direct Fourier inversion.

Both backends read a RELION 3.1 particle STAR file (poses, origins, CTF, optional
rlnParticleFigureOfMerit weights) and its stacks, and return ``(map[D, D, D], pixel_size)``.

The torch backend (paper eq. 2) computes, on a grid padded ``pad`` times,

    V̂(k) = Σ_i Σ_g w_i CTF_i(k_i) F_i(k_i) / (Σ_i Σ_g w_i CTF_i(k_i)² + λ)

where each particle i's Fourier transform F_i, re-centred by its origin, is inserted as the
central slice rotated by ``g·R_i`` for every operator g of the symmetry group (trilinear
splatting with one scatter per batch into an accumulator stored in 4³-voxel bricks, so that the
eight corners of neighbouring slice points share cache lines), w_i are the per-particle weights, and λ a small
Wiener constant relative to the mean CTF² weight; the inverse transform is corrected for the
trilinear gridding kernel (sinc²) and cropped back to the box.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import io
from .ctf import ctf_from_parameters, ctf_parameters
from .errors import InputError
from .geometry import euler_to_matrix
from .predictions import EULER, ORIGIN
from .symmetry import symmetry_matrices

__all__ = [
    "reconstruct",
    "reconstruct_torch",
    "reconstruct_relion",
    "insert_particles",
    "RelionNotFound",
    "relion_command",
    "write_half_map",
]


class RelionNotFound(InputError):
    """The configured RELION program cannot be run."""


def _slice_points(p: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the padded image's rfft2 coefficients inside the Nyquist circle, without the
    Friedel duplicates of the k_x = 0 column (k_y < 0), and their (k_x, k_y, 0) in index units."""
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
    """Per-axis parts of a voxel's bricked flat index: ``flat(z, y, x) = Z[z] + Y[y] + X[x]``.

    Tables are indexed by ``coordinate + p//2 + 1`` for coordinates in ``[-p//2 - 1, p//2 + 1]``;
    z and y wrap modulo ``p`` (FFT order), x is clamped to the last stored column."""
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


_POINTS_PER_SCATTER = 1 << 17
_COMPILE_MIN_SAMPLES = 2.5e8


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


def compile_available() -> bool:
    """Whether ``torch.compile`` can build CPU kernels here (it needs a C++ compiler)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


def insert_particles(
    images: torch.Tensor,
    rotmats: torch.Tensor,
    origins_px: torch.Tensor,
    ctf: torch.Tensor,
    weights: torch.Tensor,
    symmetry_ops: torch.Tensor,
    pad: int,
    accumulator: torch.Tensor | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Insert a batch of particles into a padded 3D Fourier accumulator (trilinear splatting).

    Args:
        images: ``(B, S, S)`` particle images (box centre ``S//2``).
        rotmats: ``(B, 3, 3)`` poses R (see :mod:`cryopose.geometry`): the image frequency
            ``(k_x, k_y)`` lands at ``g·R·(k_x, k_y, 0)`` of the map's transform.
        origins_px: ``(B, 2)`` RELION origins in pixels (the image is shifted by +origin).
        ctf: ``(B, P, P//2+1)`` CTF at the padded size ``P = pad·S`` (``rfft2`` layout), or ones.
        weights: ``(B,)`` per-particle weights.
        symmetry_ops: ``(G, 3, 3)`` rotations g; each particle is inserted at every ``g·R``.
        pad: integer padding factor.
        accumulator: ``(prod(accumulator_shape(P)), 3)`` float32 to add to (real and imaginary parts
            of Σ w·CTF·F, and Σ w·CTF², over z, y in FFT order and x ≥ 0, stored in bricks of
            4³ voxels), or ``None`` to start one.
        compiled: run the splatting through ``torch.compile`` (about 2× faster on CPU once built;
            building takes ~20 s per image size and process).

    Returns:
        The accumulator.
    """
    b, s = images.shape[0], images.shape[-1]
    dev = images.device
    p = pad * s
    h = p // 2 + 1
    extra = (p - s) // 2
    padded = F.pad(images.float(), (extra, p - s - extra, extra, p - s - extra))
    ft = torch.fft.rfft2(torch.fft.ifftshift(padded, dim=(-2, -1)))
    mask, pts = _slice_points(p, dev)
    shift = origins_px.float()
    # Re-centre each particle: a shift by +origin is a phase ramp, separable in x and y, so two
    # short exponentials per particle and a gather replace one exponential per slice point.
    k = torch.fft.fftfreq(p, d=1.0 / p, device=dev)
    ramp_x = torch.exp(-2j * torch.pi * shift[:, 0, None] * k[None, :h].abs() / p)  # (B, h): k_x ≥ 0
    ramp_y = torch.exp(-2j * torch.pi * shift[:, 1, None] * k[None, :] / p)  # (B, p), FFT order
    iy = torch.remainder(pts[:, 1], p).long()
    ix = pts[:, 0].long()
    phase = ramp_y[:, iy] * ramp_x[:, ix]
    ctf_m = ctf.float()[:, mask]
    w = weights.float()[:, None]
    value = ft[:, mask] * phase * (ctf_m * w)
    weight = ctf_m * ctf_m * w
    if accumulator is None:
        accumulator = torch.zeros(int(np.prod(accumulator_shape(p))), 3, dtype=torch.float32, device=dev)
    zt, yt, xt = _axis_offsets(p, dev)
    chunk = max(1, _POINTS_PER_SCATTER // pts.shape[0])  # particles per scatter: bounds the temporaries
    channels = torch.stack([value.real, value.imag, weight], -1)  # (B, M, 3)
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


def _finish(accumulator: torch.Tensor, s: int, pad: int, wiener: float) -> np.ndarray:
    p = pad * s
    acc = _unbrick(accumulator, p).double()
    num = torch.complex(acc[0], acc[1])
    den = acc[2].clone()
    # The x = 0 plane holds both members of Friedel pairs (k and −k): add each point's mate.
    mirror = lambda a: torch.roll(torch.flip(a, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
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
    star_path: str | Path,
    symmetry: str = "C1",
    use_weights: bool = False,
    pad: int = 2,
    wiener: float = 1e-3,
    batch_size: int = 128,
    device: str | None = None,
    progress: bool = True,
    compile: bool | None = None,
) -> tuple[np.ndarray, float]:
    """Direct Fourier inversion of the particles of a STAR file (module docstring).

    Args:
        star_path: RELION 3.1 (or 3.0) particle STAR; stacks found as :func:`cryopose.io.resolve_stack_path`.
        symmetry: point group applied during insertion.
        use_weights: weight particles by rlnParticleFigureOfMerit (as relion_reconstruct --fom_weighting).
        pad: padding factor of the Fourier grid (RELION's --pad).
        wiener: λ relative to the mean CTF² weight.
        batch_size: particles per insertion batch (memory ~ batch·pad²·S²·16 bytes).
        device: ``"cuda"``/``"cpu"``; default a GPU when there is one.
        compile: splat through ``torch.compile`` (:func:`insert_particles`); ``None`` does so on
            the CPU for jobs large enough to repay the ~20 s build (≥ 2.5·10⁸ slice samples, e.g.
            4,000 particles of 128 px), when a C++ compiler is present; a failed build falls back
            to the eager code with a warning.

    Returns:
        ``(map, pixel_size)``: ``(S, S, S)`` float32 indexed ``[z, y, x]``, Å per voxel.
    """
    star_path = Path(star_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    star = io.read_particles_star(star_path)
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

    if compile is None:
        work = len(table) * len(ops) * (pad * s) ** 2
        compile = dev.type == "cpu" and work >= _COMPILE_MIN_SAMPLES and compile_available()
    compiled = bool(compile)
    locations = [io.parse_image_name(n, star_path, r) for r, n in enumerate(table["rlnImageName"])]
    stacks: dict[str, object] = {}
    acc = None
    bar = tqdm(total=len(table), desc=f"reconstruct {star_path.name}", unit="img", disable=not progress)
    with bar:
        for start in range(0, len(table), batch_size):
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
            if not torch.isfinite(images).all():
                bad = int(rows[int(torch.nonzero(~torch.isfinite(images).flatten(1).all(1))[0])])
                index, stack = locations[bad]
                raise InputError(
                    f"image {index + 1} of {stack} has NaN or infinite pixels; finite values expected",
                    path=star_path,
                    where=f"row {bad} (0-based), {table['rlnImageName'].iloc[bad]}",
                )
            ctf = ctf_from_parameters({k: v[rows] for k, v in params.items()}, pad * s, px, dtype=torch.float32)
            args = (
                images.to(dev),
                rot[rows].to(dev),
                origins[rows].to(dev),
                ctf.to(dev),
                weights[rows].to(dev),
                ops,
                pad,
                acc,
            )
            try:
                acc = insert_particles(*args, compiled=compiled)
            except Exception as err:  # noqa: BLE001 - any failure to build the kernel: run eagerly
                if not compiled:
                    raise
                warnings.warn(
                    f"torch.compile failed ({type(err).__name__}: {err}); reconstructing without it", stacklevel=2
                )
                compiled = False
                acc = insert_particles(*args, compiled=False)
            bar.update(len(rows))
    for mrc in stacks.values():
        mrc.close()
    return _finish(acc, s, pad, wiener), px


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
    star_path: str | Path,
    symmetry: str = "C1",
    use_weights: bool = False,
    pad: int = 2,
    launcher: list[str] | None = None,
    mpi_processes: int = 1,
    log_path: str | Path | None = None,
) -> tuple[np.ndarray, float]:
    """``relion_reconstruct --ctf --sym SYM --pad PAD [--fom_weighting] [--ctf_phase_flipped]``.

    Runs in the STAR file's folder (RELION resolves image names against the working directory).
    ``launcher`` is prepended to the command (e.g. ``["apptainer", "exec", "relion.sif"]``);
    ``mpi_processes > 1`` uses ``mpirun -np N relion_reconstruct_mpi``. RELION exits 0 on bad
    options, so the output file is what decides success.
    """
    star_path = Path(star_path).resolve()
    star = io.read_particles_star(star_path)
    if use_weights:  # relion_reconstruct would make a zero map of all-zero weights without a word
        _checked_weights(star.particles, star_path)
    cmd = relion_command(launcher, mpi_processes)
    flipped = "rlnCtfDataArePhaseFlipped" in star.optics.columns and bool(
        (star.optics["rlnCtfDataArePhaseFlipped"] == 1).any()
    )
    # RELION runs in the STAR file's folder, so its output goes there too, in a scratch folder that
    # an interruption removes and the next run cleans up after a SIGKILL.
    with io.temporary_folder(star_path.parent, "reconstruct") as tmp:
        out = Path(tmp) / "map.mrc"
        cmd = cmd + [
            "--i",
            star_path.name,
            "--o",
            os.path.relpath(out, star_path.parent),
            "--ctf",
            "--sym",
            symmetry,
            "--pad",
            str(pad),
        ]
        if use_weights:
            cmd.append("--fom_weighting")
        if flipped:
            cmd.append("--ctf_phase_flipped")  # 3.1.3 ignores the optics column
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        proc = subprocess.run(cmd, cwd=star_path.parent, capture_output=True, text=True, env=env)
        if log_path is not None:
            Path(log_path).write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"{' '.join(cmd)} failed (exit {proc.returncode}, output "
                f"{'present' if out.exists() else 'missing'}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
        vol, px = io.read_map(out)
    return vol, px


def reconstruct(
    star_path: str | Path, symmetry: str = "C1", backend: str = "torch", use_weights: bool = False, **options
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
    training half. It is the evaluation's ground-truth map of that half with the torch backend."""
    volume, pixel_size = reconstruct_torch(entry.star_path(half), symmetry=entry.symmetry, progress=False)
    io.write_map(path, volume, pixel_size)
    return Path(path)
