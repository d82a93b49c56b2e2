#!/usr/bin/env python
"""Image2Sphere recipes for the default workflow: accuracy against training time (issue 21).

    .venv/bin/python benchmarks/image2sphere_recipes.py [--recipes default long8 ...]
        [--entries sim_c1 sim_c4 sim_d2] [--jobs 2] [--workdir DIR] [--out benchmarks/image2sphere_recipes]
        [--json rows.json] [--quick]

For each recipe (simulation size, preprocessed image size, Image2Sphere parameters: the
``RECIPES`` below) and each of the default config's three entries (sim_c1 C1, sim_c4 C4 with
30 % preferred views, sim_d2 D2; SNR 0.1), as the workflow does: simulate the entry, preprocess
it (phase flip, Fourier resize), train on half 0, predict half 1 with that model, and score the
cross-prediction against half 1's ground truth (symmetry-aware angle, paper eq. 5: MAnE is its
mean, as in ``cryopose evaluate``'s MAnE_half1).

Each training runs in a fresh process with one torch thread, and its clock is the process's CPU
time (``time.process_time``), so "seconds" are core-seconds: what a run takes on one idle core,
whatever else the machine is doing. ``--jobs 2`` runs two trainings side by side, as the workflow
does on 2 cores with ``threads: train: 1``.

Writes ``<out>.csv`` (one row per epoch of each run: cumulative training core-seconds, validation
median error — the model record's ``val_median_error_deg`` —, loss, learning rate), ``<out>_runs.csv``
(one row per run: epochs, training and prediction core-seconds, cross-predicted MAnE and median,
and the confidence check: the MAnE of the more confident half of the particles against the less
confident half) and ``<out>.png`` (validation median error against training core-seconds, one
panel per entry), and prints the Markdown table of the runs. ``--quick``: 300 particles per half,
24 px, one tiny recipe of 2 epochs on sim_c4 (a smoke test of a minute; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import add_output_args, row, write_rows  # noqa: E402

# The default config's entries (config/config.yaml); every other simulation key at its default.
ENTRIES = {
    "sim_c1": dict(symmetry="C1", seed=11, preferred_fraction=0.0),
    "sim_c4": dict(symmetry="C4", seed=12, preferred_fraction=0.3),
    "sim_d2": dict(symmetry="D2", seed=13, preferred_fraction=0.0),
}

# sim: the simulation (box px, Å/px, particles per half); image_size: the preprocessed copy's side
# (preprocessing.image_size); params: Image2Sphere's parameters as config/config.yaml gives them.
SIM3000 = dict(box_size=64, pixel_size=2.13, n_particles=3000)  # config/synthetic_long.yaml's entries (SNR 0.1)
SIM10K = dict(box_size=64, pixel_size=2.13, n_particles=10000)
SNR05 = dict(SIM3000, snr=0.5)  # config/config.yaml's entries
SNR03 = dict(SIM3000, snr=0.3)
LONG = dict(image_size=32, max_epochs=20, lr_patience=3, early_stop_patience=5)  # synthetic_long's image2sphere
RECIPES = {
    "default": dict(label="config/config.yaml: SNR 0.5, 3,000/half, 32 px, batch 32, 8 epochs", sim=SNR05,
                    image_size=32, params={**LONG, "max_epochs": 8}),
    "snr03": dict(label="SNR 0.3, otherwise the default", sim=SNR03, image_size=32, params={**LONG, "max_epochs": 8}),
    "long": dict(label="config/synthetic_long.yaml: SNR 0.1, 20 epochs", sim=SIM3000, image_size=32, params=LONG),
    "long8": dict(label="SNR 0.1, stopped after 8 epochs (~6 core-min)", sim=SIM3000, image_size=32,
                  params={**LONG, "max_epochs": 8}),
    "batch16": dict(label="SNR 0.1, batch 16 (twice the steps per image), 4 epochs", sim=SIM3000, image_size=32,
                    params={**LONG, "max_epochs": 4, "batch_size": 16}),
    "n10k_32px": dict(label="SNR 0.1, 10,000 particles/half, 32 px, 2 epochs", sim=SIM10K, image_size=32,
                      params={**LONG, "max_epochs": 2}),
    "n10k_24px": dict(label="SNR 0.1, 10,000 particles/half, 24 px, 3 epochs", sim=SIM10K, image_size=24,
                      params={**LONG, "image_size": 24, "max_epochs": 3}),
    "onecycle8": dict(label="SNR 0.1, one-cycle schedule to lr 3e-3 over 8 epochs", sim=SIM3000, image_size=32,
                      params={**LONG, "max_epochs": 8, "early_stop_patience": 8, "lr_schedule": "onecycle",
                              "lr": 3e-3}),
    "px64": dict(label="SNR 0.1, 64 px input (no Fourier crop), 3 epochs", sim=SIM3000, image_size=64,
                 params={**LONG, "image_size": 64, "max_epochs": 3}),
}  # fmt: skip

QUICK = {
    "quick": dict(
        label="quick smoke test",
        sim=dict(box_size=48, pixel_size=2.84, n_particles=300),
        image_size=24,
        params=dict(image_size=24, max_epochs=2, lmax=4, output_order=2, sphere_channels=64, batch_size=32),
    ),
}


def _entry_spec(name: str, sim: dict) -> dict:
    return dict(name=name, **ENTRIES[name], **sim)


def _sim_key(sim: dict) -> str:
    """The simulation's folder name: every key that changes the images (other keys: defaults)."""
    extra = "".join(f"_{k}{v}" for k, v in sorted(sim.items()) if k not in ("box_size", "pixel_size", "n_particles"))
    return f"box{sim['box_size']}_px{sim['pixel_size']}_n{sim['n_particles']}{extra}"


