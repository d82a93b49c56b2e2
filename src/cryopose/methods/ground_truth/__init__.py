"""``ground_truth``: the oracle that predicts the refined poses themselves.

Its paper metrics calibrate the top of the scale (ΔPCC and ΔFSCR of the paper are 0 only up to
the particles' shared noise; the cross-half agreement's Δ is exactly 0). Its model is only the
model record: there is nothing to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...predictions import EULER, true_origins, write_predictions
from .. import Method


@dataclass(frozen=True)
class Params:
    """No parameters."""


def train(entry, half, model_dir, params, work_dir=None):
    return None


def predict(model_dir, entry, half, out_star, params):
    truth = entry.read_star(half).particles
    write_predictions(
        entry, half, out_star, angles_deg=truth[EULER].to_numpy(), shifts_angstrom=true_origins(entry, half)
    )


METHOD = Method(
    "ground_truth", "oracle: predicts the refined poses (calibrates ΔPCC and ΔFSCR to 0)", "SO3", Params, train, predict
)
