#!/usr/bin/env python
"""The torch reconstructor against relion_reconstruct: wall time, peak memory and map quality, at
several box sizes, and the splatting kernels it could use, each measured in the same run.

    .venv/bin/python benchmarks/reconstruct_speed.py [--sizes 64:20000 128:20000 256:5000]
        [--kernel-size 128] [--scaling-size 256] [--device cuda] [--json rows.json] [--quick]

For each ``BOX:PARTICLES`` an entry is simulated once (SNR 0.1, C1, CTF, 1.5 Å/px, under
``--workdir``) and half 0 is reconstructed, each run in a fresh process so that its peak resident
memory is its own (``ru_maxrss``; for RELION that of the relion_reconstruct process):

* ``relion_reconstruct --ctf --pad 2`` (one process: it has no threads), the reference;
* the torch backend with its default kernel (numba on the CPU, ``index_add_`` on a GPU);
* at ``--kernel-size`` only, the other ways to splat, to show why the default is what it is:
  torch operations with ``index_add_`` (``kernel="torch"``), the same fused by ``torch.compile``,
  and the ``torch-projectors`` package's native back-projector (whether it loads is reported).

Quality: each map's PCC and FSC = 0.5 / 0.143 resolution against the true map, and the PCC of the
torch map with RELION's. At ``--scaling-size`` the default kernel also runs on a fifth of the
particles: time and peak memory against the particle count, projected linearly to 100,000
particles (the memory must not grow with it). The times include reading the stacks and the
finishing Fourier steps, not Python's start-up. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, relion_name, row, write_rows  # noqa: E402

PROJECTED_PARTICLES = 100_000


def _worker(args: argparse.Namespace) -> None:
    """One reconstruction in this process; prints ``{"seconds", "peak_mb"}`` as JSON."""
    import numpy as np

    if args.kernel == "torch-projectors":
        if args.torch_projectors:
            sys.path.insert(0, str(args.torch_projectors))
        import torch_projectors  # noqa: F401 - the point is whether it loads

        raise SystemExit("torch-projectors loaded; its back-projector is not wired into this benchmark")
    from cryopose.reconstruct import reconstruct

    t = time.perf_counter()
    if args.kernel == "relion":
        # relion_reconstruct started through a small Python of its own that reports the program's
        # peak memory: a child forked from this process would count torch's pages as its own.
        launcher = [sys.executable, __file__, "--peak-of", str(args.out) + ".peak"]
        vol, _ = reconstruct(args.star, backend="relion", launcher=launcher)
    else:
        vol, _ = reconstruct(args.star, backend="torch", device=args.device, progress=False, kernel=args.kernel)
    seconds = time.perf_counter() - t
    np.save(args.out, vol)
    if args.kernel == "relion":
        peak = float(Path(str(args.out) + ".peak").read_text())
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak}))


def _peak_of(report: str, command: list[str]) -> int:
    """Run ``command``; write its peak resident memory (MB) to ``report``; return its exit status."""
    code = subprocess.run(command).returncode
    Path(report).write_text(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}\n")
    return code


def _measure(star: Path, kernel: str | None, device: str | None, out: Path, extra_path: Path | None = None) -> dict:
    """Run :func:`_worker` in a fresh process; ``{"seconds", "peak_mb"}`` or ``{"error": text}``."""
    cmd = [sys.executable, __file__, "--worker", "--star", str(star), "--out", str(out)]
    cmd += ["--kernel", kernel or "default"] + (["--device", device] if device else [])
    if extra_path:
        cmd += ["--torch-projectors", str(extra_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        return {"error": lines[-1][:160] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _simulate(workdir: Path, box: int, n: int, pixel_size: float) -> Path:
    name = f"rec{box}_{n}"
    entry = workdir / name
    if not (entry / "particles_0.star").is_file():
        cmd = [sys.executable, "-m", "cryopose", "simulate", "--name", name, "--box-size", str(box)]
        cmd += ["--pixel-size", str(pixel_size), "--n-particles", str(n), "--snr", "0.1"]
        subprocess.run(cmd + ["--out", str(workdir), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return entry


def _subset(star: Path, n: int) -> Path:
    """The first ``n`` particles of ``star`` as a STAR file beside it (same stacks)."""
    from cryopose import io

    out = star.with_name(f"first{n}_{star.name}")
    if not out.is_file():
        particles = io.read_particles_star(star)
        io.write_particles_star(out, io.ParticleStar(particles.optics, particles.particles.iloc[:n].copy()))
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--peak-of":  # the launcher of relion_reconstruct (_worker)
        raise SystemExit(_peak_of(sys.argv[2], sys.argv[3:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=None, help="BOX:PARTICLES (default 64:20000 128:20000 256:5000)")
    p.add_argument("--kernel-size", type=int, default=None, help="box size at which every kernel runs (default 128)")
    p.add_argument("--scaling-size", type=int, default=None, help="box size of the particle-count scaling (256)")
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryopose-bench"))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument(
        "--torch-projectors",
        type=Path,
        default=None,
        help="a folder where torch-projectors is installed (pip install --target DIR torch-projectors --no-deps)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--star", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--kernel", help=argparse.SUPPRESS)
    add_output_args(p, "500 and 200 particles of 32 and 48 px: a smoke test")
    args = p.parse_args()
    if args.worker:
        args.kernel = None if args.kernel == "default" else args.kernel
        _worker(args)
        return
    if args.sizes is None:
        args.sizes = ["32:500", "48:200"] if args.quick else ["64:20000", "128:20000", "256:5000"]
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes]
    kernel_size = args.kernel_size or (32 if args.quick else 128)
    scaling_size = args.scaling_size or (48 if args.quick else 256)

    import numpy as np
    import torch

    from cryopose import io
    from cryopose.metrics import fsc_curve, fsc_resolution, pearson_correlation

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default = "numba" if dev == "cpu" else "torch"
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"torch on {dev} ({torch.get_num_threads()} threads; default kernel {default}), relion_reconstruct "
        f"one process; {os.cpu_count()} CPUs; each run a fresh process"
    )
    results = []  # (box, n, label, measurement, map or None)
    for box, n in sizes:
        entry = _simulate(args.workdir, box, n, args.pixel_size)
        star = entry / "particles_0.star"
        truth, px = io.read_map(entry / f"{entry.name}_source_map.mrc")
        runs = [(f"torch ({dev}, {default})", None, star)]
        if box == kernel_size and dev == "cpu":
            runs += [(f"torch ({dev}, {k})", k, star) for k in ("torch", "torch-compile", "torch-projectors")]
        if box == scaling_size:
            runs.append((f"torch ({dev}, {default}), first {n // 5:,}", None, _subset(star, n // 5)))
        if not args.skip_relion:
            runs.append(("relion_reconstruct", "relion", star))
        for label, kernel, which in runs:
            out = args.workdir / f"{entry.name}_{(kernel or 'default').replace('-', '_')}.npy"
            m = _measure(which, kernel, args.device, out, args.torch_projectors)
            vol = np.load(out) if "error" not in m else None
            results.append((box, n // 5 if "first" in label else n, label, m, vol))
            if vol is not None:
                freq, fsc = fsc_curve(vol, truth, px)
                m.update(
                    pcc=pearson_correlation(vol, truth),
                    fsc05=fsc_resolution(freq, fsc, 0.5),
                    fsc0143=fsc_resolution(freq, fsc, 0.143),
                )
            shown = m.get("error") or f"{m['seconds']:.1f} s, {m['peak_mb']:.0f} MB"
            print(f"{box}² × {n:,}: {label}: {shown}", flush=True)

    print()
    print(
        "| size | implementation | seconds | peak MB | PCC vs truth | FSC 0.5 / 0.143 vs truth (Å) "
        "| PCC vs RELION | RELION's time / this | memory / RELION's |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    ref_name = relion_name()
    for box, n, label, m, vol in results:
        ref = next((r for r in results if r[0] == box and r[2] == "relion_reconstruct" and "error" not in r[3]), None)
        if "error" in m:
            print(f"| {box}² × {n:,} | {label} | does not run: {m['error']} | | | | | | |")
            continue
        same_n = ref is not None and ref[1] == n
        vs = f"{pearson_correlation(vol, ref[4]):.4f}" if ref is not None and label != ref[2] else ""
        t_ratio = f"{ref[3]['seconds'] / m['seconds']:.2f}×" if same_n and label != ref[2] else ""
        m_ratio = f"{m['peak_mb'] / ref[3]['peak_mb']:.2f}" if ref is not None and label != ref[2] else ""
        print(
            f"| {box}² × {n:,} | {label} | {m['seconds']:.1f} | {m['peak_mb']:.0f} | {m['pcc']:.4f} | "
            f"{m['fsc05']:.2f} / {m['fsc0143']:.2f} | {vs} | {t_ratio} | {m_ratio} |"
        )
        if label == "relion_reconstruct" or not same_n:
            continue
        size = f"{n:,} × {box}² px"
        rows.append(
            row(f"reconstruction of one half, {size}, {label}", m["seconds"], ref[3]["seconds"], "s", ref_name, True)
        )
        if "first" not in label and kernel_label(label) == default:
            rows.append(
                row(
                    f"reconstruction peak memory, {size}, {label}",
                    m["peak_mb"],
                    ref[3]["peak_mb"],
                    "MB",
                    ref_name,
                    True,
                )
            )
            rows.append(
                row(f"reconstruction PCC vs true map, {size}, {label}", m["pcc"], ref[3]["pcc"], "PCC", ref_name, False)
            )
    scaling = [r for r in results if r[0] == scaling_size and kernel_label(r[2]) == default and "error" not in r[3]]
    if len(scaling) == 2:
        (_, n_big, _, big, _), (_, n_small, _, small, _) = sorted(scaling, key=lambda r: -r[1])
        per = (big["seconds"] - small["seconds"]) / (n_big - n_small)
        projected = big["seconds"] + per * (PROJECTED_PARTICLES - n_big)
        print(
            f"\nscaling at {scaling_size}²: {n_small:,} particles {small['seconds']:.1f} s / "
            f"{small['peak_mb']:.0f} MB, "
            f"{n_big:,} particles {big['seconds']:.1f} s / {big['peak_mb']:.0f} MB; "
            f"{per * 1e3:.2f} ms per particle, so {PROJECTED_PARTICLES:,} particles ≈ {projected:.0f} s "
            f"(memory: the volume's, not the particles')"
        )
    write_rows(args.json, rows)


def kernel_label(label: str) -> str:
    """``"torch (cpu, numba), first 1,000"`` → ``"numba"``."""
    return label.split("(", 1)[-1].split(")", 1)[0].split(", ")[-1] if "(" in label else label


if __name__ == "__main__":
    main()
