"""The predictions format: what a method writes for a half, and how the judge reads it back.

A method's predictions for half ``h`` of an entry are a RELION 3.1 STAR file holding that half's
particle rows, named by ``rlnImageName`` exactly as the entry names them, with

* the predicted pose in ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi`` (degrees, RELION's ZYZ
  convention: :func:`cryopose.geometry.euler_to_matrix`);
* the predicted origin in ``rlnOriginXAngst``, ``rlnOriginYAngst`` (Å; read only for ``SO3xR2``
  predictions; RELION's sign: a particle displaced by +s px needs an origin of −s·pixel size);
* optionally a confidence ``≥ 0`` in ``rlnParticleFigureOfMerit`` (the evaluation weights the
  reconstruction by it; 1 where a method has none).

Every other column (CTF, optics) is the entry's. :func:`write_predictions` is the one writer (every
method, the sensitivity experiment's perturbed truth, the refinement); :func:`load_predictions` the
one reader, which checks a file against the entry and aligns it row by row with the ground truth.
This module is below the methods and the judge: both import it, it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from . import io
from .errors import InputError
from .geometry import euler_to_matrix, is_rotation_matrix, matrix_to_euler

if TYPE_CHECKING:  # the entry module is only a type here
    from .entry import Entry

__all__ = [
    "EULER",
    "ORIGIN",
    "CONFIDENCE",
    "PREDICTION_TYPES",
    "Predictions",
    "write_predictions",
    "load_predictions",
    "true_origins",
]

#: The pose angle columns, degrees (rot, tilt, psi: ZYZ).
EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
#: The origin columns, Å.
ORIGIN = ["rlnOriginXAngst", "rlnOriginYAngst"]
#: The confidence column (weights the evaluation's reconstruction with ``--fom_weighting``).
CONFIDENCE = "rlnParticleFigureOfMerit"
#: What a method predicts: S2 (rot, tilt: the viewing direction), SO3 (all three angles) or
#: SO3xR2 (the angles and the origin).
PREDICTION_TYPES = ("S2", "SO3", "SO3xR2")


def true_origins(entry: Entry, half: int) -> np.ndarray | None:
    """``(N, 2)`` the entry's own origins of ``half`` in Å (the oracles predict them), or ``None``
    when its STAR has none."""
    parts = entry.read_star(half).particles
    return parts[ORIGIN].to_numpy(dtype=np.float64) if set(ORIGIN) <= set(parts.columns) else None


def write_predictions(
    entry: Entry,
    half: int,
    out_star: str | Path,
    *,
    rotmats: torch.Tensor | None = None,
    angles_deg: np.ndarray | None = None,
    shifts_angstrom=None,
    confidence=None,
) -> Path:
    """Write the predictions STAR of half ``half`` of ``entry`` (atomically).

    Args:
        entry: the entry predicted (a preprocessed copy too: its ``rlnImageOriginalName`` becomes
            ``rlnImageName`` again, so the judge matches the rows to the source entry's particles).
        rotmats: ``(N, 3, 3)`` predicted rotations in the entry's particle order; or
        angles_deg: ``(N, 3)`` predicted rot, tilt, psi in degrees (exactly one of the two).
        shifts_angstrom: ``(N, 2)`` predicted origins in Å; ``None`` writes 0 (a method that
            predicts no shifts; the judge reads origins only from SO3xR2 predictions).
        confidence: ``(N,)`` values ``≥ 0``; ``None`` writes 1.
    """
    if (rotmats is None) == (angles_deg is None):
        raise ValueError("give either rotmats or angles_deg")
    star = entry.read_star(half)
    parts = star.particles.copy().reset_index(drop=True)
    if "rlnImageOriginalName" in parts.columns:
        parts["rlnImageName"] = parts.pop("rlnImageOriginalName")
    if rotmats is not None:
        rotmats = torch.as_tensor(rotmats, dtype=torch.float64)
        if rotmats.shape != (len(parts), 3, 3) or not is_rotation_matrix(rotmats).all():
            # A reflection or a non-orthonormal matrix would become some other angles, silently.
            raise ValueError(
                f"rotmats must be {len(parts)} rotation matrices (3×3, orthonormal, det +1), one per "
                f"particle of half {half}; got shape {tuple(rotmats.shape)}"
            )
        angles_deg = matrix_to_euler(rotmats).numpy()
    parts[EULER] = np.asarray(angles_deg, dtype=np.float64)
    parts[ORIGIN] = (
        np.zeros((len(parts), 2)) if shifts_angstrom is None else np.asarray(shifts_angstrom, dtype=np.float64)
    )
    parts[CONFIDENCE] = 1.0 if confidence is None else np.asarray(confidence, dtype=np.float64)
    io.write_particles_star(Path(out_star), io.ParticleStar(star.optics.copy(), parts))
    return Path(out_star)


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


def load_predictions(
    entry: Entry, half: int, path: str | Path, prediction_type: str = "SO3", use_confidence: bool = True
) -> Predictions:
    """Read and check the predictions for ``half`` of ``entry``.

    Raises :class:`InputError` naming the file when: the type is unknown; ids (rlnImageName) are
    missing, repeated or unknown (with a specific message when they belong to the other half);
    angles are missing or not finite; SO3xR2 predictions lack finite origins; confidences are not
    finite or negative. With ``use_confidence`` False the confidence column is not read
    (``confidence`` is ``None``), so a column the evaluation ignores cannot stop it.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}", where="prediction_type"
        )
    path = Path(path)
    pred = io.read_particles_star(path).particles
    truth = entry.read_star(half).particles
    # Particles are matched by identity (io.particle_keys), not by spelling: "7@./particles_0.mrcs"
    # is the entry's "000007@particles_0.mrcs". Prediction names are the entry's, so relative
    # stack names are resolved against the entry's folder.
    ids = pd.Series(io.particle_keys(pred["rlnImageName"], entry.star_path(half)), index=pred.index)
    names = pred["rlnImageName"].astype(str)
    dup = names[ids.duplicated()]
    if len(dup):
        raise InputError(
            f"{len(dup)} particle ids appear more than once, e.g. {dup.iloc[0]!r}", path=path, where="rlnImageName"
        )
    expected = truth["rlnImageName"].astype(str)
    expected_ids = pd.Series(entry.particle_keys(half), index=expected.index)
    unknown_rows = ~ids.isin(set(expected_ids))
    if unknown_rows.any():
        unknown = sorted(names[unknown_rows])
        if ids[unknown_rows].isin(set(entry.particle_keys(1 - half))).all():
            raise InputError(
                f"these are predictions for half {1 - half} (ids such as {unknown[0]!r}), not half {half}",
                path=path,
                where="rlnImageName",
            )
        raise InputError(
            f"{len(unknown)} particle ids are not in half {half} of {entry.name}, e.g. {unknown[0]!r}",
            path=path,
            where="rlnImageName",
        )
    missing = expected[~expected_ids.isin(set(ids))]
    if len(missing):
        raise InputError(
            f"{len(missing)} of the {len(expected)} particles of half {half} have no prediction, "
            f"e.g. {missing.iloc[0]!r}",
            path=path,
            where="rlnImageName",
        )
    for col in EULER:
        if col not in pred.columns:
            raise InputError("missing predicted angle column", path=path, where=col)
    aligned = pred.set_index(ids.to_numpy()).loc[expected_ids.to_numpy()].reset_index(drop=True)
    angles = aligned[EULER].to_numpy(dtype=np.float64)
    needed = 2 if prediction_type == "S2" else 3
    bad = np.flatnonzero(~np.isfinite(angles[:, :needed]).all(axis=1))
    if len(bad):
        raise InputError(
            "predicted angle is NaN or infinite",
            path=path,
            where=f"particle {expected.iloc[bad[0]]}, {', '.join(EULER[:needed])}",
        )
    shifts = None
    if prediction_type == "SO3xR2":
        for col in ORIGIN:
            if col not in aligned.columns:
                raise InputError("SO3xR2 predictions need predicted origins", path=path, where=col)
        bad = np.flatnonzero(~np.isfinite(aligned[ORIGIN].to_numpy(dtype=np.float64)).all(axis=1))
        if len(bad):
            raise InputError(
                "predicted origin is not finite",
                path=path,
                where=f"particle {expected.iloc[bad[0]]}, rlnOriginXAngst/rlnOriginYAngst",
            )
        shifts = torch.tensor(aligned[ORIGIN].to_numpy(dtype=np.float64))
    confidence = None
    if use_confidence and "rlnParticleFigureOfMerit" in aligned.columns:
        conf = aligned["rlnParticleFigureOfMerit"].to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(conf) | (conf < 0))
        if len(bad):
            raise InputError(
                f"confidence {conf[bad[0]]}: expected finite values >= 0, not all 0 (to ignore "
                f"the column, evaluate with --no-pred-confidence)",
                path=path,
                where=f"particle {expected.iloc[bad[0]]}, rlnParticleFigureOfMerit",
            )
        confidence = torch.tensor(conf)
    return Predictions(
        rotmats=euler_to_matrix(torch.tensor(angles)), shifts=shifts, confidence=confidence, table=aligned
    )
