"""``random``: the floor — uniformly random rotations (the true shifts).

A seed per (entry, half) makes the two halves independent draws; the same seed gives the same
predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...geometry import random_rotations
from ...parameters import param
from ...predictions import true_origins, write_predictions
from .. import Method


@dataclass(frozen=True)
class Params:
    seed: int = param(0, "seed of the random rotations (mixed with the entry's name and the half)")


def train(entry, half, model_dir, params, work_dir=None):
    return None


def predict(model_dir, entry, half, out_star, params):
    gen = torch.Generator().manual_seed(params.seed * 1_000_003 + half * 7919 + sum(map(ord, entry.name)))
    write_predictions(
        entry,
        half,
        out_star,
        rotmats=random_rotations(entry.n_particles(half), generator=gen),
        shifts_angstrom=true_origins(entry, half),
    )


METHOD = Method("random", "floor: uniformly random rotations, true shifts", "SO3", Params, train, predict)
