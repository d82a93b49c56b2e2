"""``svd_regressor``: a cryopose method from outside the cryopose package.

A small CNN regresses a 3×3 matrix per particle image; SVD orthogonalisation makes it the closest
rotation (Levinson et al. 2020, "An analysis of SVD for deep rotation estimation"). The loss is the
squared chordal distance ``||R̂ − g·R||²_F`` to the closest symmetry mate of the true pose R.
cryopose finds it through the entry point ``svd_regressor`` of the group ``cryopose.methods``
(this package's pyproject.toml).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cryopose.data import ParticlesDataset
from cryopose.methods import Method, Resources
from cryopose.parameters import param
from cryopose.predictions import write_predictions

__all__ = ["METHOD", "Params", "SVDPoseNet", "svd_rotation"]


def svd_rotation(m: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` matrices → the closest rotations ``U·diag(1, 1, det(U·Vᵀ))·Vᵀ``."""
    u, _, vh = torch.linalg.svd(m)
    d = torch.det(u @ vh)
    fix = torch.ones_like(m[..., 0])
    fix[..., 2] = d
    return u @ torch.diag_embed(fix) @ vh


class SVDPoseNet(nn.Module):
    """``(B, 1, S, S)`` images → ``(B, 3, 3)`` rotations."""

    def __init__(self, width: int):
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, 9)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return svd_rotation(self.head(self.features(images)).view(-1, 3, 3))


@dataclass(frozen=True)
class Params:
    image_size: int = param(32, "images are resized to this many pixels", min=16)
    width: int = param(8, "channels of the first convolution (doubled twice)", min=1)
    epochs: int = param(4, "passes over the training half", min=1)
    batch_size: int = param(32, "images per step", min=1)
    lr: float = param(2e-3, "Adam learning rate", above=0)
    seed: int = param(0, "random seed (initialisation and batch order)", min=0)


def train(entry, half, model_dir, params: Params, work_dir=None):
    torch.manual_seed(params.seed)
    data = ParticlesDataset(entry, half, image_size=params.image_size)
    net = SVDPoseNet(params.width)
    optimiser = torch.optim.Adam(net.parameters(), lr=params.lr)
    loss = torch.zeros(())
    for epoch in range(params.epochs):
        order = torch.randperm(len(data))
        for start in range(0, len(data), params.batch_size):
            batch = order[start : start + params.batch_size].tolist()
            _, images, (rotmats, _, _), _ = data.get_batch(batch)
            mates = data.symmetry_mates(rotmats.double()).float()  # (B, G, 3, 3)
            pred = net(images)
            loss = ((pred[:, None] - mates) ** 2).sum((-1, -2)).min(1).values.mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        print(f"epoch {epoch + 1}/{params.epochs}: last batch chordal² {loss.item():.3f}", flush=True)
    torch.save(net.state_dict(), model_dir / "weights.pt")
    (model_dir / "params.json").write_text(json.dumps(asdict(params)))
    return {"final_loss": float(loss)}


def predict(model_dir, entry, half, out_star, params: Params):
    saved = Params(**json.loads((model_dir / "params.json").read_text()))
    net = SVDPoseNet(saved.width)
    net.load_state_dict(torch.load(model_dir / "weights.pt", weights_only=True))
    net.eval()
    data = ParticlesDataset(entry, half, image_size=saved.image_size)
    rotmats = []
    with torch.no_grad():
        for start in range(0, len(data), 256):
            _, images, _, _ = data.get_batch(list(range(start, min(len(data), start + 256))))
            rotmats.append(net(images).double())
    write_predictions(entry, half, out_star, rotmats=torch.cat(rotmats))


def resources(method, params):
    return {"train": Resources(mem_mb=4000, runtime_min=240), "predict": Resources(mem_mb=4000, runtime_min=60)}


METHOD = Method(
    "svd_regressor",
    "a CNN regressing rotations through SVD orthogonalisation (example plugin package)",
    "SO3",
    Params,
    train,
    predict,
    resources=resources,
)
