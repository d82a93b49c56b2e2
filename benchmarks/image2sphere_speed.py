#!/usr/bin/env python
"""Image2Sphere speed: cryopose's model against the CESPED package's, same configuration, same run.

    .venv/bin/python benchmarks/image2sphere_speed.py [--configs cpu paper] [--steps 5]
        [--cesped-python /tmp/cesped-venv/bin/python] [--device cpu] [--json rows.json] [--quick]

For each configuration, each implementation runs in a fresh process (so peak RSS is its own) on
random images ``(B, 1, S, S)`` with random rotations, 2 torch threads on a CPU:

* construction: building the model with a cold cache (Wigner matrices, grids), and for cryopose
  again with the cache warm (what every later training or prediction process pays);
* train step: forward, loss against the nearest output-grid cell, backward, gradient clipping at
  5 and a RAdam step; the median over ``--steps`` after one warm-up step;
* inference: forward in evaluation mode, argmax pose and its probability; particles per second.

CESPED's side is ``benchmarks/cesped_image2sphere.py`` run with ``--cesped-python`` (a separate
environment with ``pip install cesped==25.12.0``). The configurations (CESPED's names in brackets):

* ``cpu``: 64 px, ResNet18 (stem max-pool kept, as CESPED does), lmax 6, hemisphere order 2
  [hp_order_projector], S² kernel order 2 [hp_order_s2], output order 3 [hp_order_so3], 512 sphere
  channels [s2_fdim], 16 hidden [so3_fdim], activation resolution 10, half the points projected;
* ``paper``: the paper's Appendix B: 256 px, ResNet152, lmax 8, orders 3 / 3 / 4, same channels.

One difference is fixed by CESPED: its local SO(3) kernel is a 512-point box grid, not
configurable; ours is the paper's 8 × 3 × 8 = 192-point ring grid. Prints a table (``--json``: also
as rows for ``benchmarks/run_all``; ``--quick``: the ``tiny`` configuration — 64 px, lmax 4, orders
1 / 1 / 2 — one step of 8 images, a smoke test); nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import add_output_args, cesped_name, row, write_rows  # noqa: E402

CONFIGS = {
    "cpu": dict(image_size=64, resnet="resnet18", lmax=6, projector_order=2, s2_kernel_order=2, output_order=3),
    "paper": dict(image_size=256, resnet="resnet152", lmax=8, projector_order=3, s2_kernel_order=3, output_order=4),
    "tiny": dict(image_size=64, resnet="resnet18", lmax=4, projector_order=1, s2_kernel_order=1, output_order=2),
}
COMMON = dict(drop_maxpool=False, sphere_channels=512, s2_channels=16, activation_resolution=10, projector_fraction=0.5)

OURS = r"""
import json, resource, statistics, sys, time
import torch
torch.set_num_threads(2)
cfg, steps, batch, device = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), torch.device(sys.argv[4])
from cryopose.methods.image2sphere.network import Image2Sphere, Image2SphereConfig
from cryopose.geometry import random_rotations
from cryopose.grids import symmetric_grid_target
def timed(fn):
    if device.type == "cuda": torch.cuda.synchronize()
    t = time.perf_counter(); out = fn()
    if device.type == "cuda": torch.cuda.synchronize()
    return time.perf_counter() - t, out
torch.manual_seed(0)
cold, _ = timed(lambda: Image2Sphere(Image2SphereConfig(**cfg)))
warm, model = timed(lambda: Image2Sphere(Image2SphereConfig(**cfg)))
model = model.to(device)
s = cfg["image_size"]
images = torch.randn(batch, 1, s, s, device=device)
rot = random_rotations(batch, generator=torch.Generator().manual_seed(0))
conf = torch.ones(batch, device=device)
opt = torch.optim.RAdam(model.parameters(), lr=1e-3, weight_decay=1e-5)
grid = model.grid.cpu()
def step():
    target = symmetric_grid_target(rot, grid, "C1").to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        signal = model.signal(images)
    logits = model.grid_logits(signal.float())
    loss = (conf * -(target * torch.log_softmax(logits, -1)).sum(-1)).mean()
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0); opt.step()
    return float(loss)
model.train()
train = [timed(step)[0] for _ in range(steps + 1)][1:]
model.eval()
def infer():
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        signal = model.signal(images)
    p, i = torch.softmax(model.grid_logits(signal.float()), -1).max(-1)
    return model.grid[i], p
