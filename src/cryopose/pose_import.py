"""Poses from the tools people use, as cryopose predictions of one half of an entry.

Three readers write the predictions file of one half of an entry
(:func:`cryopose.predictions.write_predictions`); each takes every particle of the half from the
source and refuses a source that lacks one (how many, and the first):

* :func:`import_relion_poses`: a RELION particle STAR file (3.0 or 3.1, e.g. a refinement's
  ``run_data.star``, any number of particles and halves). Each particle of the half is found by its
  image, named in any form RELION accepts (``7@x.mrcs`` and ``000007@./x.mrcs`` are one particle:
  :func:`cryopose.io.particle_keys`, with the names resolved by
  :func:`cryopose.io.resolve_stack_path`). The angles are copied, the origins (in Å; a 3.0 file's
  pixel origins are converted on reading) become the predicted shifts, and
  ``rlnMaxValueProbDistribution``, when present, the confidence.
* :func:`import_cryosparc_poses`: a cryoSPARC particle ``.cs`` file (read with cryosparc-tools).
  The pose is ``R = Rotation.from_rotvec(alignments3D/pose)`` (scipy; no transpose: the matrix of
  :func:`cryopose.geometry.euler_to_matrix`, and a zero vector is the identity), the origin in Å is
  ``alignments3D/shift · alignments3D/psize_A`` (same sign as rlnOriginX/YAngst). Particles are
  matched by ``blob/path`` and ``blob/idx`` (0-based) with :func:`match_stack_paths`.
* :func:`import_cryodrgn_poses`: a cryoDRGN pose pickle ``(rot, trans)`` or ``rot`` alone. The pose
  is ``R = rotᵀ`` per particle, the origin in Å is ``trans · D · apix`` (same sign; ``trans`` is a
  fraction of the box ``D`` of the stack the poses were parsed from, ``apix`` its pixel size).
  Rows follow the half's own STAR, or a STAR given as ``particles_star`` (matched by image name
  like the RELION reader).

The conventions are proven against cryoDRGN 4.3.1's own ``parse_pose_star`` and
``parse_pose_csparc`` by ``benchmarks/pose_conventions.py``.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from . import io
from .entry import Entry
from .errors import InputError
from .geometry import is_rotation_matrix
from .predictions import EULER, ORIGIN, write_predictions

__all__ = [
    "FORMATS",
    "format_of",
    "import_poses",
    "import_relion_poses",
    "import_cryosparc_poses",
    "import_cryodrgn_poses",
    "read_cryosparc_poses",
    "read_cryodrgn_poses",
    "match_stack_paths",
]

#: The source formats and the suffixes that name them.
FORMATS = {"relion": (".star",), "cryosparc": (".cs",), "cryodrgn": (".pkl", ".pickle")}

#: The fields of a cryoSPARC particle file that the reader needs.
CS_FIELDS = ("blob/path", "blob/idx", "alignments3D/pose", "alignments3D/shift")

#: cryoSPARC's import jobs link each stack as ``<uid>_<original name>`` (a long number).
_CS_UID_PREFIX = re.compile(r"^\d{6,}_")


def format_of(source: str | Path, fmt: str | None = None) -> str:
    """``fmt`` if given (one of :data:`FORMATS`), else the format the suffix of ``source`` names."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}", where="--format")
        return fmt
    suffix = Path(source).suffix.lower()
    for name, suffixes in FORMATS.items():
        if suffix in suffixes:
            return name
    raise InputError(
        f"cannot tell the format from the suffix {suffix!r}: expected .star (RELION), .cs (cryoSPARC) or "
        ".pkl/.pickle (cryoDRGN), or give --format relion|cryosparc|cryodrgn",
        path=source,
    )


