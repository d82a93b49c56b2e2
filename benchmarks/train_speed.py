#!/usr/bin/env python
"""Image2Sphere training speed: the workflow's default configuration, this code against the code
before issue 9's speed-up (kept below as the reference), same run, same data, same weights.

    .venv/bin/python benchmarks/train_speed.py [--entry results/preprocessed/sim_c4] [--half 0]
        [--steps 10] [--epochs 1] [--threads 2] [--json PATH] [--quick]

Configuration: ``config/config.yaml``'s ``image2sphere`` (32 px, ResNet18 without the stem max-pool,
lmax 6, output order 3 = 36,864 rotations, batch 32, RAdam, gradient clipping at 5, augmentation
on) on the preprocessed copy of ``sim_c4`` (3,000 particles per half: 84 training steps of 32 and 300
validation images per epoch), 2 torch threads as the workflow's ``threads: train: 2``.

What changed (the reference reproduces the old path):

* the SO(3) activation: e3nn's ``SO3Activation`` (two dense ``(…, 455) × (455, 6,912)`` products
  and their transposes in backward) → :class:`cryopose.methods.image2sphere.network.SeparableSO3Activation`
  (the same function through a block-sparse map and small real Fourier syntheses);
* the target: a dense ``(32, 36,864)`` target per batch, rebuilt with the quaternions of all 36,864
  grid rotations each time → the grid quaternions once, the loss gathered at the mates' cells;
* the optimiser: RAdam's per-parameter loop (torch's CPU default) → ``foreach=True``.

Figures: the median seconds of a training step (data, target, forward, backward, clipping,
optimiser), new and reference steps alternating so that both see the same machine load; with
``--epochs`` ≥ 1 the seconds of whole epochs (all steps plus validation; each side's steps
interleaved with the other's, one by one, and each side's own time summed); the
SO(3) activation's forward + backward alone. ``--quick``: 2 steps, no whole epoch (< 30 s).
Without the entry on disk, random images and poses stand in (the step figure then excludes data
loading and augmentation).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import add_output_args, row, write_rows  # noqa: E402

REFERENCE_NAME = "cryopose before issue 9 (e3nn SO3Activation, dense targets, RAdam loop)"
WORKFLOW_PARAMS = {"image_size": 32, "max_epochs": 20, "lr_patience": 3, "early_stop_patience": 5}


# --------------------------------------------------------------------------- the old code path
def reference_target(rotmats, grid, symmetry):
    """The old per-batch target: the grid's quaternions converted at every call, a dense target."""
    from cryopose.geometry import matrix_to_quaternion
    from cryopose.symmetry import symmetry_matrices

    rotmats = torch.as_tensor(rotmats).double()
    ops = symmetry_matrices(symmetry)
    mates = (ops[None] @ rotmats[:, None]).reshape(-1, 3, 3)
    q_grid = matrix_to_quaternion(grid.double())
    q = matrix_to_quaternion(mates)
    cells = torch.cat([(q[i : i + 1024] @ q_grid.T).abs().argmax(-1) for i in range(0, q.shape[0], 1024)])
    cells = cells.reshape(rotmats.shape[0], ops.shape[0])
    target = torch.zeros(cells.shape[0], grid.shape[0], dtype=torch.float32)
    return target.scatter_add_(1, cells, torch.full(cells.shape, 1.0 / cells.shape[1]))


def reference_loss(logits, target, weight):
    per_item = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    return (weight.reshape(-1) * per_item).mean()


@torch.no_grad()
def reference_validate(model, dataset, indices, batch_size, cells):
    from cryopose.grids import symmetric_grid_cells, target_from_cells
    from cryopose.metrics import angular_errors

    model.eval()
    grid = model.grid
    losses, errors = [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        _, images, (rot, _, conf), _ = dataset.get_batch(idx)
        logits = model.grid_logits(model.signal(images).float())
        if start not in cells:
            cells[start] = symmetric_grid_cells(rot, grid, dataset.symmetry)
        target = target_from_cells(cells[start], grid.shape[0])
        losses.append(float(reference_loss(logits, target, conf)) * len(idx))
        errors.append(angular_errors(rot, grid[logits.argmax(-1)], dataset.symmetry).numpy())
    return sum(losses) / len(indices), np.concatenate(errors)


# --------------------------------------------------------------------------- set-up
class RandomBatches:
    """Stand-in for the dataset when the entry is not on disk: random images and poses."""

    symmetry = "C4"

    def __init__(self, n, size):
        from cryopose.geometry import random_rotations

        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 1, size, size, generator=g)
        self.rot = random_rotations(n, generator=g) if _accepts_generator(random_rotations) else random_rotations(n)
        self.generator = None

    def __len__(self):
        return len(self.images)

    def get_batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx))
        return None, self.images[idx], (self.rot[idx].float(), None, torch.ones(len(idx), 1)), None


