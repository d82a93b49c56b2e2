"""The benchmark's judge: predictions checked against an entry's half, then scored.

This module holds the evaluation protocol (paper section 2.5, Appendix D). Predictions for a
half are a RELION STAR file whose particles are identified by rlnImageName, exactly as in the
entry's ``particles_{h}.star``; :func:`load_predictions` checks them against the entry and aligns
them row by row with the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import io
from .errors import InputError
from .geometry import euler_to_matrix

__all__ = ["Predictions", "load_predictions", "PREDICTION_TYPES"]

EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGIN = ["rlnOriginXAngst", "rlnOriginYAngst"]
PREDICTION_TYPES = ("S2", "SO3", "SO3xR2")


@dataclass
class Predictions:
    """Predictions of one half aligned with the entry's particle order.

    ``rotmats``: ``(N, 3, 3)`` predicted poses; ``shifts``: ``(N, 2)`` predicted origins in Å, or
    ``None`` when the predictions carry none (SO3); ``confidence``: ``(N,)``
    rlnParticleFigureOfMerit or ``None``; ``table``: the prediction rows in entry order.
    """

    rotmats: torch.Tensor
    shifts: torch.Tensor | None
    confidence: torch.Tensor | None
    table: pd.DataFrame


def load_predictions(entry: io.Entry, half: int, path: str | Path, prediction_type: str = "SO3") -> Predictions:
    """Read and check the predictions for ``half`` of ``entry``.

    Raises :class:`InputError` naming the file when: the type is unknown; ids (rlnImageName) are
    missing, repeated or unknown (with a specific message when they belong to the other half);
    angles are missing or not finite; SO3xR2 predictions lack finite origins; confidences are not
    finite or negative.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}",
                         where="prediction_type")
    path = Path(path)
    pred = io.read_particles_star(path).particles
    truth = entry.read_star(half).particles
    ids = pred["rlnImageName"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise InputError(f"{len(dup)} particle ids appear more than once, e.g. {dup.iloc[0]!r}", path=path,
                         where="rlnImageName")
    expected = truth["rlnImageName"].astype(str)
    unknown = sorted(set(ids) - set(expected))
    if unknown:
        other = set(entry.read_star(1 - half).particles["rlnImageName"].astype(str))
        if set(unknown) <= other:
            raise InputError(f"these are predictions for half {1 - half} (ids such as {unknown[0]!r}), "
                             f"not half {half}", path=path, where="rlnImageName")
        raise InputError(f"{len(unknown)} particle ids are not in half {half} of {entry.name}, e.g. {unknown[0]!r}",
                         path=path, where="rlnImageName")
    missing = expected[~expected.isin(set(ids))]
    if len(missing):
        raise InputError(f"{len(missing)} of the {len(expected)} particles of half {half} have no prediction, "
                         f"e.g. {missing.iloc[0]!r}", path=path, where="rlnImageName")
    for col in EULER:
        if col not in pred.columns:
            raise InputError("missing predicted angle column", path=path, where=col)
    aligned = pred.set_index(ids).loc[expected.to_numpy()].reset_index(drop=True)
    angles = aligned[EULER].to_numpy(dtype=np.float64)
    shifts = None
    if prediction_type == "SO3xR2":
        for col in ORIGIN:
            if col not in aligned.columns:
                raise InputError("SO3xR2 predictions need predicted origins", path=path, where=col)
        shifts = torch.tensor(aligned[ORIGIN].to_numpy(dtype=np.float64))
    confidence = None
    if "rlnParticleFigureOfMerit" in aligned.columns:
        conf = aligned["rlnParticleFigureOfMerit"].to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(conf) | (conf < 0))
        if len(bad):
            raise InputError(f"confidence {conf[bad[0]]} must be finite and >= 0", path=path,
                             where=f"particle {expected.iloc[bad[0]]}, rlnParticleFigureOfMerit")
        confidence = torch.tensor(conf)
    return Predictions(rotmats=euler_to_matrix(torch.tensor(angles)), shifts=shifts, confidence=confidence,
                       table=aligned)
