#!/usr/bin/env python
"""FSC + PCC of two 232³ maps: cryopose.metrics.compare_maps against the CESPED package's compute_stats.

    .venv/bin/python benchmarks/fsc_speed.py [--size 232] [--cesped-python /tmp/cesped-venv/bin/python]
        [--json rows.json] [--quick]

Makes two half-maps (one smooth random density inside a sphere plus independent noise per half,
so the FSC falls through both thresholds), saves them as .npy, then times each implementation in a
fresh process: wall time of the first call (FFT plans cold) and the best of three, and the peak
resident memory (ru_maxrss) above the resident memory just before the calls, maps loaded. Each
computes the unmasked PCC and FSC resolution at 0.143 and 0.5; the masked variant is timed too.
Prints a table and the numbers side by side (``--json``: also as rows for ``benchmarks/run_all``;
``--quick``: 64³ maps, a smoke test). Without the CESPED environment, only cryopose is timed.
Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, cesped_name, row, write_rows  # noqa: E402

OURS = r"""
import json, resource, sys, time
import numpy as np, torch
from cryopose.metrics import compare_maps
a, b, m = (np.load(sys.argv[1] + f) for f in ("/a.npy", "/b.npy", "/m.npy"))
px = float(sys.argv[2]); masked = sys.argv[3] == "masked"
base = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])  # current, KB
times = []
for _ in range(3):
    t = time.perf_counter()
    r = compare_maps(a, b, px, mask=m if masked else None)
    times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = r.masked_resolution if masked else r.resolution
pcc = r.masked_pcc if masked else r.pcc
print(json.dumps({"first": times[0], "best": min(times), "peak_mb": (peak - base) / 1024, "pcc": pcc,
                  "fscr0.143": res[0.143], "fscr0.5": res[0.5]}))
"""

CESPED = r"""
import json, resource, sys, time, io, contextlib
import numpy as np
from cesped.utils.volumeStats import compute_stats
a, b, m = (np.load(sys.argv[1] + f) for f in ("/a.npy", "/b.npy", "/m.npy"))
px = float(sys.argv[2]); masked = sys.argv[3] == "masked"
base = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])  # current, KB
out = {}
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    (corr, mcorr), r143 = compute_stats(a, b, maskOrFname=m if masked else None, samplingRate=px,
                                        resolution_threshold=0.143)
first = time.perf_counter() - t
with contextlib.redirect_stdout(io.StringIO()):
    _, r05 = compute_stats(a, b, maskOrFname=m if masked else None, samplingRate=px, resolution_threshold=0.5)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
i = 1 if masked else 0
print(json.dumps({"first": first, "best": first, "peak_mb": (peak - base) / 1024,
                  "pcc": float(mcorr if masked else corr), "fscr0.143": float(r143[i]), "fscr0.5": float(r05[i])}))
"""


def make_maps(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = np.arange(size) - size // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    inside = r < 0.35 * size
    signal = ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 1.5) * inside
    signal /= signal.std()
    halves = [
        (signal + 1.5 * ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 0.6)).astype(np.float32) for _ in range(2)
    ]
    mask = ndimage.gaussian_filter((r < 0.4 * size).astype(np.float32), 2.0)
    return halves[0], halves[1], mask.astype(np.float32)


def run(python: str, code: str, folder: Path, px: float, variant: str, env: dict | None = None) -> dict:
    proc = subprocess.run([python, "-c", code, str(folder), str(px), variant], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{python} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="map side in voxels (default 232; --quick: 64)")
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--cesped-python", default="/tmp/cesped-venv/bin/python")
    p.add_argument("--skip-cesped", action="store_true")
    add_output_args(p, "64³ maps: a smoke test")
    args = p.parse_args()
    if args.size is None:
        args.size = 64 if args.quick else 232
    if not args.skip_cesped and not Path(args.cesped_python).is_file():
        print(f"(no reference: {args.cesped_python} not found; see benchmarks/README.md to install cesped)")
        args.skip_cesped = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, arr in zip("abm", make_maps(args.size)):
            np.save(folder / f"{name}.npy", arr)
        rows = []
        for variant in ("unmasked", "masked"):
            ours = run(sys.executable, OURS, folder, args.pixel_size, variant)
            rows.append(("cryopose", variant, ours))
            if not args.skip_cesped:
                theirs = run(args.cesped_python, CESPED, folder, args.pixel_size, variant)
                rows.append(("CESPED", variant, theirs))
    print(f"two {args.size}³ float32 maps, {args.pixel_size} Å/px; PCC + FSC resolution at 0.143 and 0.5")
    print(
        f"{'implementation':<10} {'variant':<9} {'first s':>8} {'best s':>7} {'peak +MB':>9} {'PCC':>8} "
        f"{'FSCR0.143':>10} {'FSCR0.5':>8}"
    )
    for impl, variant, r in rows:
        print(
            f"{impl:<10} {variant:<9} {r['first']:>8.2f} {r['best']:>7.2f} {r['peak_mb']:>9.0f} {r['pcc']:>8.4f} "
            f"{r['fscr0.143']:>10.3f} {r['fscr0.5']:>8.3f}"
        )
    if not args.skip_cesped:
        for variant in ("unmasked", "masked"):
            o = next(r for i, v, r in rows if i == "cryopose" and v == variant)
            c = next(r for i, v, r in rows if i == "CESPED" and v == variant)
            print(
                f"{variant}: CESPED / cryopose time = {c['first'] / o['first']:.1f}× (first call), "
                f"{c['first'] / o['best']:.1f}× (warm); memory {c['peak_mb'] / max(o['peak_mb'], 1):.1f}×"
            )

    ref_name = cesped_name(None if args.skip_cesped else args.cesped_python)
    out = []
    for variant in ("unmasked", "masked"):
        o = next(r for i, v, r in rows if i == "cryopose" and v == variant)
        c = next((r for i, v, r in rows if i == "CESPED" and v == variant), {})
        what = f"FSC + PCC of two {args.size}³ maps, {variant}"
        out.append(row(f"{what}, first call", o["first"], c.get("first"), "s", ref_name, lower_is_better=True))
        out.append(
            row(
                f"{what}, warm (reference: its only call)",
                o["best"],
                c.get("first"),
                "s",
                ref_name,
                lower_is_better=True,
            )
        )
        out.append(
            row(
                f"{what}, peak memory above the loaded maps",
                o["peak_mb"],
                c.get("peak_mb"),
                "MB",
                ref_name,
                lower_is_better=True,
            )
        )
    write_rows(args.json, out)


if __name__ == "__main__":
    main()
