"""``projection_matching``: the classical anchor (the CESPED paper's eq. 1).

Its "model" is the reference: the training half reconstructed from its refined poses
(``model_dir/reference.mrc``). Each particle of the other half is matched against CTF-modulated
projections of it over an SO(3) grid and a grid of shifts, coarse to fine
(:func:`cryopose.matching.projection_match`); the confidence is the posterior's maximum.
"""

from __future__ import annotations

import torch

from ... import io
from ...matching import MatchingConfig, check_reference, entry_particles, projection_match
from ...predictions import write_predictions
from ...reconstruct import write_half_map
from .. import Method

#: The parameters are the search's settings.
Params = MatchingConfig


def train(entry, half, model_dir, params, work_dir=None):
    write_half_map(entry, half, model_dir / "reference.mrc")


def predict(model_dir, entry, half, out_star, params: MatchingConfig, progress: bool = True):
    reference_path = model_dir / "reference.mrc"
    dataset, images, ctf, n, px = entry_particles(entry, half)
    reference, ref_px = io.read_map(reference_path)
    check_reference(reference, ref_px, dataset.original_box_size, px, reference_path)
    rot, shifts, conf = projection_match(images, ctf, n, torch.from_numpy(reference), px, params, progress)
    write_predictions(dataset.entry, half, out_star, rotmats=rot, confidence=conf, shifts_angstrom=-shifts * px)


METHOD = Method(
    "projection_matching",
    "classical anchor (paper eq. 1): CTF-modulated projections of the training "
    "half's map over an SO(3) grid and shifts, coarse to fine",
    "SO3xR2",
    Params,
    train,
    predict,
    uses_gpu=True,
)
