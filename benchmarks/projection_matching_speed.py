#!/usr/bin/env python
"""Projection matching speed: cryopose's search against a textbook FFT cross-correlation search,
same particles, same grid, same run.

    .venv/bin/python benchmarks/projection_matching_speed.py [--device cpu|cuda] [--particles 256]
        [--orders 1 2 3] [--sizes 32 64 128] [--threads 2] [--json rows.json] [--quick]

Data: a pseudo-molecule (C1) at 2.13 Å/px projected at random poses with random shifts (σ 2 px),
CTF (defocus 0.5–2.5 µm) and white noise at SNR 0.1, as ``cryopose.simulate`` makes them; the
reference map is the molecule itself, so the figures measure the search, not the reference.

Rows:

* ``ours``: :func:`cryopose.matching.projection_match` with its defaults (coarse band 16 Å,
  shifts ±13 Å every 2 px, 8 candidates, 5 local rounds at 8 Å) at the given grid order; the
  global search alone (``rounds=0``) is timed too, so the reference compares like with like.
* ``reference``: the global search the textbook way, on the same grid, band and CTF: all grid
  projections' transforms made once, then for each particle the CTF-weighted product with every
  projection and an inverse FFT per projection, whose maximum over the shifts within ±13 Å is the
  score (normalised like ours). Its rotation errors are reported so both searches are seen to
  find the same poses.

Printed: particles/s of each, the ratio (ours' global search / reference), median angular error
of each, by grid order (at 64 px) and by image size (at order 2) (``--json``: also as rows for
``benchmarks/run_all``; ``--quick``: 16 particles at order 1, 64 px, a smoke test). Nothing here is
pass/fail.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from cryopose import matching
from cryopose.ctf import ctf_2d
from cryopose.geometry import random_rotations
from cryopose.grids import so3_healpix_grid
from cryopose.simulate import pseudo_molecule, simulate_images
from cryopose.symmetry import symmetry_aware_angle

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, write_rows  # noqa: E402
from _common import row as json_row

PIXEL = 2.13
REFERENCE_NAME = "textbook FFT search"


def particles(box: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    volume = torch.as_tensor(pseudo_molecule(box, PIXEL, "C1", seed=3)).float()
    rot = random_rotations(n, generator=g)
    shifts = torch.randn(n, 2, generator=g, dtype=torch.float64) * 2
    defocus = (torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.5) * 1e4
    ctf = ctf_2d(defocus, defocus, torch.zeros(n, dtype=torch.float64), 300.0, 2.7, 0.1, PIXEL, box, bfactor=40.0)
    clean = simulate_images(volume, rot, shifts, ctf, torch.ones(n, dtype=torch.float64))
    noise = torch.randn(clean.shape, generator=g) * clean.std() * math.sqrt(1 / 0.1)
    return volume, clean + noise, ctf.float(), rot


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_search(volume, images, ctf, config: matching.MatchingConfig, device, batch: int = 4):
    """The textbook global search: per particle and projection, an inverse FFT of the CTF-weighted
    cross-power spectrum, maximised over the shifts within the radius."""
    d = volume.shape[-1]
    radius = matching.band_radius(d, PIXEL, config.coarse_resolution)
    mask, points = matching.band_mask(d, radius)
    mask = mask.to(device)
    grid = so3_healpix_grid(config.coarse_order, dtype=torch.float64)
    cube = matching.fourier_cube(volume, radius, config.pad).to(device)
    proj = torch.zeros(len(grid), d, d // 2 + 1, dtype=torch.complex64, device=device)
    proj[:, mask] = matching.central_slices(cube, grid, points, config.pad)
    c = torch.arange(d, device=device)
    c = torch.minimum(c, d - c).float()  # circular distance of each lag
    in_range = (c[:, None] ** 2 + c[None, :] ** 2) <= (config.max_shift / PIXEL) ** 2
    best = torch.empty(len(images), dtype=torch.long)
    for start in range(0, len(images), batch):
        x = torch.fft.rfft2(torch.fft.ifftshift(images[start : start + batch].to(device), dim=(-2, -1)))
        x = x * mask
        k = ctf[start : start + batch].to(device)
        for i in range(len(x)):
            model = proj * k[i]
            cc = torch.fft.irfft2(x[i].conj() * model, s=(d, d))  # (R, d, d): correlation at every lag
            norm = (model.abs() ** 2)[:, mask].sum(-1).sqrt()
            score = cc.masked_fill(~in_range, -torch.inf).amax(dim=(-2, -1)) / norm
            best[start + i] = int(score.argmax())
    return grid[best]


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def row(box: int, order: int, n: int, n_ref: int, device) -> dict:
    volume, images, ctf, rot = particles(box, n)
    config = matching.MatchingConfig(coarse_order=order, device=str(device))
    coarse = matching.MatchingConfig(coarse_order=order, rounds=0, candidates=1, device=str(device))
    matching.projection_match(images[:8], ctf[:8], 8, volume, PIXEL, config, progress=False)  # warm-up
    t_full, (r_full, _, _) = timed(
        lambda: matching.projection_match(images, ctf, n, volume, PIXEL, config, progress=False), device
    )
    t_coarse, (r_coarse, _, _) = timed(
        lambda: matching.projection_match(images, ctf, n, volume, PIXEL, coarse, progress=False), device
    )
    t_ref, r_ref = timed(lambda: reference_search(volume, images[:n_ref], ctf[:n_ref], coarse, device), device)
    err = lambda r, m: float(symmetry_aware_angle(rot[:m], r[:m].double().cpu(), "C1").median())
    return {
        "box": box,
        "order": order,
        "rotations": 72 * 8**order,
        "ours": n / t_full,
        "ours_global": n / t_coarse,
        "reference": n_ref / t_ref,
        "err_ours": err(r_full, n),
        "err_global": err(r_coarse, n),
        "err_ref": err(r_ref, n_ref),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--particles", type=int, default=None, help="default 256 (--quick: 16)")
    parser.add_argument(
        "--reference-particles",
        type=int,
        default=None,
        help="the reference is slow: fewer particles (default 16; --quick: 4)",
    )
    parser.add_argument("--orders", type=int, nargs="+", default=None, help="default 1 2 3 (--quick: 1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default 32 64 128 (--quick: 64)")
    parser.add_argument("--threads", type=int, default=2)
    add_output_args(parser, "16 particles at order 1, 64 px: a smoke test")
    args = parser.parse_args()
    for key, full, quick in (
        ("particles", 256, 16),
        ("reference_particles", 16, 4),
        ("orders", [1, 2, 3], [1]),
        ("sizes", [32, 64, 128], [64]),
    ):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {name}; {args.particles} particles (reference: {args.reference_particles}), 2.13 Å/px, SNR 0.1")
    header = (
        "| box | grid order | rotations | ours p/s | ours, global search only p/s | reference p/s | "
        "ratio (global / reference) | median error ours / global / reference (°) |"
    )
    print(header)
    print("|" + " --- |" * 8)
    cases = [(64, o) for o in args.orders] + [(s, 2) for s in args.sizes if s != 64]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out = []
    for box, order in cases:
        n_ref = (
            args.reference_particles if order < 3 or device.type == "cuda" else max(4, args.reference_particles // 4)
        )
        r = row(box, order, args.particles, n_ref, device)
        print(
            f"| {r['box']} | {r['order']} | {r['rotations']} | {r['ours']:.1f} | {r['ours_global']:.1f} | "
            f"{r['reference']:.2f} | {r['ours_global'] / r['reference']:.0f}× | "
            f"{r['err_ours']:.1f} / {r['err_global']:.1f} / {r['err_ref']:.1f} |",
            flush=True,
        )
        what = f"projection matching, {box} px, grid order {order} ({r['rotations']:,} rotations), {where}"
        out.append(
            json_row(
                f"{what}: global search",
                r["ours_global"],
                r["reference"],
                "particles/s",
                REFERENCE_NAME,
                lower_is_better=False,
            )
        )
        out.append(
            json_row(
                f"{what}: whole search (global + local)", r["ours"], None, "particles/s", "", lower_is_better=False
            )
        )
    write_rows(args.json, out)


if __name__ == "__main__":
    main()
