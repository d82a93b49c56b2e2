"""``image2sphere``: the CESPED paper's baseline (Klee et al. 2023).

A ResNet encodes the image; its features are projected onto a hemisphere, lifted to S² and SO(3)
harmonics, convolved, and read out as logits over an SO(3) HEALPix grid (:mod:`.network`). It is
trained with the paper's symmetry-aware cross-entropy (:mod:`.training`) and predicts the most
probable grid cell, optionally refined off the grid by a local ascent of its own signal
(:mod:`.prediction`). It trains on the workflow's preprocessed copy of an entry.

The defaults are the CPU-sized model (64 px, ResNet18, lmax 6, output order 3: a few minutes per
half on 2 cores); ``config/cesped.yaml`` holds the paper's configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ...parameters import param, validate
from .. import Method


@dataclass(frozen=True)
class Params:
    """The network's architecture (:class:`.network.Image2SphereConfig`), its optimisation
    (:class:`.training.TrainConfig`) and the prediction's off-grid refinement."""

    image_size: int = param(64, "side of the input images in pixels (the preprocessed copy's size)", min=1)
    resnet: str = param(
        "resnet18",
        "torchvision ResNet of the encoder",
        choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    )
    encoder_weights: str | None = param(
        None, "a local torchvision ResNet state-dict file (e.g. ImageNet); null: random"
    )
    drop_maxpool: bool = param(True, "remove the ResNet stem's max-pool (doubles the feature map's side)")
    sphere_channels: int = param(256, "channels after the 1×1 convolution (the paper: 512)", min=1)
    projector_order: int = param(2, "HEALPix order of the hemisphere grid (3 ≈ 7.3°)", min=0)
    projector_fraction: float = param(0.5, "fraction of hemisphere points drawn in each training step", above=0, max=1)
    lmax: int = param(6, "highest spherical-harmonic degree", min=1)
    s2_channels: int = param(16, "output channels of the S² convolution", min=1)
    s2_kernel_order: int = param(2, "HEALPix order of the S² kernel grid", min=0)
    activation_resolution: int = param(6, "resolution of the SO(3) grid of the pointwise activation", min=1)
    output_order: int = param(3, "order of the SO(3) output grid (72·8^order rotations)", min=0)
    gaussian_sigmas: list[float] = param([1.0, 2.0], "σ in pixels of the two filtered copies (input channels 2, 3)")
    so3_kernel_max_beta: float = param(math.pi / 8, "radians: local support of the SO(3) kernel", above=0)
    so3_kernel_n_alpha: int = param(8, "SO(3) kernel grid: samples in α", min=1)
    so3_kernel_n_beta: int = param(3, "SO(3) kernel grid: samples in β", min=1)
    batch_size: int = param(32, "images per training step (prediction uses twice as many)", min=1)
    lr: float = param(1e-3, "learning rate of RAdam", above=0)
    weight_decay: float = param(1e-5, "RAdam's weight decay", min=0)
    max_epochs: int = param(6, "epochs at most (the paper: 400)", min=1)
    lr_patience: int = param(2, "epochs of stalled validation loss before the learning rate is halved", min=0)
    lr_schedule: str = param(
        "plateau",
        "plateau: halve lr after lr_patience stalled epochs; onecycle: warm up to lr, anneal to 0 by max_epochs",
        choices=("plateau", "onecycle"),
    )
    early_stop_patience: int = param(4, "epochs without improvement before stopping", min=0)
    grad_clip: float = param(5.0, "gradient norm clip", above=0)
    val_fraction: float = param(0.1, "fraction of the training half held out for validation", above=0, below=1)
    augment: bool = param(True, "random in-plane rotations, shifts and noise while training")
    seed: int = param(0, "seed of every random draw (splits, shuffling, augmentation)")
    max_minutes: float | None = param(
        None,
        "wall-time budget checked after each epoch (null: none; a budget makes the run machine-dependent)",
        above=0,
    )
    device: str = param("auto", "cpu, cuda, cuda:N, or auto (a GPU when there is one)")
    refine_steps: int = param(0, "rounds of local ascent of the network's signal from the best grid cell", min=0)

    def __post_init__(self):
        validate(self)  # the bounds declared above
        self.model_config(), self.train_config()  # and each part's own rules

    def model_config(self):
        from .network import Image2SphereConfig

        names = {f.name for f in dataclasses.fields(Image2SphereConfig)}
        return Image2SphereConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def train_config(self):
        from .training import TrainConfig

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def train(entry, half, model_dir, params: Params, work_dir=None) -> dict:
    from .training import train_image2sphere

    rows = train_image2sphere(entry, half, model_dir, params.model_config(), params.train_config(), work_dir=work_dir)
    best = min(rows, key=lambda r: r["val_loss"])
    return {"epochs": len(rows), "best_epoch": best["epoch"], "val_median_error_deg": best["val_median_error_deg"]}


def predict(model_dir, entry, half, out_star, params: Params) -> None:
    from ...data import ParticlesDataset
    from ...device import report_device, select_device
    from ...predictions import write_predictions
    from .prediction import predict_image2sphere
    from .training import load_model

    device = select_device(params.device)
    report_device("image2sphere prediction", device)
    model, _ = load_model(model_dir / "model.pt", device)
    dataset = ParticlesDataset(entry, half, image_size=model.config.image_size)
    rotmats, confidence = predict_image2sphere(
        model, dataset, batch_size=2 * params.batch_size, device=device, refine_steps=params.refine_steps
    )
    write_predictions(dataset.entry, half, out_star, rotmats=rotmats, confidence=confidence)


METHOD = Method(
    "image2sphere",
    "Image2Sphere (Klee et al. 2023; the CESPED paper's baseline): ResNet → hemisphere → "
    "S² and SO(3) convolutions → SO(3) grid classifier",
    "SO3",
    Params,
    train,
    predict,
    needs_preprocessing=True,
    uses_gpu=True,
)
