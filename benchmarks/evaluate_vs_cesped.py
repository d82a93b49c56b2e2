#!/usr/bin/env python
"""A whole evaluation: cryopose.evaluate against the CESPED package's evaluateEntry, same inputs.

    .venv/bin/python benchmarks/evaluate_vs_cesped.py [--n-particles 5000] [--box-size 128] \
        [--cesped-python /tmp/cesped-venv/bin/python] [--json rows.json] [--quick]

Simulates (once) a C1 entry, writes predictions for both halves (the true poses each turned by 8°
about a random axis, random confidences in [0.5, 1]), then times:

* CESPED's ``evaluate(..., use_gt_mask=True, n_cpus=1)`` (relion_reconstruct, one process: with
  ``n_cpus=2`` it runs ``mpirun -np 2 relion_reconstruct_mpi``, measured 7 % faster per
  reconstruction on this 2-core machine, 18.9 s against 20.3 s; its mask download is replaced by a
  copy of the entry's mask, since the machine is offline, and its ``metrics.json`` writer is given
  ``default=float``, without which it crashes on numpy float32 values after all the work is done),
  in its own virtual environment;
* ``cryopose.evaluate`` with ``backend="relion"`` and ``jobs=2`` (the same four relion_reconstruct
  runs, the two halves side by side), and with ``backend="torch"`` (its default kernel: numba on
  the CPU) with ``jobs=1`` (each reconstruction on all threads) and ``jobs=2`` (the halves side by
  side, one thread each); then the ``jobs=1`` evaluation again under cProfile: where its time goes
  (reading stacks, CTFs, splatting, the Fourier steps, metrics, masks, figures, files) is printed
  as a table;

each twice: with an empty output folder (the ground-truth half-maps are reconstructed) and again
with the ground-truth maps cached (the situation of every method after the first on an entry).
Then the torch backend once more with ``kernel="torch"`` (torch's own scatter, the reconstructor
before the numba kernel): its metrics against the default's show the kernel changes no number
beyond float rounding. Prints the times, their ratios and the metrics side by side (``--json``:
the times also as rows for ``benchmarks/run_all``; ``--quick``: 200 particles per half of 32 px, a
smoke test). Without the CESPED environment, only cryopose is timed. Nothing here is a pass/fail
test.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from cryopose import io
from cryopose.entry import Entry
from cryopose.evaluate import evaluate
from cryopose.geometry import euler_to_matrix, matrix_to_euler, rotation_about_axis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, cesped_name, row, write_rows  # noqa: E402

EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]

CESPED = r"""
import contextlib, io, json, shutil, sys, time
import cesped.evaluateEntry as ev
bench, target, p0, p1, mask, outdir = sys.argv[1:7]
ev.download_mask = lambda name, fname: shutil.copy(mask, fname)  # offline: the entry's own mask
# Its metrics.json writer crashes on numpy float32 values (a known defect): let json convert them.
ev.json = type("json", (), {"dump": staticmethod(lambda obj, f, **kw: json.dump(obj, f, default=float, **kw))})
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    m = ev.evaluate(target, p0, p1, predictionType="SO3", usePredConfidence=True, benchmarkDir=bench,
                    relionBinDir=shutil.which("relion_reconstruct").rsplit("/", 1)[0], mpirun="mpirun",
                    relionSingularity=None, rm_prev_reconstructions=True, use_gt_mask=True, n_cpus=1,
                    outdir=outdir)