infer_t = [timed(infer)[0] for _ in range(steps + 1)][1:]
print(json.dumps({"impl": "cryopose", "construction_s": cold, "construction_warm_s": warm,
                  "train_step_s": statistics.median(train), "infer_particles_per_s": batch / statistics.median(infer_t),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "n_params": sum(p.numel() for p in model.parameters())}))
"""


def _run(cmd, env=None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", nargs="+", choices=sorted(CONFIGS), default=None, help="default: cpu paper (--quick: tiny)"
    )
    p.add_argument("--steps", type=int, default=None, help="default 5 (--quick: 1)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (--quick: 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cesped-python", default="/tmp/cesped-venv/bin/python")
    add_output_args(p, "the tiny configuration, one step of 8 images: a smoke test")
    args = p.parse_args(argv)
    for key, full, quick in (("configs", ["cpu", "paper"], ["tiny"]), ("steps", 5, 1), ("batch_size", 32, 8)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)

    rows = []
    for name in args.configs:
        cfg = {**CONFIGS[name], **COMMON}
        steps = args.steps if name == "cpu" else max(2, args.steps // 2)
        with tempfile.TemporaryDirectory(prefix="cryopose-cache-") as cache:
            env = dict(os.environ, CRYOPOSE_CACHE=cache)
            ours = _run(
                [sys.executable, "-c", OURS, json.dumps(cfg), str(steps), str(args.batch_size), args.device], env
            )
        theirs = None
        if Path(args.cesped_python).is_file():
            theirs = _run(
                [
                    args.cesped_python,
                    str(HERE / "cesped_image2sphere.py"),
                    "--image-size",
                    str(cfg["image_size"]),
                    "--resnet",
                    cfg["resnet"],
                    "--lmax",
                    str(cfg["lmax"]),
                    "--hp-order-projector",
                    str(cfg["projector_order"]),
                    "--hp-order-s2",
                    str(cfg["s2_kernel_order"]),
                    "--so3-order",
                    str(cfg["output_order"]),
                    "--batch-size",
                    str(args.batch_size),
                    "--steps",
                    str(steps),
                    "--device",
                    args.device,
                ]
            )
        rows.append((name, ours, theirs))
        print(f"[{name}] cryopose {json.dumps(ours)}\n[{name}] cesped   {json.dumps(theirs)}", flush=True)

    print(f"\nImage2Sphere, batch {args.batch_size}, device {args.device}, 2 torch threads")
    print(f"{'config':8s} {'figure':28s} {'cryopose':>12s} {'cesped':>12s} {'ratio':>8s}")
    figures = [
        ("construction_s", "build, cold cache (s)", False),
        ("train_step_s", "train step (s)", False),
        ("infer_particles_per_s", "inference (particles/s)", True),
        ("peak_rss_mb", "peak RSS (MB)", False),
    ]
    for name, ours, theirs in rows:
        for key, label, higher_better in figures:
            a, b = ours[key], (theirs or {}).get(key)
            ratio = "" if b is None else f"{(a / b if higher_better else b / a):.2f}×"
            print(f"{name:8s} {label:28s} {a:12.2f} {'' if b is None else f'{b:12.2f}':>12s} {ratio:>8s}")
        print(f"{name:8s} {'build, warm cache (s)':28s} {ours['construction_warm_s']:12.2f}")
    print("ratio: how many times cryopose is faster (or smaller); > 1 favours cryopose")

    ref_name = cesped_name(args.cesped_python)
    out = []
    for name, ours, theirs in rows:
        cfg = CONFIGS[name]
        what = f"Image2Sphere, {name} configuration ({cfg['image_size']} px, {cfg['resnet']}), {args.device}"
        for key, label, higher_better in figures:
            unit = {
                "construction_s": "s",
                "train_step_s": "s",
                "infer_particles_per_s": "particles/s",
                "peak_rss_mb": "MB",
            }[key]
            if key == "train_step_s":
                label = f"training step of {args.batch_size}"
            out.append(
                row(
                    f"{what}: {label.split(' (')[0]}",
                    ours[key],
                    (theirs or {}).get(key),
                    unit,
                    ref_name if theirs else "",
                    lower_is_better=not higher_better,
                )
            )
        out.append(row(f"{what}: build, warm cache", ours["construction_warm_s"], None, "s", "", lower_is_better=True))
    write_rows(args.json, out)


if __name__ == "__main__":
    main()
