#!/usr/bin/env python
"""Throughput of CESPED's ``ParticlesDataset`` behind a torch ``DataLoader``.

The reference half of a side-by-side comparison with cryopose's own dataset.  Run it with the
python of a separate environment that has ``cesped`` installed (``pip install cesped==25.12.0``);
it does not import cryopose::

    /tmp/cesped-venv/bin/python benchmarks/cesped_dataset_throughput.py \\
        --entry-dir /tmp/cryopose-bench/bench184 --half 0 --image-size 128 \\
        --workers 0 1 2 --batch-size 64 --n-images 1024

For each worker count it prints one JSON line::

    {"impl": "cesped", "workers": w, "images_per_s": ..., "n_images": ..., "peak_rss_mb": ..., ...}

Each worker count is measured in a fresh child process so that the peak-memory figures of one
setting do not leak into the next (``ru_maxrss`` only ever grows).

What CESPED does per item, in this order (``cesped.datamanager.relionStarDataset``):

1. read the image (one seek + read under a lock shared by all DataLoader workers);
2. normalise: ``(img - mean) / std`` of the pixels outside the inscribed circle of the box;
3. CTF correction by phase flipping: multiply the centred DFT by ``sign(-CTF)``, then clamp the
   result to the input's min/max;
4. resize: bilinear ``interpolate`` (no antialiasing) by ``image_size / (box * (1 - crop))``, then
   centre crop (or zero pad) to ``image_size``.

All of these are set explicitly below: per-image normalisation on, ``ctf_correction="phase_flip"``,
``image_size=--image-size`` and ``image_size_factor_for_crop=--crop-fraction`` (default 0, i.e.
the whole box is resized; CESPED's own default would drop 25 % of the box).  The main process
runs torch with ``--torch-threads`` (default 1) intra-op threads, as DataLoader workers do.

CESPED only loads an entry found as ``<benchmarkDir>/<targetName>/particles_{h}.star``,
``particles_{h}.mrcs`` and ``info_{h}.json`` (``{"symmetry": ...}``) with a
``SUCCESSFUL_DOWNLOAD_{h}.txt`` marker beside them; without the marker it tries to download the
entry.  The script therefore builds that layout from symlinks in a scratch folder and never
writes to ``--entry-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

IMPL = "cesped"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--entry-dir",
        required=True,
        help="folder holding particles_{h}.star / particles_{h}.mrcs (and optionally info_{h}.json)",
    )
    p.add_argument("--half", type=int, choices=[0, 1], default=0)
    p.add_argument("--image-size", type=int, default=128, help="final image size in pixels")
    p.add_argument(
        "--crop-fraction",
        type=float,
        default=0.0,
        help="CESPED's image_size_factor_for_crop: fraction of the box removed before resizing "
        "(0 = resize the whole box; CESPED's ParticlesDataset default is 0.25)",
    )
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--n-images",
        type=int,
        default=None,
        help="images to time after the warm-up batch (default: the rest of the half set)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads of the main process (DataLoader workers always use 1); "
        "0 keeps torch's default.  With more threads than free cores, CESPED's small "
        "per-image FFTs slow down by ~100x, so 1 is the reproducible setting",
    )
    p.add_argument(
        "--sample-pss",
        action="store_true",
        help="also report the peak summed PSS of the process and its workers, sampled every "
        "0.5 s (each sample reads /proc/*/smaps: ~13 ms of CPU per process, which "
        "perturbs the timing a little on a small machine)",
    )
    p.add_argument(
        "--symmetry", default=None, help="point symmetry to write to info_{h}.json when the entry has none (default C1)"
    )
    p.add_argument(
        "--scratch-dir",
        default=None,
        help="where to build CESPED's layout (default: a temporary folder, removed afterwards)",
    )
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# CESPED layout
# --------------------------------------------------------------------------------------------


def target_name_for(entry_dir: str) -> str:
    # A name that is not one of CESPED's published entries (those map to Zenodo record ids, and a
    # clash would make it look for SUCCESSFUL_DOWNLOAD_<record id>.txt and try to download).
    return "local_" + osp.basename(osp.normpath(entry_dir))


def build_layout(entry_dir: str, half: int, scratch: str, symmetry: str | None) -> tuple[str, str]:
    """Make ``scratch/<target>/`` look like a downloaded CESPED entry; return (benchmarkDir, target)."""
    from cesped.zenodo.bechmarkUrls import NAME_PARTITION_TO_RECORID
    from cesped.zenodo.downloadFromZenodo import getDoneFname

    entry_dir = osp.abspath(entry_dir)
    target = target_name_for(entry_dir)
    if (target, half) in NAME_PARTITION_TO_RECORID:
        raise SystemExit(f"{target!r} clashes with a published CESPED entry name")
    star = osp.join(entry_dir, f"particles_{half}.star")
    if not osp.isfile(star):
        raise SystemExit(f"no {star}")

    tdir = osp.join(scratch, target)
    os.makedirs(tdir, exist_ok=True)
    # The STAR names images like 000001@particles_0.mrcs relative to its own folder; CESPED resolves
    # them against <benchmarkDir>/<target>/, so link every stack file the STAR may refer to.
    for name in os.listdir(entry_dir):
        if name.endswith((".mrcs", ".mrc")) or name == f"particles_{half}.star":
            dst = osp.join(tdir, name)
            if not osp.lexists(dst):
                os.symlink(osp.join(entry_dir, name), dst)

    info = osp.join(entry_dir, f"info_{half}.json")
    info_dst = osp.join(tdir, f"info_{half}.json")
    if osp.isfile(info) and symmetry is None:
        if not osp.lexists(info_dst):
            os.symlink(info, info_dst)
    else:
        with open(info_dst, "w") as f:
            json.dump({"symmetry": (symmetry or "C1").upper()}, f)

    # The marker ParticlesDataset._is_avaible() looks for; its id is the half number for names
    # that are not published entries.
    with open(getDoneFname(tdir, NAME_PARTITION_TO_RECORID.get((target, half), half)), "w") as f:
        f.write(f"{target}\n")
    return scratch, target


def make_dataset(benchmark_dir: str, target: str, args):
    from cesped.particlesDataset import ParticlesDataset

    return ParticlesDataset(
        targetName=target,
        halfset=args.half,
        benchmarkDir=benchmark_dir,
        image_size=args.image_size,  # final size after crop + resize
        apply_perImg_normalization=True,  # -> perImg_normalization="noiseStats"
        ctf_correction="phase_flip",
        image_size_factor_for_crop=args.crop_fraction,
    )


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------


class PssSampler:
    """Peak of the summed PSS of this process and its children (DataLoader workers), sampled.

    PSS splits pages shared between forked workers, so the sum does not count them twice as
    summed RSS would.  Needs psutil (a lightning dependency, so present in a cesped venv).
    """

    def __init__(self, enabled: bool, interval: float = 0.5):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = None
        if enabled:
            try:
                import psutil

                self._proc = psutil.Process()
            except ImportError:  # pragma: no cover - psutil missing
                pass
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        total = 0
        for p in [self._proc] + self._proc.children(recursive=True):
            try:
                total += p.memory_full_info().pss
            except Exception:
                pass
        self.peak = max(self.peak, total)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._proc is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._stop.set()
            self._thread.join()

    @property
    def peak_mb(self):
        return None if self._proc is None else round(self.peak / 2**20, 1)


# --------------------------------------------------------------------------------------------
# measurement (child process)
# --------------------------------------------------------------------------------------------


def measure(args, workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    benchmark_dir, target = args.scratch_dir, target_name_for(args.entry_dir)
    ds = make_dataset(benchmark_dir, target, args)
    n_total = len(ds)  # reads the STAR file only; no image file is opened in this process yet
    if n_total <= args.batch_size:
        raise SystemExit(f"half set has {n_total} images: too few for a warm-up batch of {args.batch_size}")
    n_timed = n_total - args.batch_size if args.n_images is None else min(args.n_images, n_total - args.batch_size)
    subset = Subset(ds, range(args.batch_size + n_timed))
    # NB: touching ds[i] here would open the stack in this process; forked workers would then share
    # its file offset (CESPED serialises that with a lock shared across processes anyway).
    loader = DataLoader(subset, batch_size=args.batch_size, shuffle=False, num_workers=workers)

    # `import torch` already reaped a child (ldconfig) whose ru_maxrss can be hundreds of MB; only
    # count RUSAGE_CHILDREN if the DataLoader workers pushed it higher.
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with PssSampler(args.sample_pss) as pss:
        it = iter(loader)
        t0 = time.perf_counter()
        iid, img, _labels, _md = next(it)  # warm-up: worker start-up, first reads
        warm_s = time.perf_counter() - t0
        expect = (len(iid), 1, args.image_size, args.image_size)
        if tuple(img.shape) != expect or not torch.isfinite(img).all():
            raise RuntimeError(f"unexpected batch {tuple(img.shape)}, expected {expect}")

        n = 0
        t0 = time.perf_counter()
        for _iid, img, _labels, _md in it:
            n += img.shape[0]
        elapsed = time.perf_counter() - t0
        del it  # join the workers so RUSAGE_CHILDREN sees them

    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    ru_children = children_after / 1024 if children_after > children_before else 0.0
    return {
        "impl": IMPL,
        "workers": workers,
        "images_per_s": round(n / elapsed, 1),
        "n_images": n,
        # ru_maxrss of this process + that of the largest of its (reaped) workers.  RUSAGE_CHILDREN
        # gives the biggest single child, not a sum, so with >1 worker this undercounts summed RSS;
        # it also counts pages shared with the parent by fork twice.  --sample-pss is the fairer sum.
        "peak_rss_mb": round(ru_self + ru_children, 1),
        "peak_rss_self_mb": round(ru_self, 1),
        "peak_rss_child_max_mb": round(ru_children, 1),
        "peak_pss_total_mb": pss.peak_mb,
        "seconds": round(elapsed, 3),
        "warmup_s": round(warm_s, 3),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "crop_fraction": args.crop_fraction,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args, args.child)), flush=True)
        return 0

    own_scratch = args.scratch_dir is None
    scratch = tempfile.mkdtemp(prefix="cesped-bench-") if own_scratch else args.scratch_dir
    try:
        build_layout(args.entry_dir, args.half, scratch, args.symmetry)
        base = [
            sys.executable,
            osp.abspath(__file__),
            "--entry-dir",
            osp.abspath(args.entry_dir),
            "--half",
            str(args.half),
            "--image-size",
            str(args.image_size),
            "--crop-fraction",
            str(args.crop_fraction),
            "--batch-size",
            str(args.batch_size),
            "--torch-threads",
            str(args.torch_threads),
            *(["--sample-pss"] if args.sample_pss else []),
            "--scratch-dir",
            scratch,
        ]
        if args.n_images is not None:
            base += ["--n-images", str(args.n_images)]
        rc = 0
        for w in args.workers:
            res = subprocess.run(base + ["--child", str(w)], stdout=subprocess.PIPE, text=True)
            lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
            if res.returncode != 0 or not lines:
                print(f"workers={w}: child failed (rc={res.returncode})", file=sys.stderr)
                rc = 1
                continue
            print(lines[-1], flush=True)
        return rc
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