def _accepts_generator(fn):
    import inspect

    return "generator" in inspect.signature(fn).parameters


def build(entry: Path, half: int):
    from cryopose.augment import AugmentConfig
    from cryopose.data import ParticlesDataset
    from cryopose.grids import grid_quaternions_of
    from cryopose.methods.image2sphere import Params
    from cryopose.methods.image2sphere.network import Image2Sphere, e3nn_so3_activation
    from cryopose.methods.image2sphere.training import train_val_split

    params = Params(**WORKFLOW_PARAMS)
    model_config, train_config = params.model_config(), params.train_config()
    if entry.is_dir():
        train_set = ParticlesDataset(entry, half, image_size=32, augment=AugmentConfig())
        val_set = ParticlesDataset(entry, half, image_size=32)
        source = f"{entry.relative_to(ROOT) if entry.is_relative_to(ROOT) else entry} half {half}"
    else:
        train_set = val_set = RandomBatches(1500, 32)
        source = "random images (entry not found)"
    train_idx, val_idx = train_val_split(len(train_set), train_config.val_fraction, train_config.seed)
    torch.manual_seed(0)
    ours = Image2Sphere(model_config)
    reference = copy.deepcopy(ours)
    reference.activation = e3nn_so3_activation(model_config.lmax, model_config.activation_resolution)
    sides = {}
    for name, model, foreach in (("ours", ours, True), ("reference", reference, False)):
        opt = torch.optim.RAdam(
            model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay, foreach=foreach
        )
        sides[name] = {"model": model, "opt": opt}
    grid = ours.grid.cpu()
    return dict(
        train_set=train_set,
        val_set=val_set,
        train_idx=train_idx,
        val_idx=val_idx,
        sides=sides,
        grid=grid,
        grid_q=grid_quaternions_of(grid),
        tc=train_config,
        source=source,
    )


def train_step(ctx, side: str, idx, projector_gen):
    from cryopose.grids import symmetric_grid_cells
    from cryopose.methods.image2sphere.training import weighted_loss

    model, opt = ctx["sides"][side]["model"], ctx["sides"][side]["opt"]
    ds = ctx["train_set"]
    _, images, (rot, _, conf), _ = ds.get_batch(idx)
    if side == "ours":
        cells = symmetric_grid_cells(rot, ctx["grid"], ds.symmetry, grid_quaternions=ctx["grid_q"])
        loss = weighted_loss(model.grid_logits(model.signal(images, projector_gen)), cells, conf)
    else:
        target = reference_target(rot, ctx["grid"], ds.symmetry)
        loss = reference_loss(model.grid_logits(model.signal(images, projector_gen)), target, conf)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), ctx["tc"].grad_clip)
    opt.step()
    return float(loss.detach())