def prepare(recipe: dict, entry: str, workdir: Path) -> Path:
    """Simulate and preprocess ``entry`` as the recipe says (shared by recipes of the same sizes)."""
    from cryopose.data import write_preprocessed_entry
    from cryopose.simulate import SimulationSpec, simulate_entry

    raw = workdir / f"raw_{_sim_key(recipe['sim'])}"
    pre = workdir / f"pre_{_sim_key(recipe['sim'])}_{recipe['image_size']}px"
    if not (pre / entry / "particles_1.star").is_file():
        simulate_entry(SimulationSpec(**_entry_spec(entry, recipe["sim"])), raw, progress=False)
        write_preprocessed_entry(
            raw / entry, pre, image_size=recipe["image_size"], ctf_correction="phase_flip", progress=False
        )
    return pre / entry


def run_one(recipe_name: str, recipe: dict, entry: str, workdir: Path) -> dict:
    """Train on half 0 (one thread, CPU-time clock), predict half 1, score; in this process."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import types

    from cryopose.data import ParticlesDataset
    from cryopose.methods import get_method
    from cryopose.methods.image2sphere import training
    from cryopose.methods.image2sphere.prediction import predict_image2sphere
    from cryopose.symmetry import symmetry_aware_angle

    entry_dir = prepare(recipe, entry, workdir)
    method = get_method("image2sphere")
    params = method.params(**{"device": "cpu", **recipe["params"]})
    model_dir = workdir / "models" / recipe_name / entry
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    # The training's clock (epoch seconds, the max_minutes budget) becomes this process's CPU time.
    training.time = types.SimpleNamespace(monotonic=time.process_time)
    t0 = time.process_time()
    rows = training.train_image2sphere(
        entry_dir, 0, model_dir, params.model_config(), params.train_config(), progress=False
    )
    train_s = time.process_time() - t0

    t0 = time.process_time()
    model, _ = training.load_model(model_dir / "model.pt", "cpu")
    dataset = ParticlesDataset(entry_dir, 1, image_size=model.config.image_size)
    rotmats, confidence = predict_image2sphere(model, dataset, batch_size=2 * params.batch_size, progress=False)
    predict_s = time.process_time() - t0
    _, _, (true_rot, _, _), _ = dataset.get_batch(np.arange(len(dataset)))
    err = symmetry_aware_angle(torch.as_tensor(true_rot, dtype=torch.float64), rotmats, dataset.symmetry).numpy()
    conf = confidence.numpy()
    order = np.argsort(-conf, kind="stable")
    top, bottom = order[: len(order) // 2], order[len(order) // 2 :]
    rank_corr = float(np.corrcoef(np.argsort(np.argsort(conf)), np.argsort(np.argsort(err)))[0, 1])
    best = min(rows, key=lambda r: r["val_loss"])
    return {
        "recipe": recipe_name,
        "entry": entry,
        "epochs": len(rows),
        "best_epoch": best["epoch"],
        "train_core_s": train_s,
        "predict_core_s": predict_s,
        "val_median_error_deg": best["val_median_error_deg"],
        "MAnE_half1": float(err.mean()),
        "median_half1": float(np.median(err)),
        "MAnE_confident_half": float(err[top].mean()),
        "MAnE_other_half": float(err[bottom].mean()),
        "spearman_conf_err": rank_corr,
        "log": rows,
    }


def _launch(recipe_name: str, entry: str, workdir: Path, recipes_file: Path) -> dict:
    out = workdir / "runs" / f"{recipe_name}__{entry}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--one", recipe_name, entry, str(workdir), str(recipes_file), str(out)]
    log = workdir / "runs" / f"{recipe_name}__{entry}.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe_name} on {entry} failed (log: {log})")
    result = json.loads(out.read_text())
    print(
        f"{recipe_name:>12s} {entry}: {result['epochs']} epochs, {result['train_core_s']:.0f} core-s, "
        f"MAnE {result['MAnE_half1']:.1f}°, median {result['median_half1']:.1f}°",
        flush=True,
    )
    return result


def random_mane(symmetries) -> dict[str, float]:
    """The MAnE of uniformly random predictions for each group (the ``random`` method's expectation)."""
    import torch

    from cryopose.geometry import random_rotations
    from cryopose.symmetry import symmetry_aware_angle

    g = torch.Generator().manual_seed(0)
    a, b = (random_rotations(20000, generator=g).double() for _ in range(2))
    return {s: float(symmetry_aware_angle(a, b, s).mean()) for s in symmetries}


def write_outputs(results: list[dict], recipes: dict, out: Path) -> str:
    """CSV of epochs, CSV of runs, the plot; returns the Markdown table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["recipe", "entry", "epoch", "train_core_s", "val_median_error_deg", "val_mean_error_deg",
                    "train_loss", "val_loss", "lr"])  # fmt: skip
        for r in results:
            cum = 0.0
            for e in r["log"]:
                cum += e["seconds"]
                w.writerow([r["recipe"], r["entry"], e["epoch"], f"{cum:.1f}", f"{e['val_median_error_deg']:.2f}",
                            f"{e['val_mean_error_deg']:.2f}", f"{e['train_loss']:.4f}", f"{e['val_loss']:.4f}",
                            f"{e['lr']:.3g}"])  # fmt: skip
    keys = ["recipe", "entry", "epochs", "best_epoch", "train_core_s", "predict_core_s", "val_median_error_deg",
            "MAnE_half1", "median_half1", "MAnE_confident_half", "MAnE_other_half", "spearman_conf_err"]  # fmt: skip
    with open(out.with_name(out.name + "_runs.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items() if k in keys})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(dict.fromkeys(r["entry"] for r in results))
    fig, axes = plt.subplots(1, len(entries), figsize=(max(6.5, 4.6 * len(entries)), 4), sharey=True, squeeze=False)
    names = list(dict.fromkeys(r["recipe"] for r in results))
    for ax, entry in zip(axes[0], entries):
        for i, name in enumerate(names):
            for r in results:
                if r["recipe"] == name and r["entry"] == entry:
                    t, cum = [], 0.0
                    for e in r["log"]:
                        cum += e["seconds"]
                        t.append(cum / 60)
                    ax.plot(t, [e["val_median_error_deg"] for e in r["log"]], "o-", ms=3, color=f"C{i}",
                            label=f"{name} (MAnE {r['MAnE_half1']:.0f}°)")  # fmt: skip
        ax.set_title(entry)
        ax.set_xlabel("training time (core-minutes, 1 thread)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation median angular error (°)")
    fig.suptitle("Image2Sphere recipes: validation median error against training time", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)

    random = random_mane({ENTRIES[e]["symmetry"] for e in entries})
    lines = [
        "| recipe | entry | epochs | train core-min | predict core-s | val median (°) | MAnE half 1 (°) "
        "| random's MAnE (°) | median half 1 (°) | MAnE confident / other half (°) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        rnd = random[ENTRIES[r["entry"]]["symmetry"]]
        lines.append(
            f"| {r['recipe']} | {r['entry']} | {r['epochs']} | {r['train_core_s'] / 60:.1f} "
            f"| {r['predict_core_s']:.0f} | {r['val_median_error_deg']:.1f} | {r['MAnE_half1']:.1f} | {rnd:.1f} "
            f"| {r['median_half1']:.1f} | {r['MAnE_confident_half']:.1f} / {r['MAnE_other_half']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--one":  # a worker process
        recipe_name, entry, workdir, recipes_file, out = sys.argv[2:7]
        recipes = json.loads(Path(recipes_file).read_text())
        result = run_one(recipe_name, recipes[recipe_name], entry, Path(workdir))
        Path(out).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=None, help=f"of {', '.join(RECIPES)} (default: all)")
    parser.add_argument("--entries", nargs="+", default=list(ENTRIES), choices=list(ENTRIES))
    parser.add_argument("--jobs", type=int, default=2, help="trainings side by side (one thread each)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="simulations and models (default: a temporary folder)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="<out>.csv, <out>_runs.csv, <out>.png (default: benchmarks/image2sphere_recipes; --quick: a temp folder)",
    )
    parser.add_argument("--extra", type=Path, help="a JSON file of more recipes (name -> recipe, as RECIPES)")
    add_output_args(parser, "one tiny recipe, 300 particles per half, 2 epochs, sim_c4 only (a smoke test)")
    args = parser.parse_args(argv)

    recipes = QUICK if args.quick else dict(RECIPES)
    if args.extra and not args.quick:
        recipes.update(json.loads(args.extra.read_text()))
    names = list(recipes) if args.quick or not args.recipes else args.recipes
    entries = ["sim_c4"] if args.quick else args.entries
    for n in names:
        if n not in recipes:
            parser.error(f"unknown recipe {n!r}; known: {', '.join(recipes)}")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="i2s_recipes_")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "image2sphere_recipes_quick" if args.quick else HERE / "image2sphere_recipes"
        )
    recipes_file = workdir / "recipes.json"
    recipes_file.write_text(json.dumps(recipes))
    # Simulate and preprocess first, once per size (the workers would race on a shared folder).
    for n in names:
        for e in entries:
            prepare(recipes[n], e, workdir)
    jobs = [(n, e) for n in names for e in entries]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda job: _launch(job[0], job[1], workdir, recipes_file), jobs))
    table = write_outputs(results, recipes, args.out)
    print(f"\n{len(jobs)} trainings in {time.monotonic() - started:.0f} s wall, {args.jobs} side by side\n")
    for n in names:
        r = recipes[n]
        print(f"* {n}: {r['label']}: sim {r['sim']}, {r['image_size']} px, {r['params']}")
    print()
    print(table)
    write_rows(
        args.json,
        [
            row(
                f"Image2Sphere {r['recipe']} on {r['entry']}: training core-seconds (MAnE {r['MAnE_half1']:.0f}°)"
                + (" (quick sizes)" if args.quick else ""),
                r["train_core_s"],
                None,
                "s",
                "",
                True,
            )
            for r in results
        ],
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
