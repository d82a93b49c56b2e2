#!/usr/bin/env python
"""Speed of CESPED's Image2Sphere model (``cesped.network.plModule.PlModel``) on random data.

The reference for cryopose's pose network.  Run it with the python of a separate environment that
has ``cesped`` installed (``pip install cesped==25.12.0``); it does not import cryopose::

    /tmp/cesped-venv/bin/python benchmarks/cesped_image2sphere.py --image-size 64 \\
        --resnet resnet18 --lmax 6 --hp-order-projector 2 --so3-order 3

It builds CESPED's own model (``ResNetImageEncoder`` with random init, never ImageNet weights,
wrapped by ``PlModel`` -> ``I2S``) and measures, on random images of shape (B, 1, S, S):

* ``construction_s``: building the model.  CESPED computes HEALPix grids, spherical harmonics and
  Wigner-D matrices here and caches some of them with joblib under ``tempfile.gettempdir()``; the
  script points that at a fresh folder, so this is the cold (first-run) cost.
* ``train_step_s``: one training step as CESPED's Lightning setup does it: ``PlModel._step`` (forward
  + cross-entropy with label smoothing 0.1 against the nearest output-grid rotation of random
  ground-truth rotations, symmetry C1, unit per-image weights), backward, gradient-norm clipping at
  5 and a ``RAdam(lr=1e-3, weight_decay=1e-5)`` step.  Median over ``--steps`` after ``--warmup``.
* ``infer_particles_per_s``: ``PlModel.predict_step`` (argmax rotation + its probability) in eval
  mode under ``torch.no_grad``, batch size divided by the median batch time.

It prints one JSON line with those figures, the peak RSS of the process and the configuration.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--resnet", default="resnet18", help="torchvision resnet name or depth (18, 152, ...)")
    p.add_argument("--lmax", type=int, default=6)
    p.add_argument("--hp-order-projector", type=int, default=2, help="HEALPix order of the image->hemisphere projector")
    p.add_argument(
        "--hp-order-s2",
        type=int,
        default=None,
        help="HEALPix order of the S2 conv kernel grid (default: same as the projector, as in CESPED's configs)",
    )
    p.add_argument("--so3-order", type=int, default=3, help="HEALPix order of the output SO(3) grid")
    p.add_argument(
        "--rand-fraction",
        type=float,
        default=0.5,
        help="fraction of hemisphere points projected per step (CESPED's config default 0.5)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.resnet.isdigit():
        args.resnet = f"resnet{args.resnet}"
    if args.hp_order_s2 is None:
        args.hp_order_s2 = args.hp_order_projector
    return args


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    import cesped
    import e3nn.nn  # noqa: F401  (cesped's image2sphere uses e3nn.nn without importing it)
    from cesped.network.featureExtractors import ResNetImageEncoder
    from cesped.network.plModule import PlModel
    from scipy.spatial.transform import Rotation

    with tempfile.TemporaryDirectory(prefix="cesped-i2s-cache-") as cache_dir:
        tempfile.tempdir = cache_dir  # CESPED's joblib caches live under tempfile.gettempdir()

        def build():
            encoder = ResNetImageEncoder(resnetName=args.resnet, load_imagenetweights=False, in_channels=1)
            return PlModel(
                image_size=args.image_size,
                feature_extractor=encoder,
                symmetry="C1",
                lmax=args.lmax,
                hp_order_projector=args.hp_order_projector,
                hp_order_s2=args.hp_order_s2,
                hp_order_so3=args.so3_order,
                rand_fraction_points_to_project=args.rand_fraction,
            )

        construction_s, model = _timed(build, torch.device("cpu"))
        tempfile.tempdir = None
    model = model.to(device)

    B, S = args.batch_size, args.image_size
    imgs = torch.randn(B, 1, S, S, device=device)
    rotmats = torch.from_numpy(Rotation.random(B, random_state=args.seed).as_matrix()).float().to(device)
    conf = torch.ones(B, 1, device=device)
    batch = (list(range(B)), imgs, (rotmats, None, conf), {})
    optimizer = torch.optim.RAdam(model.parameters(), lr=1e-3, weight_decay=1e-5)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = model._step(batch, 0)[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        return loss.item()

    model.train()
    train_times = [_timed(train_step, device)[0] for _ in range(args.warmup + args.steps)][args.warmup :]

    infer_batch = (list(range(B)), imgs, (None, None, None), {})
    model.eval()
    with torch.no_grad():
        infer_times = [
            _timed(lambda: model.predict_step(infer_batch, 0), device)[0] for _ in range(args.warmup + args.steps)
        ][args.warmup :]

    print(
        json.dumps(
            {
                "impl": "cesped-image2sphere",
                "construction_s": round(construction_s, 3),
                "train_step_s": round(statistics.median(train_times), 4),
                "infer_particles_per_s": round(B / statistics.median(infer_times), 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "image_size": S,
                "resnet": args.resnet,
                "lmax": args.lmax,
                "hp_order_projector": args.hp_order_projector,
                "hp_order_s2": args.hp_order_s2,
                "so3_order": args.so3_order,
                "n_so3_grid": int(model.model.output_rotmats.shape[0]),
                "rand_fraction": args.rand_fraction,
                "batch_size": B,
                "steps": args.steps,
                "warmup": args.warmup,
                "threads": args.threads,
                "device": str(device),
                "n_params": sum(p.numel() for p in model.parameters()),
                "cesped_version": cesped.__version__,
                "torch_version": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
