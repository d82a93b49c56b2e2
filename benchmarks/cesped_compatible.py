#!/usr/bin/env python
"""cryopose's CESPED-compatible mode against the CESPED package's evaluate, on the same prediction files.

    .venv/bin/python benchmarks/cesped_compatible.py [--cesped-python /tmp/cesped-venv/bin/python] \
        [--n-particles 1500] [--box-size 64] [--check] [--json rows.json] [--quick]

Simulates (once) a C1 and a D2 entry and writes two prediction sets for each: ``8deg`` (the true
poses turned by 8° about a random axis, and for D2 sent to a random symmetry mate g·R, so the
symmetry-aware error is exercised) and ``random`` (uniformly random poses: the near-random row
whose FSC dips and comes back, where the two resolution rules part). Confidences are random in
[0.5, 1]. Each set is scored three times on the same relion_reconstruct maps:

* CESPED 25.12.0's ``evaluate(..., use_gt_mask=True, n_cpus=1)`` in its own virtual environment
  (mask download replaced by a copy of the entry's mask, its metrics.json writer given
  ``default=float``, as in ``evaluate_vs_cesped.py``);
* ``cryopose.evaluate(..., cesped_compatible=True)``, its ``metrics["cesped"]``;
* ``cryopose.evaluate(..., backend="relion")`` (cryopose's own definitions), read through the same
  name mapping (``cryopose.evaluate.cesped_metrics``).

Also compares the training labels of CESPED's ``ParticlesDataset`` with cryopose's
``ParticlesDataset(..., cesped_compatible=True)`` on the D2 entry. Prints every metric side by side;
``--check`` exits 1 unless every PCC and difference of PCCs agrees within 1e-3, the mean errors
within 1e-3°, every resolution within 1e-4 of its value (CESPED's FFT is float32: the same shell
and interpolation, up to rounding) and the labels within 1e-5. ``--json`` writes one row per
(entry, predictions, metric).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from cryopose import io
from cryopose.data import ParticlesDataset
from cryopose.entry import Entry
from cryopose.evaluate import CESPED_METRICS, cesped_metrics, evaluate
from cryopose.geometry import euler_to_matrix, matrix_to_euler, rotation_about_axis
from cryopose.symmetry import symmetry_matrices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, write_rows  # noqa: E402
from evaluate_vs_cesped import EULER, cesped_layout, run_cesped  # noqa: E402

LABELS = r"""
import json, sys
from cesped.particlesDataset import ParticlesDataset
name, bench, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = ParticlesDataset(name, halfset=0, benchmarkDir=bench)
out = {}
for i in range(n):
    pid, img, (rot, shift, conf), md = ds[i]
    out[pid] = rot.tolist()
