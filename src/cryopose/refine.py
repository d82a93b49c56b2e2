"""Local refinement of a method's predictions: the one ``+refine`` of the benchmark.

``<method>+refine`` is a method's cross-predictions refined locally — poses and shifts, by the
pattern search of :func:`cryopose.matching.refine_poses` — against the training half's map: half
``1 − h`` reconstructed from its true poses, the reference a practitioner would have (paper
Appendix F). The library (:func:`cryopose.methods.get_method`) and the workflow (rule
``refine_predictions`` → ``cryopose refine``) both run :func:`refine_predictions` against the
same reference, :func:`cryopose.reconstruct.write_half_map` of the training half (a regularised
map, not the evaluation's RELION-scheme ground truth; a test holds the two paths' poses equal).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import io
from .entry import Entry
from .matching import RefineConfig, check_reference, entry_particles, refine_poses
from .predictions import ORIGIN, load_predictions, write_predictions

__all__ = ["RefineConfig", "refine_predictions"]


def refine_predictions(
    entry: Entry,
    half: int,
    predictions_star: str | Path,
    reference_path: str | Path,
    out_star: str | Path,
    config: RefineConfig | None = None,
    progress: bool = True,
) -> Path:
    """Refine the predictions ``predictions_star`` of half ``half`` locally against the map
    ``reference_path`` (the entry's box and pixel size) and write them, with the refined origins,
    to ``out_star``. The confidence is the input's, 1 where it has none; predictions without
    origins start from the box centre. ``config``: the refinement's settings (default: its defaults)."""
    config = config or RefineConfig()
    dataset, images, ctf, n, px = entry_particles(entry, half)
    reference, ref_px = io.read_map(reference_path)
    check_reference(reference, ref_px, dataset.original_box_size, px, reference_path)
    table = io.read_particles_star(predictions_star).particles
    has_origins = set(ORIGIN) <= set(table.columns)
    pred = load_predictions(dataset.entry, half, predictions_star, "SO3xR2" if has_origins else "SO3")
    start = -pred.shifts / px if pred.shifts is not None else torch.zeros(n, 2, dtype=torch.float64)
    rot, shifts, _ = refine_poses(
        images, ctf, n, torch.from_numpy(reference), px, pred.rotmats, start, config, progress
    )
    conf = pred.confidence if pred.confidence is not None else torch.ones(n, dtype=torch.float64)
    return write_predictions(dataset.entry, half, out_star, rotmats=rot, confidence=conf, shifts_angstrom=-shifts * px)
