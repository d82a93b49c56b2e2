"""Poses from the tools people use, as cryopose predictions of one half of an entry.

:func:`import_relion_poses` reads a RELION particle STAR file (3.0 or 3.1, e.g. a refinement's
``run_data.star``, any number of particles and halves) and writes the predictions file of one
half of an entry (:func:`cryopose.predictions.write_predictions`): each particle of the half is
found in the source by its image, named in any form RELION accepts (``7@x.mrcs`` and
``000007@./x.mrcs`` are one particle: :func:`cryopose.io.particle_keys`, with the names resolved
by :func:`cryopose.io.resolve_stack_path`). The angles are copied, the origins (in Å; a 3.0
file's pixel origins are converted on reading) become the predicted shifts, and
``rlnMaxValueProbDistribution``, when present, the confidence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import io
from .entry import Entry
from .errors import InputError
from .predictions import EULER, ORIGIN, write_predictions

__all__ = ["import_relion_poses"]


def import_relion_poses(entry: Entry, half: int, source_star: str | Path, out_star: str | Path) -> Path:
    """Write ``out_star``, the predictions of half ``half`` of ``entry`` taken from the RELION
    particle STAR file ``source_star`` (module docstring).

    Raises:
        InputError: naming the source file, for a missing pose column, an image named twice, or
            particles of the half that the source does not hold (how many, and the first one).
    """
    source_star = Path(source_star)
    source = io.read_particles_star(source_star).particles.reset_index(drop=True)
    for col in EULER:
        if col not in source.columns:
            raise InputError(
                "missing pose column: a source of poses needs rlnAngleRot/Tilt/Psi", path=source_star, where=col
            )
    row_of = {key: row for row, key in enumerate(io.check_unique_particles(source["rlnImageName"], source_star))}
    names = entry.read_star(half).particles["rlnImageName"].astype(str).tolist()
    rows = [row_of.get(key) for key in entry.particle_keys(half)]
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        raise InputError(
            f"{len(missing)} of the {len(rows)} particles of half {half} of entry {entry.name} are not in this file "
            f"(the first: {names[missing[0]]!r}); a source of poses must hold every particle of the half",
            path=source_star,
            where="rlnImageName",
        )
    picked = source.iloc[np.asarray(rows)]
    shifts = np.stack([picked[c].to_numpy(np.float64) if c in picked else np.zeros(len(picked)) for c in ORIGIN], 1)
    confidence = (
        picked["rlnMaxValueProbDistribution"].to_numpy(np.float64)
        if "rlnMaxValueProbDistribution" in picked.columns
        else None
    )
    return write_predictions(
        entry,
        half,
        out_star,
        angles_deg=picked[EULER].to_numpy(np.float64),
        shifts_angstrom=shifts,
        confidence=confidence,
    )
