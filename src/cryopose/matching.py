"""Projection matching against a reference map (the CESPED paper's eq. 1), and local refinement of
given poses against it (Appendix F).

Image model, in the conventions of :mod:`cryopose.simulate` and :mod:`cryopose.reconstruct`:

    X_i(k) = CTF_i(k) · exp(−2πi k·s_i / D) · V̂(R_i·(k_x, k_y, 0)) + noise

where ``X_i`` is the ``rfft2`` of image i (box centre at ``D//2``), ``k`` in cycles per box, ``V̂``
the reference's 3D transform, ``R_i`` the pose and ``s_i`` the particle's displacement in pixels
(RELION's origin is ``−s_i`` times the pixel size). A candidate ``(R, s)`` is scored over a band of
frequencies ``1 ≤ |k| ≤ k_max`` by

    c = Re⟨X, CTF·φ_s·P_R⟩ / ‖CTF·P_R‖,

the least-squares fit with a free scale (so the reference's amplitude does not matter); under
white noise of power ``σ²`` per coefficient its log-likelihood ratio is ``c²/σ²``, which turns the
scores of a grid into a posterior whose maximum is the confidence (as RELION's
rlnMaxValueProbDistribution). All scores of a batch against a grid are two real matrix products,
so the search runs as GEMMs on a CPU or a GPU.

The search is coarse to fine: every rotation of an SO(3) HEALPix grid and a coarse grid of shifts
at low resolution, then, from the best few grid cells, a local pattern search of rotations (turns
about x, y, z) and shifts at higher resolution with steps halved each round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .device import report_device, select_device
from .geometry import axis_turns
from .grids import so3_grid_size, so3_healpix_grid
from .parameters import param, validate
from .preprocess import fourier_resize_map

__all__ = [
    "MatchingConfig",
    "RefineConfig",
    "fourier_cube",
    "band_mask",
    "central_slices",
    "image_spectra",
    "shift_phases",
    "shift_grid",
    "match_scores",
    "projection_match",
    "refine_poses",
    "entry_particles",
    "check_reference",
]


@dataclass(frozen=True)
class MatchingConfig:
    """Settings of the global search (:func:`projection_match`).

    Resolutions are in Å (the band's upper edge), so one configuration suits entries of any pixel
    size; a value finer than Nyquist is clipped to Nyquist.
    """

    coarse_order: int = param(2, "SO(3) HEALPix grid of the global search (order 2: 4,608 rotations, ~15°)", min=0)
    coarse_resolution: float = param(16.0, "Å: band of the global search (clipped to Nyquist)", above=0)
    coarse_shift_step: float = param(2.0, "pixels between shifts of the global search", above=0)
    max_shift: float = param(13.0, "Å: shifts searched within this radius of the box centre", above=0)
    candidates: int = param(8, "grid cells, best first, each refined locally", min=1)
    fine_resolution: float = param(8.0, "Å: band of the local search (clipped to Nyquist)", above=0)
    rounds: int = param(5, "local rounds; each halves the rotation and shift steps", min=0)
    batch_size: int = param(64, "particles scored at once", min=1)
    pad: int = param(2, "padding of the reference before its transform (interpolation accuracy)", min=1)
    device: str = param("auto", "cpu, cuda, cuda:N, or auto (a GPU when there is one)")

    def __post_init__(self):
        validate(self)  # the bounds declared above


@dataclass(frozen=True)
class RefineConfig:
    """Settings of the local refinement of given poses (:func:`refine_poses`)."""

    local_resolution: float = param(8.0, "Å: band of the local search (clipped to Nyquist)", above=0)
    local_step: float = param(
        10.0, "degrees: first rotation step, halved each round (~ the input's grid spacing)", above=0
    )
    local_rounds: int = param(8, "rounds of the local pattern search", min=0)
    local_max_shift: float = param(13.0, "Å: radius of the initial shift search around the given shift", above=0)
    local_batch_size: int = param(128, "particles refined at once", min=1)
    local_device: str = param("auto", "cpu, cuda, cuda:N, or auto (a GPU when there is one)")

    def __post_init__(self):
        validate(self)  # the bounds declared above


def band_radius(box: int, pixel_size: float, resolution: float) -> float:
    """Radius in cycles per box of ``resolution`` Å, clipped to Nyquist (``box/2``)."""
    return min(box / 2, box * pixel_size / resolution)


def band_mask(box: int, max_radius: float, min_radius: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rfft2`` coefficients of a ``box``-pixel image with ``min_radius ≤ |k| ≤ max_radius``.

    The k_x = 0 column keeps k_y ≥ 0 only: its other half holds the complex conjugates and would
    count those frequencies twice.

    Returns:
        ``mask (box, box//2+1)`` bool and ``points (M, 2)`` float64 ``(k_x, k_y)`` in cycles per box,
        in the mask's row-major order.
    """
    ky = torch.fft.fftfreq(box, dtype=torch.float64) * box
    kx = torch.fft.rfftfreq(box, dtype=torch.float64) * box
    kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
    r = torch.sqrt(kxx**2 + kyy**2)
    mask = (r >= min_radius) & (r <= max_radius) & ~((kxx == 0) & (kyy < 0))
    return mask, torch.stack([kxx[mask], kyy[mask]], -1)


def fourier_cube(volume: torch.Tensor, max_radius: float, pad: int = 2) -> torch.Tensor:
    """The part of a map's 3D transform within ``max_radius`` (cycles per box), ready for slicing.

    The map is first Fourier-cropped to the smallest box holding the band (nothing of the band is
    lost and a large map costs no more than a small one), zero-padded ``pad`` times and divided by
    the trilinear kernel's transform (sinc²), so that slices interpolated from it are accurate.

    Args:
        volume: ``(D, D, D)`` map indexed ``[z, y, x]``, centre at ``D//2``.
        max_radius: highest frequency needed, cycles per box of ``D``.
        pad: padding factor.

    Returns:
        ``(2, C, C, C)`` float32: real and imaginary parts, indexed ``[z, y, x]``, DC at the centre
        ``C//2``, one voxel per ``1/pad`` cycle per box.
    """
    d = volume.shape[-1]
    small = min(d, 2 * (math.ceil(max_radius) + 2))
    vol = fourier_resize_map(volume.double(), small) * (d / small) ** 3  # keep the transform's scale
    p = pad * small
    extra = (p - small) // 2
    vol = F.pad(vol - vol[0].mean(), (extra, p - small - extra) * 3)
    c = torch.sinc(torch.fft.fftshift(torch.fft.fftfreq(p, dtype=torch.float64))) ** 2
    vol = vol / (c[:, None, None] * c[None, :, None] * c[None, None, :])
    dims = (-3, -2, -1)
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol, dim=dims), dim=dims), dim=dims)
    half = min(p // 2 - 1, math.ceil(pad * max_radius) + 2)
    sl = slice(p // 2 - half, p // 2 + half + 1)
    ft = ft[sl, sl, sl]
    return torch.stack([ft.real, ft.imag]).float()


def central_slices(cube: torch.Tensor, rotmats: torch.Tensor, points: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Central slices ``P_R(k) = V̂(R·(k_x, k_y, 0))`` of a :func:`fourier_cube` at ``points``.

    Args:
        cube: ``(2, C, C, C)`` from :func:`fourier_cube` (same ``pad``).
        rotmats: ``(..., 3, 3)`` poses R (image → map coordinates).
        points: ``(M, 2)`` image frequencies, cycles per box.

    Returns:
        ``(..., M)`` complex64.
    """
    batch = rotmats.shape[:-2]
    c = cube.shape[-1]
    k = torch.cat([points, torch.zeros_like(points[:, :1])], -1).to(cube.device, torch.float32)  # (M, 3) xyz
    xyz = torch.einsum("...ij,mj->...mi", rotmats.to(cube.device, torch.float32).reshape(-1, 3, 3), k)
    grid = (xyz * pad / (c // 2)).reshape(1, 1, 1, -1, 3)  # grid_sample wants (x, y, z) in [-1, 1]
    out = F.grid_sample(cube[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.reshape(2, *batch, points.shape[0])
    return torch.complex(out[0], out[1])


def image_spectra(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, M)`` complex64: the ``rfft2`` coefficients of ``(B, D, D)`` images (centre ``D//2``) in ``mask``."""
    ft = torch.fft.rfft2(torch.fft.ifftshift(images.float(), dim=(-2, -1)))
    return ft[:, mask.to(images.device)]


def shift_phases(shifts_px: torch.Tensor, points: torch.Tensor, box: int) -> torch.Tensor:
    """``(..., M)`` complex64 factors ``exp(−2πi k·s / D)`` that displace an image by ``shifts_px``
    ``(..., 2)`` (x, y) pixels, at ``points`` ``(M, 2)`` (cycles per box)."""
    arg = (shifts_px.double() @ points.to(shifts_px.device).double().T) * (-2 * math.pi / box)
    return torch.polar(torch.ones_like(arg), arg).to(torch.complex64)


def shift_grid(radius: float, step: float) -> torch.Tensor:
    """``(S, 2)`` shifts (pixels) on a square lattice of ``step`` within ``radius``, the origin first."""
    n = int(math.floor(radius / step + 1e-9))
    a = torch.arange(-n, n + 1, dtype=torch.float64) * step
    g = torch.stack(torch.meshgrid(a, a, indexing="xy"), -1).reshape(-1, 2)
    g = g[(g**2).sum(-1) <= radius**2 + 1e-9]
    order = torch.argsort((g**2).sum(-1), stable=True)
    return g[order]


def match_scores(spectra: torch.Tensor, ctf: torch.Tensor, slices: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlations ``c`` (module docstring) of images with CTF-modulated, shifted
    projections.

    Args:
        spectra: ``(B, M)`` complex image coefficients (:func:`image_spectra`).
        ctf: ``(B, M)`` real CTF at the same coefficients.
        slices: ``(R, M)`` projections shared by the batch, or ``(B, R, M)`` one set per image.
        phases: ``(S, M)`` shift factors shared by the batch, or ``(B, S, M)`` one set per image.

    Returns:
        ``(B, S, R)`` float32.
    """
    y = spectra.conj()[:, None, :] * phases * ctf[:, None, :].to(spectra.dtype)  # (B, S, M)
    pt = slices.transpose(-1, -2)
    num = y.real @ pt.real - y.imag @ pt.imag
    norm = (ctf.float() ** 2)[:, None, :] @ (slices.real**2 + slices.imag**2).transpose(-1, -2)  # (B, 1, R)
    return num / norm.clamp_min(1e-20).sqrt()


_SHIFT_STEPS = torch.tensor(
    [[0.0, 0.0], [1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=torch.float64
)


def _local_search(
    spectra, ctf, cube, points, rotmats, shifts, box: int, pad: int, step_deg: float, shift_step: float, rounds: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pattern search from ``rotmats (B, 3, 3)`` and ``shifts (B, 2)`` (pixels): each round tries the
    7 turns of :func:`~cryopose.geometry.axis_turns` times the 9 shift moves, keeps the best, and halves
    both steps. Returns the best rotations, shifts and their scores ``(B,)``."""
    dev = spectra.device
    b = len(spectra)
    rot, shift = rotmats.to(dev, torch.float64), shifts.to(dev, torch.float64)
    score = match_scores(
        spectra, ctf, central_slices(cube, rot[:, None], points, pad), shift_phases(shift[:, None], points, box)
    )[:, 0, 0]
    for _ in range(rounds):
        cand_rot = rot[:, None] @ axis_turns(step_deg).to(dev)[None]  # (B, 7, 3, 3): R·δ
        cand_shift = shift[:, None] + shift_step * _SHIFT_STEPS.to(dev)[None]  # (B, 9, 2)
        s = match_scores(
            spectra, ctf, central_slices(cube, cand_rot, points, pad), shift_phases(cand_shift, points, box)
        )  # (B, 9, 7)
        best, flat = s.reshape(b, -1).max(-1)
        take = best > score  # a round never makes a particle worse
        i_shift, i_rot = flat // 7, flat % 7
        ar = torch.arange(b, device=dev)
        rot = torch.where(take[:, None, None], cand_rot[ar, i_rot], rot)
        shift = torch.where(take[:, None], cand_shift[ar, i_shift], shift)
        score = torch.where(take, best, score)
        step_deg, shift_step = step_deg / 2, shift_step / 2
    return rot, shift, score


def _batches(n: int, size: int, desc: str, progress: bool):
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
    with bar:
        for start in range(0, n, size):
            idx = np.arange(start, min(n, start + size))
            yield idx
            bar.update(len(idx))


def projection_match(
    images: torch.Tensor | callable,
    ctf: torch.Tensor | callable,
    n: int,
    reference: torch.Tensor,
    pixel_size: float,
    config: MatchingConfig = MatchingConfig(),
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global coarse-to-fine projection matching of ``n`` particles against ``reference``.

    Args:
        images: ``(N, D, D)`` images, or a function of an index array returning that batch (so a
            large stack is streamed from disk).
        ctf: ``(N, D, D//2+1)`` CTFs in ``rfft2`` layout (or a function of the indices); use ``|CTF|``
            for phase-flipped images.
        n: number of particles.
        reference: ``(D, D, D)`` map on the images' pixel grid.
        pixel_size: Å per pixel.

    Returns:
        ``rotmats (N, 3, 3)`` float64, ``shifts (N, 2)`` float64 particle displacements in pixels
        (RELION origin = −shift·pixel size), and ``confidence (N,)``: the maximum posterior
        probability of a grid cell in the global search (shared by symmetry mates, so comparable
        within an entry).
    """
    dev = select_device(config.device)
    report_device("projection matching", dev)
    d = reference.shape[-1]
    get_images = images if callable(images) else (lambda idx: images[idx])
    get_ctf = ctf if callable(ctf) else (lambda idx: ctf[idx])
    r_coarse = band_radius(d, pixel_size, config.coarse_resolution)
    r_fine = band_radius(d, pixel_size, config.fine_resolution)
    mask_c, pts_c = band_mask(d, r_coarse)
    mask_f, pts_f = band_mask(d, r_fine)
    cube_c = fourier_cube(reference, r_coarse, config.pad).to(dev)
    cube_f = fourier_cube(reference, r_fine, config.pad).to(dev)
    grid = so3_healpix_grid(config.coarse_order, dtype=torch.float64)
    slices_c = central_slices(cube_c, grid, pts_c, config.pad)  # (R, Mc)
    shifts_c = shift_grid(config.max_shift / pixel_size, config.coarse_shift_step)
    phases_c = shift_phases(shifts_c.to(dev), pts_c, d)  # (S, Mc)
    spacing = math.degrees((8 * math.pi**2 / so3_grid_size(config.coarse_order)) ** (1 / 3))
    k = min(config.candidates, len(grid))

    rot_out = torch.empty(n, 3, 3, dtype=torch.float64)
    shift_out = torch.empty(n, 2, dtype=torch.float64)
    conf_out = torch.empty(n, dtype=torch.float64)
    for idx in _batches(n, config.batch_size, "projection matching", progress):
        img = get_images(idx).to(dev)
        c = get_ctf(idx).to(dev).float()
        spec_c, spec_f = image_spectra(img, mask_c), image_spectra(img, mask_f)
        ctf_c, ctf_f = c[:, mask_c.to(dev)], c[:, mask_f.to(dev)]
        scores = match_scores(spec_c, ctf_c, slices_c, phases_c)  # (B, S, R)
        # Posterior over (rotation, shift) from the log-likelihood ratio c·|c|/σ², with σ² the
        # image's power in the band (noise-dominated at cryo-EM SNR).
        sigma2 = (spec_c.abs() ** 2).mean(-1).clamp_min(1e-20)
        loglik = scores * scores.abs() / sigma2[:, None, None]
        log_post = torch.logsumexp(loglik, dim=1)  # (B, R): shifts marginalised
        conf = torch.softmax(log_post, dim=-1).max(-1).values
        best_over_shift, which_shift = scores.max(1)  # (B, R)
        top = best_over_shift.topk(k, dim=-1).indices  # (B, K)
        b = len(idx)
        cand_rot = grid.to(dev)[top]  # (B, K, 3, 3)
        cand_shift = shifts_c.to(dev)[torch.gather(which_shift, 1, top)]  # (B, K, 2)
        rot, shift, score = _local_search(
            spec_f.repeat_interleave(k, 0),
            ctf_f.repeat_interleave(k, 0),
            cube_f,
            pts_f,
            cand_rot.reshape(-1, 3, 3),
            cand_shift.reshape(-1, 2),
            d,
            config.pad,
            spacing / 2,
            config.coarse_shift_step / 2,
            config.rounds,
        )
        pick = score.reshape(b, k).argmax(-1) + torch.arange(b, device=dev) * k
        rot_out[idx], shift_out[idx] = rot[pick].cpu(), shift[pick].cpu()
        conf_out[idx] = conf.double().cpu()
    return rot_out, shift_out, conf_out


def refine_poses(
    images: torch.Tensor | callable,
    ctf: torch.Tensor | callable,
    n: int,
    reference: torch.Tensor,
    pixel_size: float,
    rotmats: torch.Tensor,
    shifts_px: torch.Tensor,
    config: RefineConfig = RefineConfig(),
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local refinement of given poses (and shifts) against ``reference``.

    First the shift alone, over a lattice of 1 pixel within ``local_max_shift`` of the given one
    (networks that predict rotations only give zero), then ``local_rounds`` rounds of the local
    pattern search of rotations and shifts (steps from ``local_step`` degrees and 0.5 pixel,
    halved each round). A particle never moves to a worse score than its start.

    Args: as :func:`projection_match`, plus the starting ``rotmats (N, 3, 3)`` and ``shifts_px (N, 2)``.

    Returns:
        ``rotmats (N, 3, 3)``, ``shifts (N, 2)`` pixels, and ``scores (N,)`` (the normalised
        correlation of the final pose).
    """
    dev = select_device(config.local_device)
    report_device("local refinement", dev)
    d = reference.shape[-1]
    get_images = images if callable(images) else (lambda idx: images[idx])
    get_ctf = ctf if callable(ctf) else (lambda idx: ctf[idx])
    radius = band_radius(d, pixel_size, config.local_resolution)
    mask, pts = band_mask(d, radius)
    cube = fourier_cube(reference, radius).to(dev)
    offsets = shift_grid(config.local_max_shift / pixel_size, 1.0).to(dev)  # (S, 2)
    rot_out = torch.empty(n, 3, 3, dtype=torch.float64)
    shift_out = torch.empty(n, 2, dtype=torch.float64)
    score_out = torch.empty(n, dtype=torch.float64)
    for idx in _batches(n, config.local_batch_size, "local refinement", progress):
        img = get_images(idx).to(dev)
        c = get_ctf(idx).to(dev).float()[:, mask.to(dev)]
        spec = image_spectra(img, mask)
        rot0 = rotmats[idx].to(dev, torch.float64)
        cand = shifts_px[idx].to(dev, torch.float64)[:, None] + offsets[None]  # (B, S, 2)
        s = match_scores(spec, c, central_slices(cube, rot0[:, None], pts), shift_phases(cand, pts, d))[..., 0]
        shift0 = cand[torch.arange(len(idx), device=dev), s.argmax(-1)]
        rot, shift, score = _local_search(
            spec, c, cube, pts, rot0, shift0, d, 2, config.local_step, 0.5, config.local_rounds
        )
        rot_out[idx], shift_out[idx], score_out[idx] = rot.cpu(), shift.cpu(), score.double().cpu()
    return rot_out, shift_out, score_out


# ---------------------------------------------------------------------------------------------
# Entry level: particles streamed from an entry's stack (the methods and the refinement write the predictions)
# ---------------------------------------------------------------------------------------------


def entry_particles(entry, half: int):
    """``(dataset, images(idx), ctf(idx), n, pixel_size)`` of one half of an entry, raw images read
    from the memory-mapped stack batch by batch; ``|CTF|`` for phase-flipped particles."""
    from .ctf import ctf_from_parameters, ctf_parameters
    from .data import ParticlesDataset
    from .io import particles_with_optics

    dataset = ParticlesDataset(entry, half, normalise=False, ctf_correction=None)
    merged = particles_with_optics(dataset.entry.read_star(half)).reset_index(drop=True)
    params = ctf_parameters(merged, source=str(dataset.star_path))
    flipped = torch.from_numpy(merged.get("rlnCtfDataArePhaseFlipped", 0 * merged.index).to_numpy() == 1)
    d, px = dataset.original_box_size, dataset.original_sampling_rate

    def ctf(idx):
        c = ctf_from_parameters({k: v[idx] for k, v in params.items()}, d, px, dtype=torch.float32)
        return torch.where(flipped[idx][:, None, None], c.abs(), c)

    return dataset, dataset.read_raw, ctf, len(dataset), px


def check_reference(reference: np.ndarray, ref_px: float, box: int, pixel_size: float, path) -> None:
    from .errors import InputError

    if reference.shape != (box,) * 3:
        raise InputError(
            f"reference map is {'×'.join(map(str, reference.shape))} voxels; the particles need {box}×{box}×{box}",
            path=path,
            where="map size",
        )
    if ref_px > 0 and not math.isclose(ref_px, pixel_size, rel_tol=1e-3):  # 0: the header sets none
        raise InputError(
            f"reference map has {ref_px:.4g} Å per voxel; the particles have {pixel_size:.4g} Å per pixel",
            path=path,
            where="voxel size",
        )
    if not np.isfinite(reference).all():
        raise InputError("reference map contains NaN or infinity", path=path)