def import_poses(
    entry: Entry,
    half: int,
    source: str | Path,
    out_star: str | Path,
    *,
    fmt: str | None = None,
    pixel_size: float | None = None,
    box_size: int | None = None,
    particles_star: str | Path | None = None,
) -> Path:
    """The reader of :func:`format_of` ``(source, fmt)``; options a format does not use are refused."""
    fmt = format_of(source, fmt)
    unused = {
        "relion": {"--pixel-size": pixel_size, "--box-size": box_size, "--particles": particles_star},
        "cryosparc": {"--box-size": box_size, "--particles": particles_star},
        "cryodrgn": {},
    }[fmt]
    given = [name for name, value in unused.items() if value is not None]
    if given:
        raise InputError(f"{', '.join(given)} do(es) not apply to a {fmt} source", path=source, where=given[0])
    if fmt == "relion":
        return import_relion_poses(entry, half, source, out_star)
    if fmt == "cryosparc":
        return import_cryosparc_poses(entry, half, source, out_star, pixel_size=pixel_size)
    return import_cryodrgn_poses(
        entry, half, source, out_star, box_size=box_size, pixel_size=pixel_size, particles_star=particles_star
    )


# ---------------------------------------------------------------------------------------------
# RELION
# ---------------------------------------------------------------------------------------------


def _rows_of_half(entry: Entry, half: int, source_keys: list[str], source: Path, where: str) -> np.ndarray:
    """For each particle of the half (row order), the source row that holds it.

    Raises:
        InputError: naming ``source`` and ``where``, for particles of the half it does not hold.
    """
    row_of = {key: row for row, key in enumerate(source_keys)}
    rows = [row_of.get(key) for key in entry.particle_keys(half)]
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        names = entry.read_star(half).particles["rlnImageName"].astype(str).tolist()
        raise InputError(
            f"{len(missing)} of the {len(rows)} particles of half {half} of entry {entry.name} are not in this file "
            f"(the first: {names[missing[0]]!r}); a source of poses must hold every particle of the half",
            path=source,
            where=where,
        )
    return np.asarray(rows, dtype=np.int64)


def _star_keys(star_path: Path):
    """The particle table of a STAR file and the identity of each of its rows (images named once)."""
    parts = io.read_particles_star(star_path).particles.reset_index(drop=True)
    if "rlnImageName" not in parts.columns:
        raise InputError("missing column rlnImageName: particles are matched by image", path=star_path)
    return parts, io.check_unique_particles(parts["rlnImageName"], star_path)


def import_relion_poses(entry: Entry, half: int, source_star: str | Path, out_star: str | Path) -> Path:
    """Write ``out_star``, the predictions of half ``half`` of ``entry`` taken from the RELION
    particle STAR file ``source_star`` (module docstring).

    Raises:
        InputError: naming the source file, for a missing pose column, an image named twice, or
            particles of the half that the source does not hold (how many, and the first one).
    """
    source_star = Path(source_star)
    source, keys = _star_keys(source_star)
    for col in EULER:
        if col not in source.columns:
            raise InputError(
                "missing pose column: a source of poses needs rlnAngleRot/Tilt/Psi", path=source_star, where=col
            )
    picked = source.iloc[_rows_of_half(entry, half, keys, source_star, "rlnImageName")]
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


# ---------------------------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------------------------


def _check_finite(values: np.ndarray, source: Path, where: str, what: str, hint: str = "") -> None:
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{int(bad.sum())} {what} are not finite (NaN or infinite; the first at row {row} (0-based): "
            f"{values[row].tolist()}){hint}",
            path=source,
            where=where,
        )


def _check_rotations(rotmats: np.ndarray, source: Path, where: str) -> None:
    ok = is_rotation_matrix(torch.from_numpy(rotmats)).numpy()
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise InputError(
            f"{int((~ok).sum())} of {len(rotmats)} matrices are not rotations (orthonormal, determinant +1, "
            f"within 1e-4; the first at row {row} (0-based): {np.round(rotmats[row], 6).tolist()}, "
            f"determinant {float(np.linalg.det(rotmats[row])):.6g})",
            path=source,
            where=where,
        )