print(json.dumps({"seconds": time.perf_counter() - t, "metrics": {k: float(v) for k, v in m.items()}}))
"""

# CESPED's metric names and the cryopose ones that compute the same quantity on the same inputs.
PAIRS = [
    ("meanAngularError", "MAnE"),
    ("wMeanAngularError", "wMAnE"),
    ("GT_correlation", "masked_PCC(GT0,GT1)"),
    ("GT_resolution0143", "masked_FSCR0.143(GT0,GT1)"),
    ("GT_resolution05", "masked_FSCR0.5(GT0,GT1)"),
    ("half2half_correlation", "masked_PCC(V0,V1)"),
    ("half2half_resolution", "masked_FSCR0.143(V0,V1)"),
    ("half2half_resolution05", "masked_FSCR0.5(V0,V1)"),
    ("mapVsGT_correlaton_masked", "masked_PCC(GT,V)"),
    ("mapVsGT_correlaton_unmasked", "PCC(GT,V)"),
    ("mapVsGT_resolution", "FSCR0.143(GT,V)"),
    ("mapVsGT_resolution05", "FSCR0.5(GT,V)"),
    ("mapVsGT_correlaton_diff_masked", "masked_delta_PCC"),
]


def simulate(workdir: Path, n: int, box: int, px: float) -> Path:
    name = f"ev{box}_{n}"
    if not (workdir / name / "simulation.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cryopose",
                "simulate",
                "--name",
                name,
                "--box-size",
                str(box),
                "--pixel-size",
                str(px),
                "--n-particles",
                str(n),
                "--snr",
                "0.1",
                "--out",
                str(workdir),
                "--quiet",
            ],
            check=True,
        )
    return workdir / name


def write_predictions(entry: Entry, folder: Path) -> list[Path]:
    gen = torch.Generator().manual_seed(0)
    paths = []
    for h in entry.halves:
        star = entry.read_star(h)
        parts = star.particles.copy()
        rot = euler_to_matrix(torch.tensor(parts[EULER].to_numpy()))
        axes = torch.nn.functional.normalize(torch.randn(len(parts), 3, generator=gen, dtype=torch.float64), dim=-1)
        parts[EULER] = matrix_to_euler(rotation_about_axis(axes, 8.0) @ rot).numpy()
        parts["rlnParticleFigureOfMerit"] = (
            0.5 + 0.5 * torch.rand(len(parts), generator=gen, dtype=torch.float64).numpy()
        )
        paths.append(folder / f"predictions_half{h}.star")
        io.write_particles_star(paths[-1], io.ParticleStar(star.optics, parts))
    return paths


def cesped_layout(entry: Entry, folder: Path) -> Path:
    """CESPED's benchmark folder: the entry's files linked, plus its download markers."""
    target = folder / entry.name
    target.mkdir(parents=True)
    for h in entry.halves:
        for p in (entry.star_path(h), entry.stack_path(h), entry.info_path(h)):
            os.symlink(p.resolve(), target / p.name)
        (target / f"SUCCESSFUL_DOWNLOAD_{h}.txt").write_text("ok\n")
    return folder


def run_cesped(python: str, bench: Path, entry: Entry, preds: list[Path], outdir: Path) -> dict:
    proc = subprocess.run(
        [python, "-c", CESPED, str(bench), entry.name, str(preds[0]), str(preds[1]), str(entry.mask_path), str(outdir)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"CESPED evaluate failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: (label, function qualified name) of the phases the profile table shows, as cumulative times
PHASES = [
    ("ground-truth + predicted reconstructions", "reconstruct.py:reconstruct_torch"),
    ("  reading images (memory-mapped stacks; loader thread)", "loader:read_images"),
    ("  CTFs (loader thread)", "loader:ctf_from_parameters"),
    ("  image FFTs (loader thread)", "loader:_image_spectra"),
    ("  re-centring and splatting", "reconstruct.py:_insert_spectra"),
    ("    of which the splatting kernel", "reconstruct_kernels.py:splat_slices"),
    ("  density compensation, inverse FFT, mask", "reconstruct.py:_finish"),
    ("map comparisons (FSC, PCC; 9 pairs × 2 masks)", "metrics.py:compare_maps"),
    ("mask from the entry / ground truth", "evaluate.py:_read_entry_mask"),
    ("pose metrics (angular errors, symmetry)", "evaluate.py:_pose_metrics"),
    ("writing maps, tables, figures", "evaluate.py:_write_outputs"),
    ("  of which the figures", "plots.py:_save"),
]


@contextlib.contextmanager
def loader_timers():
    """Seconds spent in the reconstructor's loader-thread calls (``loader:<name>`` of
    :data:`PHASES`): cProfile sees only the thread that enabled it, so these are timed by wrappers.
    They overlap the insertion of the batch before, so they are not added to the total."""
    import cryopose.io
    import cryopose.reconstruct

    seconds: dict[str, float] = {}
    lock = threading.Lock()
    targets = [(cryopose.io, "read_images"), (cryopose.reconstruct, "ctf_from_parameters")]
    targets.append((cryopose.reconstruct, "_image_spectra"))
    originals = [(module, name, getattr(module, name)) for module, name in targets]

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    for module, name, fn in originals:
        setattr(module, name, timed(name, fn))
    try:
        yield seconds
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def phase_table(profile: cProfile.Profile, loader: dict[str, float], total: float) -> list[tuple[str, float]]:
    """Cumulative seconds of each of :data:`PHASES` in ``profile`` (``loader`` for the loader
    thread's), and the rest of ``total``."""
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    out = []
    for label, key in PHASES:
        file, name = key.split(":")
        if file == "loader":
            secs = loader.get(name, 0.0)
        else:
            secs = sum(v[3] for (f, _, n), v in stats.items() if f.endswith("/" + file) and n == name)
        out.append((label, secs))
    top = sum(secs for label, secs in out if not label.startswith(" "))
    out.append(("everything else (predictions, checks, scheduling)", max(0.0, total - top)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-particles", type=int, default=None, help="per half (default 5000; --quick: 200)")
    p.add_argument("--box-size", type=int, default=None, help="default 128 (--quick: 32)")
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryopose-bench"))
    p.add_argument("--cesped-python", default="/tmp/cesped-venv/bin/python")
    p.add_argument("--skip-cesped", action="store_true")
    add_output_args(p, "200 particles per half of 32 px: a smoke test")
    args = p.parse_args()
    if args.n_particles is None:
        args.n_particles = 200 if args.quick else 5000
    if args.box_size is None:
        args.box_size = 32 if args.quick else 128
    if not args.skip_cesped and not Path(args.cesped_python).is_file():
        print(f"(no reference: {args.cesped_python} not found; see benchmarks/README.md to install cesped)")
        args.skip_cesped = True
    entry = Entry(simulate(args.workdir, args.n_particles, args.box_size, args.pixel_size))
    rows, metrics = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        preds = write_predictions(entry, tmp)
        if not args.skip_cesped:
            bench = cesped_layout(entry, tmp / "cesped_bench")
            out = tmp / "cesped_out"
            for label in ("fresh", "GT cached"):
                r = run_cesped(args.cesped_python, bench, entry, preds, out)
                rows.append(("CESPED evaluateEntry (relion)", label, r["seconds"]))
                metrics["CESPED"] = r["metrics"]
        profiles = {}
        # (backend, jobs, kernel, profiled): timed runs are not profiled (cProfile slows the Python
        # parts); the phase table comes from a run of its own.
        runs = [
            ("relion", 2, None, False),
            ("torch", 1, None, False),
            ("torch", 2, None, False),
            ("torch", 1, None, True),
            ("torch", 1, "torch", False),
        ]
        for backend, jobs, kernel, profiled in runs:
            name = f"cryopose ({backend})" + (f", jobs {jobs}" if jobs > 1 else "")
            name += f", kernel {kernel}" if kernel else ""
            name += ", profiled" if profiled else ""
            gt_dir = tmp / f"gt_{backend}_{jobs}_{kernel}_{profiled}"
            for label in ("fresh", "GT cached") if kernel is None else ("fresh",):
                options = {"kernel": kernel} if kernel else {}
                profile = cProfile.Profile() if profiled else None
                with loader_timers() if profiled else contextlib.nullcontext({}) as loader:
                    t = time.perf_counter()
                    if profile:
                        profile.enable()
                    res = evaluate(
                        entry,
                        preds[0],
                        preds[1],
                        "SO3",
                        backend=backend,
                        outdir=tmp / f"out_{backend}",
                        ground_truth_dir=gt_dir,
                        progress=False,
                        jobs=jobs,
                        **options,
                    )
                    seconds = time.perf_counter() - t
                    if profile:
                        profile.disable()
                        profiles[label] = phase_table(profile, loader, seconds)
                rows.append((name, label, seconds))
                metrics[name] = res.metrics
    print(
        f"entry: {args.n_particles} particles per half × {args.box_size}² px, {args.pixel_size} Å/px, C1, SNR 0.1; "
        f"predictions: truth turned by 8°; {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"{'implementation':<32} {'run':<10} {'seconds':>8}")
    for impl, label, secs in rows:
        print(f"{impl:<32} {label:<10} {secs:>8.1f}")
    if not args.skip_cesped:
        for label in ("fresh", "GT cached"):
            ref = next(s for i, lab, s in rows if i.startswith("CESPED") and lab == label)
            for name in ("cryopose (relion), jobs 2", "cryopose (torch)", "cryopose (torch), jobs 2"):
                ours = next(s for i, lab, s in rows if i == name and lab == label)
                print(f"{label}: CESPED / {name} = {ref / ours:.2f}×")
        print(f"\n{'CESPED metric':<32} {'CESPED':>10} {'cryopose metric':<28} {'relion':>10} {'torch':>10}")
        for theirs, ours in PAIRS:
            print(
                f"{theirs:<32} {metrics['CESPED'][theirs]:>10.4f} {ours:<28} "
                f"{metrics['cryopose (relion), jobs 2'][ours]:>10.4f} {metrics['cryopose (torch)'][ours]:>10.4f}"
            )
    print(
        "\n| where the torch evaluation's time goes (jobs 1, profiled) | fresh s | GT cached s |\n| --- | --- | --- |"
    )
    for (label, fresh), (_, cached) in zip(profiles["fresh"], profiles["GT cached"]):
        print(f"| {label} | {fresh:.2f} | {cached:.2f} |")
    print("(the loader thread's rows run beside the insertion of the batch before: in neither the total nor the rest)")
    default, old = metrics["cryopose (torch)"], metrics["cryopose (torch), kernel torch"]
    numbers = [k for k, v in default.items() if isinstance(v, float) and not k.startswith("seconds")]
    worst = max(numbers, key=lambda k: abs(default[k] - (old.get(k) or 0.0)))
    print(
        f"\nnumba kernel vs torch's scatter, same evaluation: {len(numbers)} metrics, largest difference "
        f"{worst} {default[worst]:.6g} vs {old[worst]:.6g}"
    )

    ref_name = cesped_name(None if args.skip_cesped else args.cesped_python)
    out = []
    cpu = " (CPU)" if not torch.cuda.is_available() else ""
    variants = {
        "cryopose (relion), jobs 2": "relion backend, jobs 2",
        "cryopose (torch)": f"torch backend{cpu}",
        "cryopose (torch), jobs 2": f"torch backend{cpu}, jobs 2",
    }
    for name, variant in variants.items():
        for label in ("fresh", "GT cached"):
            ours = next(s for i, lab, s in rows if i == name and lab == label)
            ref = next((s for i, lab, s in rows if i.startswith("CESPED") and lab == label), None)
            out.append(
                row(
                    f"whole evaluation, {args.n_particles:,} particles/half × {args.box_size}² px, {label}, {variant}",
                    ours,
                    ref,
                    "s",
                    f"{ref_name} evaluateEntry" if ref is not None else "",
                    lower_is_better=True,
                )
            )
    write_rows(args.json, out)


if __name__ == "__main__":
    main()
