"""Pose prediction with a trained grid classifier, and the predictions STAR.

The prediction of a particle is the rotation of the most probable grid cell; its probability is
the confidence (rlnParticleFigureOfMerit). For symmetric entries the probability of a view is
shared by its ``|G|`` mates, so confidences are comparable within an entry, not across groups.
Optionally the pose is refined off the grid by a local ascent of the network's own SO(3) signal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import io
from .data import ParticlesDataset
from .geometry import axis_turns as local_offsets
from .geometry import matrix_to_euler

__all__ = ["predict_image2sphere", "write_predictions_star", "local_offsets", "bf16_autocast"]

EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGIN = ["rlnOriginXAngst", "rlnOriginYAngst"]


def bf16_autocast(device: torch.device):
    """bf16 autocast on a GPU (the encoder's convolutions), a no-op on the CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_image2sphere(model, dataset: ParticlesDataset, batch_size: int = 64, device: torch.device | str = "cpu",
                         refine_steps: int = 0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
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
    spacing = 360.0 / (6 * 2 ** model.config.output_order)
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
            candidates = pose[:, None] @ local_offsets(step)[None]  # (B, 7, 3, 3): R·δ
            pick = model.logits_at(signal, candidates).argmax(-1).cpu()
            pose = candidates[torch.arange(len(idx)), pick]
            step /= 2
        rotmats[idx], confidence[idx] = pose, best_p.double().cpu()
        bar.update(len(idx))
    bar.close()
    return rotmats, confidence


def write_predictions_star(dataset: ParticlesDataset, rotmats: torch.Tensor, confidence: torch.Tensor,
                           out_star: str | Path, shifts_angstrom: torch.Tensor | None = None) -> None:
    """The predictions STAR of ``dataset``'s half: its particle rows with the predicted angles,
    origins (zero unless ``shifts_angstrom`` is given) and rlnParticleFigureOfMerit.

    Particles are named as in the source entry: a preprocessed copy's rlnImageOriginalName
    becomes rlnImageName again, so the evaluator can match them to the ground truth.
    """
    star = dataset.entry.read_star(dataset.halfset)
    parts = star.particles.copy().reset_index(drop=True)
    if "rlnImageOriginalName" in parts.columns:
        parts["rlnImageName"] = parts.pop("rlnImageOriginalName")
    parts[EULER] = matrix_to_euler(torch.as_tensor(rotmats, dtype=torch.float64)).numpy()
    shifts = np.zeros((len(parts), 2)) if shifts_angstrom is None else np.asarray(shifts_angstrom, dtype=np.float64)
    parts[ORIGIN] = shifts
    parts["rlnParticleFigureOfMerit"] = np.asarray(confidence, dtype=np.float64)
    io.write_particles_star(Path(out_star), io.ParticleStar(star.optics.copy(), parts))