def _positive(value: float | None, name: str, source: Path) -> None:
    if value is not None and not (np.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a positive number, got {value}", path=source, where=name)


# ---------------------------------------------------------------------------------------------
# cryoSPARC
# ---------------------------------------------------------------------------------------------


def match_stack_paths(entry: Entry, paths, source: str | Path, where: str = "blob/path") -> dict[str, str]:
    """The real path of the entry's stack that each stack path of a cryoSPARC file denotes
    (paths that denote none of the entry's stacks are left out).

    A path (a leading ``>``, cryoSPARC's mark of a project-relative path, is dropped) denotes the
    file it resolves to, tried as given (absolute), in the working directory, beside ``source``,
    and in the folder above it (a job's ``J12/`` sits in the project folder that its paths are
    relative to); when that is not one of the entry's stacks (moved files, another machine), the
    entry's stack of the same file name, or of the same name without cryoSPARC's import prefix
    ``<uid>_``, provided exactly one of the entry's stacks (both halves; names as the entry's STAR
    spells them or as they resolve) bears it.

    Raises:
        InputError: naming ``source``, when a file name is borne by several of the entry's stacks,
            or when two paths of the file fall on one stack of the entry by name.
    """
    source = Path(source)
    stacks: set[str] = set()
    by_name: dict[str, set[str]] = {}
    for h in entry.halves:
        names = entry.read_star(h).particles["rlnImageName"].astype(str)
        keys = entry.particle_keys(h)
        for name, key in zip(names, keys):
            real = key.split("@", 1)[1]
            if real not in stacks:
                stacks.add(real)
                by_name.setdefault(os.path.basename(real), set()).add(real)
            by_name.setdefault(os.path.basename(name.split("@", 1)[1]), set()).add(real)
    folders = [Path.cwd(), source.parent.absolute(), source.parent.absolute().parent]
    found: dict[str, str] = {}
    by_basename: dict[str, str] = {}
    for path in paths:
        bare = path[1:] if path.startswith(">") else path
        p = Path(bare)
        candidates = [p] if p.is_absolute() else [folder / p for folder in folders]
        real = next((os.path.realpath(c) for c in candidates if c.is_file()), None)
        if real in stacks:
            found[path] = real
            continue
        base = os.path.basename(bare)
        for name in (base, _CS_UID_PREFIX.sub("", base)):
            hits = by_name.get(name, set())
            if len(hits) > 1:
                raise InputError(
                    f"stack {path!r} is not one of the entry's files and its name {name!r} is borne by "
                    f"{len(hits)} stacks of entry {entry.name} ({', '.join(sorted(hits))}): cannot tell which; "
                    "run from the folder its paths are relative to",
                    path=source,
                    where=where,
                )
            if hits:
                (hit,) = hits
                if os.path.normpath(by_basename.setdefault(hit, bare)) != os.path.normpath(bare):
                    raise InputError(
                        f"stacks {by_basename[hit]!r} and {bare!r} both match {hit} of entry {entry.name} by "
                        "file name only: cannot tell which holds its particles; run from the folder the "
                        "paths are relative to",
                        path=source,
                        where=where,
                    )
                found[path] = hit
                break
    return found


def read_cryosparc_poses(source: str | Path, *, pixel_size: float | None = None):
    """The particles of a cryoSPARC ``.cs`` file: ``(paths, idx, rotmats, origins_A, psize)``.

    ``paths`` (the ``blob/path`` strings), ``idx`` (``blob/idx``, 0-based), ``rotmats``
    ``(N, 3, 3)`` = ``Rotation.from_rotvec(alignments3D/pose)`` (float64), ``origins_A`` ``(N, 2)`` =
    ``alignments3D/shift · psize`` where ``psize`` is ``pixel_size`` if given, else
    ``alignments3D/psize_A`` (per particle), else ``blob/psize_A``.

    Raises:
        InputError: an unreadable file, missing fields, non-finite poses or shifts, no pixel size.
    """
    from cryosparc.dataset import Dataset
    from scipy.spatial.transform import Rotation

    source = Path(source)
    _positive(pixel_size, "--pixel-size", source)
    try:
        ds = Dataset.load(source)
    except Exception as err:  # cryosparc-tools raises several types for a file that is not a dataset
        raise InputError(f"not a cryoSPARC dataset (.cs) file: {err}", path=source) from err
    missing = [f for f in CS_FIELDS if f not in ds]
    if missing:
        raise InputError(
            f"missing field(s) {', '.join(missing)}: a cryoSPARC particle file with 3D alignments (a refinement's "
            f"particles) holds {', '.join(CS_FIELDS)}",
            path=source,
            where=missing[0],
        )
    n = len(ds)
    paths = [p.decode() if isinstance(p, bytes) else str(p) for p in ds["blob/path"]]
    idx = np.asarray(ds["blob/idx"], dtype=np.int64)
    pose = np.asarray(ds["alignments3D/pose"], dtype=np.float64).reshape(n, -1)
    shift = np.asarray(ds["alignments3D/shift"], dtype=np.float64).reshape(n, -1)
    if pose.shape[1] != 3 or shift.shape[1] != 2:
        raise InputError(
            f"expected a rotation vector of 3 and a shift of 2 numbers per particle, got {pose.shape[1]} and "
            f"{shift.shape[1]}",
            path=source,
            where="alignments3D/pose" if pose.shape[1] != 3 else "alignments3D/shift",
        )
    _check_finite(pose, source, "alignments3D/pose", "rotation vectors")
    _check_finite(shift, source, "alignments3D/shift", "shifts")
    if pixel_size is not None:
        psize = np.full(n, float(pixel_size))
    else:
        field = next((f for f in ("alignments3D/psize_A", "blob/psize_A") if f in ds), None)
        if field is None:
            raise InputError(
                "no pixel size for the shifts (neither alignments3D/psize_A nor blob/psize_A): give --pixel-size",
                path=source,
                where="alignments3D/psize_A",
            )
        psize = np.asarray(ds[field], dtype=np.float64).reshape(n)
        bad = ~(np.isfinite(psize) & (psize > 0))
        if bad.any():
            raise InputError(
                f"{int(bad.sum())} pixel sizes are not positive (the first at row {int(np.flatnonzero(bad)[0])}): "
                "give --pixel-size",
                path=source,
                where=field,
            )
    # scipy's from_rotvec is exact at 0 (the identity), where a naive axis = v/|v| is NaN.
    rotmats = Rotation.from_rotvec(pose).as_matrix().reshape(n, 3, 3)
    return paths, idx, rotmats, shift * psize[:, None], psize


def import_cryosparc_poses(
    entry: Entry, half: int, source_cs: str | Path, out_star: str | Path, *, pixel_size: float | None = None
) -> Path:
    """Write ``out_star``, the predictions of half ``half`` of ``entry`` taken from the cryoSPARC
    particle file ``source_cs`` (module docstring; ``pixel_size`` overrides the file's
    ``alignments3D/psize_A``, the pixel size of the job's box in which the shifts are counted).

    Raises:
        InputError: naming the source file, for missing fields, non-finite values, an image named
            twice, ambiguous stack names, or particles of the half it does not hold.
    """
    source_cs = Path(source_cs)
    paths, idx, rotmats, origins, _ = read_cryosparc_poses(source_cs, pixel_size=pixel_size)
    real = match_stack_paths(entry, sorted(set(paths)), source_cs)
    keys = [f"{i + 1}@{real[p]}" if p in real else f"-@{p}" for i, p in zip(idx.tolist(), paths)]
    first: dict[str, int] = {}
    for row, key in enumerate(keys):
        earlier = first.setdefault(key, row)
        if earlier != row and not key.startswith("-@"):
            raise InputError(
                f"image {idx[row]} (0-based) of {paths[row]!r} at row {row} is the image of row {earlier} "
                f"({paths[earlier]!r}, image {idx[earlier]}): each particle may appear once",
                path=source_cs,
                where="blob/path, blob/idx",
            )
    rows = _rows_of_half(entry, half, keys, source_cs, "blob/path, blob/idx")
    return write_predictions(
        entry, half, out_star, rotmats=torch.from_numpy(rotmats[rows]), shifts_angstrom=origins[rows]
    )


# ---------------------------------------------------------------------------------------------
# cryoDRGN
# ---------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles tuples, lists and numpy arrays only: a pickle can run any code it names, and a
    pose file needs none."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a pose pickle holds numpy arrays only")


