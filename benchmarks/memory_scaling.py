#!/usr/bin/env python
"""Peak memory and wall time of the workflow's steps, at the default and a paper-like size, and how
they grow with the particle count and the box size.

    .venv/bin/python benchmarks/memory_scaling.py [--json rows.json] [--quick] [--workdir DIR]

Each step runs as the workflow runs it, through the ``cryopose`` command line, in a fresh process:

* preprocessing: ``cryopose preprocess`` (normalise, phase flip, Fourier resize) of a simulated entry;
* training: ``cryopose train --method image2sphere`` for ``--epochs`` epoch(s) on the preprocessed
  copy (the workflow's CPU default: 32 px, ResNet18, lmax 6, output order 3); the Wigner-table
  cache is warmed first by an untimed process, as it is for every training after the first;
* ground truth: ``cryopose ground-truth`` (the two ground-truth half-maps, torch backend);
* evaluation: ``cryopose evaluate`` of ground-truth predictions (``ground_truth`` method's train and
  predict, run in this process and not timed) with the ground-truth maps cached, torch backend;
  plots included. The reference is the same two steps with ``--backend relion``
  (relion_reconstruct, one process per half-map).

Sizes: the default is the workflow's synthetic entries (box 64 px, 2.13 Å/px, 3,000 particles per
half, preprocessed to 32 px); the paper-like size is box 256 px (CESPED's real entries are
232-360 px) with 1,000 particles per half (simulating more takes ~10 images/s here), preprocessed
without resizing, and Image2Sphere in the paper's configuration (256 px, ResNet152, lmax 8, output
order 4) trained for one step of 32 images on a 40-particle copy: a full epoch of a real entry is
GPU work. Scaling: preprocessing, ground truth and evaluation at 1,000 / 2,000 / 3,000 / 4,000
particles (box 64) and at box 64 / 128 / 256 (1,000 particles), all at 2.13 Å/px.

Memory figures per step: ``peak RSS`` is the largest resident set of the step's process or any
child it waited for (``ru_maxrss`` from ``wait4``); ``peak anon`` is the largest sum, sampled every
50 ms, of the anonymous resident memory (RssAnon) of the process tree: what the step allocated,
without the pages of memory-mapped stacks that the page cache holds (they count in RSS while
cached, so RSS of a streaming step grows with the stack it read; anon does not).

Simulated entries are kept in ``--workdir`` (default /tmp/cryopose-bench/memory_scaling) and
reused; every step's outputs are made afresh (and deleted at the end unless ``--keep-outputs``),
its log kept in ``WORKDIR/logs``. Prints Markdown tables (``--json``: also as rows for
``benchmarks/run_all``; ``--quick``: 32 px boxes of 50 and 100 particles, no paper size, a smoke
test). Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import add_output_args, relion_name, row, write_rows  # noqa: E402

CRYOPOSE = [sys.executable, "-m", "cryopose"]
PIXEL_SIZE = 2.13
#: The paper's Image2Sphere (config/cesped.yaml, Image2SphereConfig.paper()), one epoch.
PAPER_I2S = dict(
    image_size=256,
    resnet="resnet152",
    drop_maxpool=False,
    sphere_channels=512,
    projector_order=3,
    lmax=8,
    s2_kernel_order=3,
    activation_resolution=10,
    output_order=4,
)
STEP_NAMES = {
    "preprocess": "preprocessing",
    "train": "training",
    "ground_truth": "ground-truth maps",
    "evaluate": "evaluation",
}


# ------------------------------------------------------------------------------------- measuring


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def _tree_anon_kb(root: int) -> int:
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
        todo += _children(pid)
    return total


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh process; its wall time, peak RSS and peak anonymous memory (MB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env)
        peak = {"anon": 0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak["anon"] = max(peak["anon"], _tree_anon_kb(proc.pid))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed (exit {proc.returncode}); log {log}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": peak["anon"] / 1024}


# ------------------------------------------------------------------------------------- the steps


class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = args.workdir
        self.entries = self.workdir / "entries"
        self.runs = self.workdir / "runs"
        self.logs = self.workdir / "logs"
        self.cache: dict = {}
        self.records: list[dict] = []

    def log(self, tag: str) -> Path:
        return self.logs / f"{tag}.log"

    def fresh(self, tag: str) -> Path:
        path = self.runs / tag
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def simulate(self, box: int, n: int) -> Path:
        name = f"mem{box}_{n}"
        subprocess.run(
            CRYOPOSE
            + [
                "simulate",
                "--name",
                name,
                "--box-size",
                str(box),
                "--pixel-size",
                str(PIXEL_SIZE),
                "--n-particles",
                str(n),
                "--snr",
                "0.1",
                "--out",
                str(self.entries),
                "--quiet",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return self.entries / name

    def preprocess(self, box: int, n: int, image_size: int | None) -> tuple[dict, Path]:
        key = ("preprocess", box, n, image_size)
        if key not in self.cache:
            entry = self.simulate(box, n)
            tag = f"preprocess_{box}_{n}_{image_size or box}"
            out = self.fresh(tag)
            cmd = CRYOPOSE + [
                "preprocess",
                entry,
                "--out",
                out,
                "--crop-fraction",
                "1.0",
                "--ctf-correction",
                "phase_flip",
                "--quiet",
            ]
            if image_size:
                cmd += ["--image-size", str(image_size)]
            print(f"  preprocess: box {box}, {n} particles/half -> {image_size or box} px", flush=True)
            self.cache[key] = (measure(cmd, self.log(tag)), out / entry.name)
        return self.cache[key]

    def predictions(self, entry: Path) -> tuple[Path, Path]:
        """Ground-truth predictions, made as ``cryopose train/predict --method ground_truth`` make them."""
        from cryopose.entry import Entry
        from cryopose.methods import get_method

        folder = self.fresh(f"predictions_{entry.name}")
        method, ent = get_method("ground_truth"), Entry(entry)
        for h in ent.halves:
            method.run_train(ent, h, folder / f"model_half{h}", {}, None)
        for h in ent.halves:
            method.run_predict(folder / f"model_half{1 - h}", ent, h, folder / f"half{h}.star", {})
        return folder / "half0.star", folder / "half1.star"

    def evaluation(self, box: int, n: int, backend: str) -> dict:
        """Ground-truth maps, then the evaluation with them cached: {"ground_truth": m, "evaluate": m}."""
        key = ("evaluate", box, n, backend)
        if key not in self.cache:
            entry = self.simulate(box, n)
            half0, half1 = self.predictions(entry)
            tag = f"{box}_{n}_{backend}"
            gt = self.fresh(f"ground_truth_{tag}")
            print(f"  ground truth + evaluation ({backend}): box {box}, {n} particles/half", flush=True)
            res = {
                "ground_truth": measure(
                    CRYOPOSE + ["ground-truth", entry, "--out", gt, "--backend", backend, "--jobs", "1", "--quiet"],
                    self.log(f"ground_truth_{tag}"),
                )
            }
            out = self.fresh(f"evaluate_{tag}")
            res["evaluate"] = measure(
                CRYOPOSE
                + [
                    "evaluate",
                    entry,
                    "--half0",
                    half0,
                    "--half1",
                    half1,
                    "--method",
                    "ground_truth",
                    "--prediction-type",
                    "SO3",
                    "--backend",
                    backend,
                    "--jobs",
                    "1",
                    "--ground-truth-dir",
                    gt,
                    "--out",
                    out,
                    "--quiet",
                ],
                self.log(f"evaluate_{tag}"),
            )
            self.cache[key] = res
        return self.cache[key]

    def train(self, pre_entry: Path, params: dict, tag: str) -> dict:
        model_keys = set(_model_fields())
        # Warm the cache of Wigner tables and grids (untimed): every training after the first finds it.
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, sys\nfrom cryopose.methods.image2sphere.network import "
                "Image2Sphere, Image2SphereConfig\nImage2Sphere(Image2SphereConfig(**json.loads(sys.argv[1])))",
                json.dumps({k: v for k, v in params.items() if k in model_keys}),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        out = self.fresh(f"train_{tag}")
        cmd = CRYOPOSE + [
            "train",
            "--method",
            "image2sphere",
            "--entry",
            pre_entry,
            "--half",
            "0",
            "--out",
            out / "model",
            "--work-dir",
            out / "work",
        ]
        for k, v in params.items():
            cmd += ["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        print(f"  train: {tag}", flush=True)
        m = measure(cmd, self.log(f"train_{tag}"))
        with open(out / "model" / "train_log.csv") as fh:
            m["epoch_seconds"] = [float(r["seconds"]) for r in csv.DictReader(fh)]
        return m


def _secs(s: float) -> str:
    return f"{s:.0f}" if s >= 10 else f"{s:.1f}"


def _model_fields() -> list[str]:
    from cryopose.methods.image2sphere.network import Image2SphereConfig

    return list(Image2SphereConfig.__dataclass_fields__)


def trimmed_copy(src: Path, dest: Path, n: int) -> Path:
    """The first ``n`` particles of each half of entry ``src`` as a new entry ``dest``."""
    from cryopose import io
    from cryopose.entry import Entry

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    entry = Entry(src)
    for h in entry.halves:
        star = entry.read_star(h)
        parts = star.particles.iloc[:n].copy()
        stack = io.open_stack(entry.stack_path(h))
        try:
            images = io.read_images(stack, range(n))
        finally:
            stack.close()
        with io.StackWriter(dest / f"particles_{h}.mrcs", n, entry.box_size, entry.pixel_size) as w:
            w.write(0, images)
        parts["rlnImageName"] = [f"{i + 1:06d}@particles_{h}.mrcs" for i in range(n)]
        io.write_particles_star(dest / f"particles_{h}.star", io.ParticleStar(star.optics.copy(), parts))
        shutil.copy(entry.info_path(h), dest / f"info_{h}.json")
    return dest


# ------------------------------------------------------------------------------------- tables


def _mem_record(
    step: str,
    size: str,
    box: int,
    n: int,
    image_size: int | None,
    m: dict,
    ref: dict | None,
    ref_name: str,
    note: str = "",
) -> dict:
    r = row(
        f"peak RSS, {STEP_NAMES[step]}, {size} size",
        m["peak_rss_mb"],
        ref["peak_rss_mb"] if ref else None,
        "MB",
        ref_name if ref else "",
        lower_is_better=True,
    )
    r.update(
        table="memory",
        step=step,
        size=size,
        box=box,
        particles=n,
        image_size=image_size,
        seconds=m["seconds"],
        peak_rss_mb=m["peak_rss_mb"],
        peak_anon_mb=m["peak_anon_mb"],
        reference_seconds=ref["seconds"] if ref else None,
        reference_peak_rss_mb=ref["peak_rss_mb"] if ref else None,
        note=note,
    )
    return r


def _scaling_record(step: str, box: int, n: int, m: dict, image_size: int | None = None) -> dict:
    r = row(
        f"{STEP_NAMES[step]}, box {box} px, {n} particles/half: peak RSS",
        m["peak_rss_mb"],
        None,
        "MB",
        "",
        lower_is_better=True,
    )
    r.update(
        table="scaling",
        step=step,
        box=box,
        particles=n,
        image_size=image_size,
        seconds=m["seconds"],
        peak_rss_mb=m["peak_rss_mb"],
        peak_anon_mb=m["peak_anon_mb"],
    )
    return r


def print_tables(records: list[dict]) -> None:
    mem = [r for r in records if r.get("table") == "memory"]
    if mem:
        print(
            "\n| step | size | particles/half | box (→ image) px | wall s | peak RSS MB | peak anon MB | "
            "relion backend: wall s / peak RSS MB | note |"
        )
        print("|" + " --- |" * 9)
        for r in mem:
            ref = (
                f"{r['reference_seconds']:.1f} / {r['reference_peak_rss_mb']:.0f}"
                if r["reference_seconds"] is not None
                else ""
            )
            px = f"{r['box']} → {r['image_size']}" if r["image_size"] else f"{r['box']}"
            print(
                f"| {STEP_NAMES[r['step']]} | {r['size']} | {r['particles']} | {px}"
                f" | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | {ref} | {r['note']} |"
            )
    scale = [r for r in records if r.get("table") == "scaling"]
    if scale:
        print("\n| step | particles/half | box px | wall s | peak RSS MB | peak anon MB |")
        print("|" + " --- |" * 6)
        for r in scale:
            print(
                f"| {STEP_NAMES[r['step']]} | {r['particles']} | {r['box']} | {r['seconds']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} |"
            )


# ------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="simulated entries (kept, reused) and step outputs; default /tmp/cryopose-bench(-quick)/memory_scaling",
    )
    p.add_argument("--particles", type=int, default=None, help="default size: particles per half (3000; quick 100)")
    p.add_argument("--box-size", type=int, default=None, help="default size: box (64; quick 32)")
    p.add_argument("--image-size", type=int, default=32, help="preprocessing output and training image size")
    p.add_argument("--epochs", type=int, default=1, help="training epochs at the default size")
    p.add_argument(
        "--counts",
        type=int,
        nargs="*",
        default=None,
        help="particle counts of the scaling table at the default box (1000 2000 4000; quick 50)",
    )
    p.add_argument(
        "--boxes", type=int, nargs="*", default=None, help="box sizes of the scaling table (64 128 256; quick none)"
    )
    p.add_argument(
        "--scaling-particles", type=int, default=None, help="particles per half of the box-size series (1000; quick 50)"
    )
    p.add_argument("--paper-box", type=int, default=None, help="paper-like size: box (256; 0 skips; quick 0)")
    p.add_argument("--paper-particles", type=int, default=1000, help="paper-like size: particles per half")
    p.add_argument(
        "--paper-train-particles",
        type=int,
        default=40,
        help="particles per half of the copy the paper configuration trains on (batch 32: one step)",
    )
    p.add_argument("--no-train", action="store_true", help="skip the training measurements")
    p.add_argument("--no-reference", action="store_true", help="skip the relion backend (reference) measurements")
    p.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep the steps' outputs (preprocessed copies, maps, models) in WORKDIR/runs",
    )
    add_output_args(p, "32 px boxes of 50 and 100 particles, no paper size: a smoke test")
    args = p.parse_args(argv)
    full = dict(
        particles=3000,
        box_size=64,
        counts=[1000, 2000, 4000],
        boxes=[64, 128, 256],
        scaling_particles=1000,
        paper_box=256,
        workdir=Path("/tmp/cryopose-bench/memory_scaling"),
    )
    quick = dict(
        particles=100,
        box_size=32,
        counts=[50],
        boxes=[],
        scaling_particles=50,
        paper_box=0,
        workdir=Path("/tmp/cryopose-bench-quick/memory_scaling"),
    )
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    reference = not args.no_reference and shutil.which("relion_reconstruct") is not None
    ref_name = relion_name() if reference else ""
    if not args.no_reference and not reference:
        print("(no reference: relion_reconstruct not on PATH)")
    bench = Bench(args)
    shutil.rmtree(bench.runs, ignore_errors=True)
    records: list[dict] = []
    size_label = "quick" if args.quick else "default"
    start = time.perf_counter()

    # The default size: every step, and the relion backend as the reference for the reconstructions.
    print(f"{size_label} size: box {args.box_size} px, {args.particles} particles/half", flush=True)
    m, pre = bench.preprocess(args.box_size, args.particles, args.image_size)
    records.append(
        _mem_record(
            "preprocess",
            size_label,
            args.box_size,
            args.particles,
            args.image_size,
            m,
            None,
            "",
            "no reference: CESPED preprocesses on the fly (dataset_throughput.py)",
        )
    )
    if not args.no_train:
        params = {"image_size": args.image_size, "max_epochs": args.epochs}
        m = bench.train(pre, params, f"{size_label}_{args.box_size}_{args.particles}")
        n_train = args.particles - max(1, round(0.1 * args.particles))
        records.append(
            _mem_record(
                "train",
                size_label,
                args.box_size,
                args.particles,
                args.image_size,
                m,
                None,
                "",
                f"Image2Sphere (workflow default), {args.epochs} epoch(s) of {n_train} images: "
                f"{', '.join(_secs(s) for s in m['epoch_seconds'])} s each; warm cache",
            )
        )
    ev = bench.evaluation(args.box_size, args.particles, "torch")
    ev_ref = bench.evaluation(args.box_size, args.particles, "relion") if reference else None
    for step in ("ground_truth", "evaluate"):
        records.append(
            _mem_record(
                step,
                size_label,
                args.box_size,
                args.particles,
                None,
                ev[step],
                ev_ref[step] if ev_ref else None,
                ref_name,
                "torch backend (CPU)",
            )
        )

    # A paper-like size.
    if args.paper_box:
        box, n = args.paper_box, args.paper_particles
        print(f"paper-like size: box {box} px, {n} particles/half", flush=True)
        m, pre = bench.preprocess(box, n, box)
        records.append(_mem_record("preprocess", "paper", box, n, box, m, None, "", "no resizing (the paper's 256 px)"))
        if not args.no_train:
            k = args.paper_train_particles
            small = trimmed_copy(pre, bench.runs / f"paper_train_entry_{box}_{k}" / f"mem{box}_{k}", k)
            params = {**PAPER_I2S, "batch_size": 32, "max_epochs": 1}
            m = bench.train(small, params, f"paper_{box}_{k}")
            n_val = max(1, round(0.1 * k))
            records.append(
                _mem_record(
                    "train",
                    "paper",
                    box,
                    k,
                    PAPER_I2S["image_size"],
                    m,
                    None,
                    "",
                    f"paper Image2Sphere (ResNet152, lmax 8, order 4), {k} particles: "
                    f"{(k - n_val) // 32} step(s) of 32 + validation of {n_val} images, "
                    f"{_secs(m['epoch_seconds'][0])} s; warm cache",
                )
            )
        ev = bench.evaluation(box, n, "torch")
        ev_ref = bench.evaluation(box, n, "relion") if reference else None
        for step in ("ground_truth", "evaluate"):
            records.append(
                _mem_record(
                    step,
                    "paper",
                    box,
                    n,
                    None,
                    ev[step],
                    ev_ref[step] if ev_ref else None,
                    ref_name,
                    "torch backend (CPU)",
                )
            )

    # Scaling: particle count at the default box, box size at a fixed count.
    series = sorted(
        {(args.box_size, c) for c in args.counts + [args.particles]}
        | {(b, args.scaling_particles) for b in args.boxes},
        key=lambda t: (t[0] != args.box_size, t),
    )
    for box, n in series:
        print(f"scaling: box {box} px, {n} particles/half", flush=True)
        m, _ = bench.preprocess(box, n, args.image_size)
        records.append(_scaling_record("preprocess", box, n, m, args.image_size))
        ev = bench.evaluation(box, n, "torch")
        for step in ("ground_truth", "evaluate"):
            records.append(_scaling_record(step, box, n, ev[step]))

    # The reconstructions against relion_reconstruct, for the main table.
    for r in [r for r in records if r.get("table") == "memory" and r["reference_seconds"] is not None]:
        what = (
            f"{STEP_NAMES[r['step']]} ({'GT maps cached, ' if r['step'] == 'evaluate' else ''}torch backend), "
            f"{r['particles']:,} particles/half × {r['box']}² px"
        )
        records.append(
            row(f"{what}: wall time", r["seconds"], r["reference_seconds"], "s", ref_name, lower_is_better=True)
        )
        records.append(
            row(f"{what}: peak RSS", r["peak_rss_mb"], r["reference_peak_rss_mb"], "MB", ref_name, lower_is_better=True)
        )

    print(
        f"\n{os.cpu_count()} CPUs; wall time of this benchmark {time.perf_counter() - start:.0f} s; "
        f"logs in {bench.logs}"
    )
    print_tables(records)
    print(
        "peak RSS: largest resident set of the step's process or a child it waited for; peak anon: largest sum of "
        "RssAnon over the process tree (sampled every 50 ms)"
    )
    write_rows(args.json, records)
    if not args.keep_outputs:
        shutil.rmtree(bench.runs, ignore_errors=True)


if __name__ == "__main__":
    main()
