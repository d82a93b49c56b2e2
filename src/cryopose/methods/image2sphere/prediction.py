"""Pose prediction with a trained Image2Sphere grid classifier.

The prediction of a particle is the rotation of the most probable grid cell; its probability is
the confidence (rlnParticleFigureOfMerit). For symmetric entries the probability of a view is
shared by its ``|G|`` mates, so confidences are comparable within an entry, not across groups.
Optionally the pose is refined off the grid by a local ascent of the network's own SO(3) signal.
"""

from __future__ import annotations

import numpy as np
import torch

from ...data import ParticlesDataset
from ...geometry import axis_turns

__all__ = ["predict_image2sphere", "bf16_autocast"]


def bf16_autocast(device: torch.device):
    """bf16 autocast on a GPU (the encoder's convolutions), a no-op on the CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_image2sphere(
    model,
    dataset: ParticlesDataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    refine_steps: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses and confidences of every particle of ``dataset``.

    Args:
        model: a trained :class:`~cryopose.models.Image2Sphere` (evaluation mode is set here).
        dataset: the half to predict, preprocessed as in training.
        refine_steps: rounds of local ascent of the SO(3) signal from the best grid cell, each
            trying turns of half the previous step (starting at half the grid spacing); 0: none.

    Returns:
        ``rotmats (N, 3, 3)`` float64 and ``confidence (N,)`` float64.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    model = model.to(device).eval()
    grid = model.grid.double().cpu()
    spacing = 360.0 / (6 * 2**model.config.output_order)
    n = len(dataset)
    rotmats = torch.empty(n, 3, 3, dtype=torch.float64)
    confidence = torch.empty(n, dtype=torch.float64)
    bar = tqdm(total=n, desc="predict", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        _, images, _, _ = dataset.get_batch(idx)
        with bf16_autocast(device):
            signal = model.signal(images.to(device))
        signal = signal.float()
        prob = torch.softmax(model.grid_logits(signal), dim=-1)
        best_p, best = prob.max(-1)
        pose = grid[best.cpu()]
        step = spacing / 2
        for _ in range(refine_steps):
            candidates = pose[:, None] @ axis_turns(step)[None]  # (B, 7, 3, 3): R·δ
            pick = model.logits_at(signal, candidates).argmax(-1).cpu()
            pose = candidates[torch.arange(len(idx)), pick]
            step /= 2
        rotmats[idx], confidence[idx] = pose, best_p.double().cpu()
        bar.update(len(idx))
    bar.close()
    return rotmats, confidence