def read_cryodrgn_poses(source: str | Path, *, box_size: int, pixel_size: float):
    """``(rotmats, origins_A)`` of a cryoDRGN pose pickle: ``rotmats`` ``(N, 3, 3)`` = ``rotᵀ``
    (float64), ``origins_A`` ``(N, 2)`` = ``trans · box_size · pixel_size``, or ``None`` for a
    pickle holding the rotations only.

    Raises:
        InputError: not a pickle of numpy arrays, wrong shapes, non-finite values, non-rotations.
    """
    source = Path(source)
    try:
        with open(source, "rb") as f:
            obj = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise InputError(f"not a cryoDRGN pose pickle of numpy arrays: {err}", path=source) from err
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        rot, trans = obj
    elif isinstance(obj, (tuple, list)) and len(obj) == 1:
        rot, trans = obj[0], None
    else:
        rot, trans = obj, None
    try:
        rot = np.asarray(rot, dtype=np.float64)
        trans = None if trans is None else np.asarray(trans, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"expected (rot, trans) numpy arrays, got {type(obj).__name__}: {err}", path=source) from err
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(
            f"expected rotations of shape (N, 3, 3), got {tuple(rot.shape)} (a pickle holds (rot, trans) or rot)",
            path=source,
            where="rot",
        )
    hint = "; cryoDRGN's parse_pose_csparc writes NaN for a zero rotation vector (the identity)"
    _check_finite(rot, source, "rot", "rotation matrices", hint)
    rotmats = np.ascontiguousarray(rot.transpose(0, 2, 1))
    _check_rotations(rotmats, source, "rot")
    if trans is None:
        return rotmats, None
    if trans.shape != (len(rot), 2):
        raise InputError(
            f"expected shifts of shape ({len(rot)}, 2) (one per rotation, a fraction of the box), got "
            f"{tuple(trans.shape)}",
            path=source,
            where="trans",
        )
    _check_finite(trans, source, "trans", "shifts")
    return rotmats, trans * box_size * pixel_size