def interleaved_epoch(ctx, number: int) -> dict:
    """One whole epoch of each side (all its steps, then its validation), the two sides' steps
    interleaved one by one (order alternating) so that both see the same machine load."""
    from cryopose.methods.image2sphere.training import epoch_generator, validation_pass

    tc = ctx["tc"]
    order = ctx["train_idx"][
        torch.randperm(len(ctx["train_idx"]), generator=epoch_generator(tc.seed, number, 1)).numpy()
    ]
    gens = {side: (epoch_generator(tc.seed, number, 2), epoch_generator(tc.seed, number, 3)) for side in ctx["sides"]}
    seconds = {side: 0.0 for side in ctx["sides"]}
    for side in ctx["sides"]:
        ctx["sides"][side]["model"].train()
    for b in range(len(order) // tc.batch_size):
        for side in ("ours", "reference") if b % 2 else ("reference", "ours"):
            ctx["train_set"].generator = gens[side][0]
            t = time.perf_counter()
            train_step(ctx, side, order[b * tc.batch_size : (b + 1) * tc.batch_size], gens[side][1])
            seconds[side] += time.perf_counter() - t
    for side in ("ours", "reference") if number % 2 else ("reference", "ours"):
        model, cells = ctx["sides"][side]["model"], ctx.setdefault(f"val_cells_{side}", {})
        t = time.perf_counter()
        if side == "ours":
            validation_pass(model, ctx["val_set"], ctx["val_idx"], tc.batch_size, torch.device("cpu"), cells)
        else:
            reference_validate(model, ctx["val_set"], ctx["val_idx"], tc.batch_size, cells)
        seconds[side] += time.perf_counter() - t
    return seconds


def activation_seconds(ctx, repeats: int) -> dict:
    x = torch.randn(32, 16, 455, generator=torch.Generator().manual_seed(1), requires_grad=True)
    times = {"ours": [], "reference": []}
    for i in range(repeats + 1):
        for side in ("ours", "reference") if i % 2 else ("reference", "ours"):
            act = ctx["sides"][side]["model"].activation
            t = time.perf_counter()
            act(x).square().sum().backward()
            if i:
                times[side].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", type=Path, default=ROOT / "results" / "preprocessed" / "sim_c4")
    p.add_argument("--half", type=int, default=0)
    p.add_argument("--steps", type=int, default=10, help="training steps timed per side (alternating)")
    p.add_argument("--epochs", type=int, default=1, help="whole epochs timed per side (alternating; 0: none)")
    p.add_argument("--threads", type=int, default=2)
    add_output_args(p, "2 steps per side, no whole epoch (< 30 s; the figures are rough)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.epochs = 2, 0
    torch.set_num_threads(args.threads)
    import os

    load_before = os.getloadavg()[0]
    ctx = build(args.entry, args.half)
    tc = ctx["tc"]
    from cryopose.methods.image2sphere.training import epoch_generator

    order = ctx["train_idx"][torch.randperm(len(ctx["train_idx"]), generator=epoch_generator(tc.seed, 99, 1)).numpy()]
    steps = {"ours": [], "reference": []}
    for i in range(args.steps + 1):  # step 0: warm-up of both sides
        idx = order[(i * tc.batch_size) % (len(order) - tc.batch_size) :][: tc.batch_size]
        for side in ("ours", "reference") if i % 2 else ("reference", "ours"):
            ctx["train_set"].generator = epoch_generator(tc.seed, 1000 + i, 2)
            t = time.perf_counter()
            train_step(ctx, side, idx, epoch_generator(tc.seed, 1000 + i, 3))
            if i:
                steps[side].append(time.perf_counter() - t)
    step = {k: statistics.median(v) for k, v in steps.items()}
    act = activation_seconds(ctx, 1 if args.quick else 7)
    n_steps = len(ctx["train_idx"]) // tc.batch_size
    rows = [
        row("train step (batch 32, median)", step["ours"], step["reference"], "s", REFERENCE_NAME, True),
        row(
            "SO(3) activation forward + backward (32 × 16 signals)",
            act["ours"],
            act["reference"],
            "s",
            REFERENCE_NAME,
            True,
        ),
    ]
    if args.epochs:
        times = {"ours": [], "reference": []}
        for e in range(args.epochs):
            for side, sec in interleaved_epoch(ctx, e).items():
                times[side].append(sec)
        rows.append(
            row(
                f"epoch ({n_steps} steps + validation of {len(ctx['val_idx'])})",
                statistics.median(times["ours"]),
                statistics.median(times["reference"]),
                "s",
                REFERENCE_NAME,
                True,
            )
        )
    else:
        rows.append(
            row(
                f"epoch estimate ({n_steps} × median step, no validation)",
                n_steps * step["ours"],
                n_steps * step["reference"],
                "s",
                REFERENCE_NAME,
                True,
            )
        )
    load_after = os.getloadavg()[0]
    print(
        f"Image2Sphere training, workflow default configuration; data: {ctx['source']}; "
        f"{args.threads} torch threads; 1-min load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print(f"{'figure':58s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}  unit")
    for r in rows:
        print(f"{r['figure']:58s} {r['ours']:10.4f} {r['reference']:10.4f} {r['ratio']:7.2f}  {r['unit']}")
    print("ratio = reference / ours (> 1: this code is faster)")
    for r in rows:
        r["load_average"] = [round(load_before, 2), round(load_after, 2)]
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
