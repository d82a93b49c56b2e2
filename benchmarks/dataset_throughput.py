#!/usr/bin/env python
"""Throughput and memory of ParticlesDataset against the CESPED package's, in the same run.

Work measured: read + normalise + phase flip + resize 184 px → 128 px, through a DataLoader with
0, 1 and 2 workers. The reference is ``cesped`` (pip 25.12.0) running
``benchmarks/cesped_dataset_throughput.py`` in its own virtual environment (it pins other torch
and lightning versions, so it never enters the project's). Memory: peak RSS of the same job on
a stack of N and of 2N particles — flat if the stack is streamed, not loaded.

    .venv/bin/python benchmarks/dataset_throughput.py [--cesped-python /tmp/cesped-venv/bin/python]
        [--json rows.json] [--quick]

Prints one table (``--json``: also its key figures as rows for ``benchmarks/run_all``; ``--quick``:
256 images of 64 px → 32 px, no workers, a smoke test); nothing here is a pass/fail test.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import add_output_args, cesped_name, row, write_rows  # noqa: E402


def _anon_rss_mb(pids) -> float:
    """Anonymous resident memory (RssAnon) of the processes: what the job itself allocated. Pages of a
    memory-mapped stack count in plain RSS while cached but belong to the page cache and are
    reclaimable, so they are reported separately."""
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def child(args) -> None:
    import torch
    from torch.utils.data import DataLoader

    from cryopose.data import ParticlesDataset

    torch.set_num_threads(1)  # as the reference script: one thread per process; workers bring parallelism
    ds = ParticlesDataset(args.entry_dir, 0, image_size=args.image_size, ctf_correction="phase_flip", normalise=True)
    n = min(len(ds), args.n_images)
    subset = torch.utils.data.Subset(ds, range(n))
    loader = DataLoader(
        subset, batch_size=args.batch_size, num_workers=args.workers, shuffle=False, persistent_workers=False
    )
    import threading

    peak = {"anon": 0.0}
    done = threading.Event()

    def sample():
        me = os.getpid()
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _anon_rss_mb([me] + _children(me)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    it = iter(loader)
    first = next(it)  # worker start-up and the first batch are not timed
    count, start = 0, time.perf_counter()
    for batch in it:
        count += len(batch[0])
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    assert first[1].shape[-1] == args.image_size
    rss = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    print(
        json.dumps(
            {
                "impl": "cryopose",
                "workers": args.workers,
                "images_per_s": count / elapsed,
                "n_images": count,
                "peak_rss_mb": rss / 1024,
                "peak_anon_mb": peak["anon"],
            }
        )
    )


def run_json(cmd: list[str]) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def ensure_entry(workdir: Path, name: str, n: int, box: int) -> Path:
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
            "1.5",
            "--n-particles",
            str(n),
            "--snr",
            "0.1",
            "--out",
            str(workdir),
            "--quiet",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return workdir / name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--entry-dir", type=Path)
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default: 0 1 2")
    p.add_argument("--image-size", type=int, default=None, help="default: 128")
    p.add_argument("--box-size", type=int, default=None, help="default: 184")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-images", type=int, default=None, help="default: 2000")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the entries are simulated (once); default /tmp/cryopose-bench (-quick)",
    )
    p.add_argument(
        "--cesped-python",
        default="/tmp/cesped-venv/bin/python",
        help="python of a venv with cesped installed (skipped if missing)",
    )
    add_output_args(p, "256 images of 64 px resized to 32 px, no workers: a smoke test")
    args = p.parse_args()
    quick = dict(workers=[0], image_size=32, box_size=64, n_images=256, workdir=Path("/tmp/cryopose-bench-quick"))
    full = dict(workers=[0, 1, 2], image_size=128, box_size=184, n_images=2000, workdir=Path("/tmp/cryopose-bench"))
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        args.workers = args.workers[0]
        child(args)
        return

    n = args.n_images
    short = ensure_entry(args.workdir, f"bench{args.box_size}", n, args.box_size)
    long = ensure_entry(args.workdir, f"bench{args.box_size}_x2", 2 * n, args.box_size)
    rows = []
    for w in args.workers:
        ours = run_json(
            [
                sys.executable,
                __file__,
                "--child",
                "--entry-dir",
                str(short),
                "--workers",
                str(w),
                "--image-size",
                str(args.image_size),
                "--batch-size",
                str(args.batch_size),
                "--n-images",
                str(n),
            ]
        )[0]
        ours_long = run_json(
            [
                sys.executable,
                __file__,
                "--child",
                "--entry-dir",
                str(long),
                "--workers",
                str(w),
                "--image-size",
                str(args.image_size),
                "--batch-size",
                str(args.batch_size),
                "--n-images",
                str(2 * n),
            ]
        )[0]
        ref = None
        if Path(args.cesped_python).exists() and (HERE / "cesped_dataset_throughput.py").exists():
            ref = run_json(
                [
                    args.cesped_python,
                    str(HERE / "cesped_dataset_throughput.py"),
                    "--entry-dir",
                    str(short),
                    "--workers",
                    str(w),
                    "--image-size",
                    str(args.image_size),
                    "--batch-size",
                    str(args.batch_size),
                    "--n-images",
                    str(n),
                ]
            )[0]
        rows.append((w, ours, ours_long, ref))

    print(
        f"ParticlesDataset: read + normalise + phase flip + resize {args.box_size} -> {args.image_size} px, "
        f"batch {args.batch_size}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'workers':>7} {'ours img/s':>11} {'cesped img/s':>13} {'ratio':>6} "
        f"{'anon N (MB)':>12} {'anon 2N (MB)':>13} {'RSS N (MB)':>11} {'RSS 2N (MB)':>12}"
    )
    for w, ours, ours_long, ref in rows:
        ref_rate = f"{ref['images_per_s']:.0f}" if ref else "n/a"
        ratio = f"{ours['images_per_s'] / ref['images_per_s']:.2f}" if ref else "n/a"
        print(
            f"{w:>7} {ours['images_per_s']:>11.0f} {ref_rate:>13} {ratio:>6} "
            f"{ours['peak_anon_mb']:>12.0f} {ours_long['peak_anon_mb']:>13.0f} "
            f"{ours['peak_rss_mb']:>11.0f} {ours_long['peak_rss_mb']:>12.0f}"
        )
    print(
        "anon = peak anonymous memory of the job and its workers (RssAnon); RSS = peak resident set, "
        "which also counts cached pages of the memory-mapped stack"
    )
    if not Path(args.cesped_python).exists():
        print(f"(no reference: {args.cesped_python} not found; see benchmarks/README.md to install cesped)")

    ref_name = cesped_name(args.cesped_python)
    out = []
    for w, ours, ours_long, ref in rows:
        out.append(
            row(
                f"ParticlesDataset throughput, {args.box_size} → {args.image_size} px, {w} workers",
                ours["images_per_s"],
                ref["images_per_s"] if ref else None,
                "img/s",
                ref_name,
                lower_is_better=False,
            )
        )
        for count, r in ((n, ours), (2 * n, ours_long)):
            out.append(
                row(
                    f"ParticlesDataset peak anon. memory, {w} workers, {count} particles",
                    r["peak_anon_mb"],
                    None,
                    "MB",
                    "",
                    lower_is_better=True,
                )
            )
    write_rows(args.json, out)


if __name__ == "__main__":
    main()