def import_cryodrgn_poses(
    entry: Entry,
    half: int,
    source_pkl: str | Path,
    out_star: str | Path,
    *,
    box_size: int | None = None,
    pixel_size: float | None = None,
    particles_star: str | Path | None = None,
) -> Path:
    """Write ``out_star``, the predictions of half ``half`` of ``entry`` taken from the cryoDRGN
    pose pickle ``source_pkl`` (module docstring).

    Args:
        box_size, pixel_size: of the stack the poses were parsed from (``trans`` is a fraction of
            its box); default the entry's.
        particles_star: the STAR file whose rows the pickle's rows follow (its particles are
            matched to the half's by image name); default the half's own STAR.

    Raises:
        InputError: naming the file, for a pickle that is not poses, non-rotations, a count of
            poses that is not the count of particles, or particles of the half the STAR lacks.
    """
    source_pkl = Path(source_pkl)
    _positive(box_size, "--box-size", source_pkl)
    _positive(pixel_size, "--pixel-size", source_pkl)
    box = int(box_size) if box_size is not None else entry.box_size
    apix = float(pixel_size) if pixel_size is not None else entry.pixel_size
    rotmats, origins = read_cryodrgn_poses(source_pkl, box_size=box, pixel_size=apix)
    if particles_star is None:
        n = entry.n_particles(half)
        if len(rotmats) != n:
            raise InputError(
                f"holds {len(rotmats)} poses but half {half} of entry {entry.name} has {n} particles: the rows of a "
                f"pickle follow the stack it was parsed from; give that STAR with --particles",
                path=source_pkl,
                where="rot",
            )
        rows = np.arange(n)
    else:
        particles_star = Path(particles_star)
        parts, keys = _star_keys(particles_star)
        if len(rotmats) != len(parts):
            raise InputError(
                f"holds {len(rotmats)} poses but {particles_star} (--particles), whose rows they follow, has "
                f"{len(parts)} particles",
                path=source_pkl,
                where="rot",
            )
        rows = _rows_of_half(entry, half, keys, particles_star, "rlnImageName")
    return write_predictions(
        entry,
        half,
        out_star,
        rotmats=torch.from_numpy(rotmats[rows]),
        shifts_angstrom=None if origins is None else origins[rows],
    )