print(json.dumps(out))
"""

PCC_TOL, ERROR_TOL_DEG, RESOLUTION_RTOL, LABEL_TOL = 1e-3, 1e-3, 1e-4, 1e-5


def simulate(workdir: Path, symmetry: str, n: int, box: int, px: float) -> Entry:
    name = f"cc_{symmetry.lower()}_{box}_{n}"
    if not (workdir / name / "simulation.json").exists():
        subprocess.run(
            [sys.executable, "-m", "cryopose", "simulate", "--name", name, "--symmetry", symmetry]
            + ["--box-size", str(box), "--pixel-size", str(px), "--n-particles", str(n), "--snr", "0.1"]
            + ["--out", str(workdir), "--quiet"],
            check=True,
        )
    return Entry(workdir / name)


def write_predictions(entry: Entry, kind: str, folder: Path) -> list[Path]:
    gen = torch.Generator().manual_seed(1234)  # not the simulator's seed: its true poses are drawn alike
    group = symmetry_matrices(entry.symmetry)
    paths = []
    for h in entry.halves:
        star = entry.read_star(h)
        parts = star.particles.copy()
        n = len(parts)
        rot = euler_to_matrix(torch.tensor(parts[EULER].to_numpy()))
        if kind == "random":
            q = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen, dtype=torch.float64), dim=-1)
            w, x, y, z = q.unbind(-1)
            pred = torch.stack(
                [
                    torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                    torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                    torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
                ],
                -2,
            )
        else:
            axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen, dtype=torch.float64), dim=-1)
            mates = group[torch.randint(len(group), (n,), generator=gen)]
            pred = mates @ rotation_about_axis(axes, 8.0) @ rot
        parts[EULER] = matrix_to_euler(pred).numpy()
        parts["rlnParticleFigureOfMerit"] = 0.5 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64).numpy()
        paths.append(folder / f"{kind}_half{h}.star")
        io.write_particles_star(paths[-1], io.ParticleStar(star.optics, parts))
    return paths


def cesped_labels(python: str, bench: Path, entry: Entry, n: int) -> dict:
    proc = subprocess.run([python, "-c", LABELS, entry.name, str(bench), str(n)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"CESPED ParticlesDataset failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kind_of(name: str) -> str:
    if "resolution" in name:
        return "resolution"
    if "AngularError" in name or name == "shiftsRMSE":
        return "error"
    return "pcc"


def agrees(name: str, theirs: float | None, ours: float | None) -> bool:
    if theirs is None or ours is None or (isinstance(theirs, float) and math.isnan(theirs)):
        return theirs is None and ours is None
    kind = kind_of(name)
    if kind == "resolution":
        return abs(theirs - ours) <= RESOLUTION_RTOL * abs(theirs)
    return abs(theirs - ours) <= (ERROR_TOL_DEG if kind == "error" else PCC_TOL)


def compare(args, workdir: Path, tmp: Path) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    for symmetry in ("C1", "D2"):
        entry = simulate(workdir, symmetry, args.n_particles, args.box_size, args.pixel_size)
        bench = cesped_layout(entry, tmp / f"bench_{symmetry}")
        gt_dir = tmp / f"gt_{symmetry}"
        for kind in ("8deg", "random"):
            preds = write_predictions(entry, kind, tmp)
            theirs = run_cesped(args.cesped_python, bench, entry, preds, tmp / f"cesped_{symmetry}_{kind}")["metrics"]
            common = dict(ground_truth_dir=gt_dir, plots=False, progress=False)
            compat = evaluate(entry, *preds, "SO3", cesped_compatible=True, **common).metrics["cesped"]
            default = cesped_metrics(evaluate(entry, *preds, "SO3", backend="relion", **common).metrics)
            print(
                f"\n{symmetry} entry ({args.n_particles} particles per half, {args.box_size}² px), predictions {kind}"
            )
            print(f"{'CESPED metric':<32} {'CESPED':>12} {'compatible':>12} {'default':>12}  agree")
            for name in CESPED_METRICS:
                if name not in theirs or name == "shiftsRMSE":
                    continue
                ok = agrees(name, theirs[name], compat.get(name))
                if not ok:
                    failures.append(f"{symmetry} {kind} {name}: CESPED {theirs[name]} vs {compat.get(name)}")
                print(
                    f"{name:<32} {theirs[name]:>12.6f} {compat[name]:>12.6f} {default[name]:>12.6f}  "
                    f"{'yes' if ok else 'NO'}"
                )
                rows.append(
                    {
                        "entry": symmetry,
                        "predictions": kind,
                        "metric": name,
                        "cesped": theirs[name],
                        "compatible": compat[name],
                        "default": default[name],
                        "agree": ok,
                    }
                )
        if symmetry != "C1":
            n = min(64, len(ParticlesDataset(entry, 0)))
            ref = cesped_labels(args.cesped_python, bench, entry, n)
            ds = ParticlesDataset(entry, 0, cesped_compatible=True, ctf_correction=None)
            ids, _, (rot, _, _), _ = ds.get_batch(list(range(n)))
            diff = max(float((rot[i] - torch.tensor(ref[pid])).abs().max()) for i, pid in enumerate(ids))
            raw = ParticlesDataset(entry, 0, ctf_correction=None).get_batch(list(range(n)))[2][0]
            moved = sum(float((rot[i] - raw[i]).abs().max()) > 1e-4 for i in range(n))
            print(
                f"\n{symmetry} training labels, {n} particles: CESPED ParticlesDataset vs cryopose "
                f"cesped_compatible=True: max |difference| {diff:.2g} ({moved} of {n} labels differ from the raw pose)"
            )
            if not diff <= LABEL_TOL:
                failures.append(f"{symmetry} labels differ by {diff:.3g}")
    return rows, failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-particles", type=int, default=None, help="per half (default 1500; --quick: 300)")
    p.add_argument("--box-size", type=int, default=None, help="default 64 (--quick: 32)")
    p.add_argument("--pixel-size", type=float, default=2.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryopose-bench"))
    p.add_argument("--cesped-python", default=os.environ.get("CESPED_PYTHON", "/tmp/cesped-venv/bin/python"))
    p.add_argument("--check", action="store_true", help="exit 1 unless every metric agrees (tolerances above)")
    add_output_args(p, "300 particles per half of 32 px: a smoke test")
    args = p.parse_args()
    args.n_particles = args.n_particles or (300 if args.quick else 1500)
    args.box_size = args.box_size or (32 if args.quick else 64)
    if not Path(args.cesped_python).is_file():
        raise SystemExit(f"{args.cesped_python} not found; see benchmarks/README.md to install cesped")
    np.seterr(all="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        rows, failures = compare(args, args.workdir, Path(tmp))
    write_rows(args.json, rows)
    if failures:
        print("\nDISAGREE:\n  " + "\n  ".join(failures))
        if args.check:
            raise SystemExit(1)
    else:
        print("\nevery metric agrees")


if __name__ == "__main__":
    main()
