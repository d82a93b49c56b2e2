#!/usr/bin/env python
"""Wall time of the torch reconstructor against relion_reconstruct on the same half, at equal quality.

    .venv/bin/python benchmarks/reconstruct_speed.py [--n-particles 20000] [--box-size 128] [--device cuda]
        [--json rows.json] [--quick]

Simulates (once) an entry of N particles of S px, reconstructs half 0 with both backends
(``relion_reconstruct --ctf --pad 2``, one process, and the torch backend on the chosen device),
and prints times, their ratio, and each map's PCC and FSC-0.5 shell against the true map and
against each other (``--json``: also as rows for ``benchmarks/run_all``; ``--quick``: 500 particles of
64 px, a smoke test). Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, relion_name, row, write_rows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-particles", type=int, default=None, help="default 20000 (--quick: 500)")
    p.add_argument("--box-size", type=int, default=None, help="default 128 (--quick: 64)")
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryopose-bench"))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument("--skip-eager", action="store_true", help="time only the compiled torch path")
    add_output_args(p, "500 particles of 64 px: a smoke test")
    args = p.parse_args()
    if args.n_particles is None:
        args.n_particles = 500 if args.quick else 20000
    if args.box_size is None:
        args.box_size = 64 if args.quick else 128

    import torch

    from cryopose import io
    from cryopose.metrics import fsc_curve, pearson_correlation
    from cryopose.reconstruct import reconstruct

    name = f"rec{args.box_size}_{args.n_particles}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cryopose",
            "simulate",
            "--name",
            name,
            "--box-size",
            str(args.box_size),
            "--pixel-size",
            str(args.pixel_size),
            "--n-particles",
            str(args.n_particles),
            "--snr",
            "0.1",
            "--out",
            str(args.workdir),
            "--quiet",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    entry = args.workdir / name
    star = entry / "particles_0.star"
    truth, px = io.read_map(entry / f"{name}_source_map.mrc")

    def shell_05(vol, ref):
        f, fsc = fsc_curve(vol, ref, px)
        below = [i for i in range(1, len(fsc)) if fsc[i] < 0.5]
        return 1 / f[below[0]] if below else 2 * px

    rows = []
    for label, compile_ in (("torch (compiled)", True), ("torch (eager)", False)):
        if label == "torch (eager)" and args.skip_eager:
            continue
        t = time.perf_counter()  # the compiled row includes building the kernel (~20 s, once per process)
        vt, _ = reconstruct(star, backend="torch", device=args.device, progress=False, compile=compile_)
        rows.append((label, time.perf_counter() - t, vt))
    if not args.skip_relion:
        t = time.perf_counter()
        vr, _ = reconstruct(star, backend="relion")
        rows.append(("relion_reconstruct", time.perf_counter() - t, vr))
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"{args.n_particles} particles × {args.box_size}² px, SNR 0.1, C1, pad 2; torch on {dev} "
        f"({torch.get_num_threads()} threads), relion_reconstruct 1 process; {os.cpu_count()} CPUs"
    )
    print(f"{'backend':<20} {'seconds':>8} {'PCC vs truth':>13} {'FSC=0.5 vs truth (Å)':>21}")
    for label, secs, vol in rows:
        print(f"{label:<20} {secs:>8.1f} {pearson_correlation(vol, truth):>13.4f} {shell_05(vol, truth):>21.2f}")
    ref = next((r for r in rows if r[0] == "relion_reconstruct"), None)
    if ref is not None:
        for label, secs, vol in rows[:-1]:
            print(
                f"{label}: time ratio / relion = {secs / ref[1]:.2f}; PCC vs relion = "
                f"{pearson_correlation(vol, ref[2]):.4f}"
            )

    ref_name = relion_name()
    size = f"{args.n_particles:,} × {args.box_size}² px"
    out = []
    for label, secs, vol in rows:
        if label == "relion_reconstruct":
            continue
        backend = f"torch backend ({dev}, {label[len('torch (') : -1]})"
        out.append(
            row(
                f"reconstruction of one half, {size}, {backend}",
                secs,
                ref[1] if ref else None,
                "s",
                ref_name if ref else "",
                lower_is_better=True,
            )
        )
        if label != "torch (compiled)":
            continue  # the same map: one PCC row
        out.append(
            row(
                f"reconstruction PCC vs true map, {size}, torch backend",
                pearson_correlation(vol, truth),
                pearson_correlation(ref[2], truth) if ref else None,
                "PCC",
                ref_name if ref else "",
                lower_is_better=False,
            )
        )
    write_rows(args.json, out)


if __name__ == "__main__":
    main()
