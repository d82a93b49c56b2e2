"""RELION particle STAR files: reading, checking, writing, and what their image names denote.

STAR files of RELION 3.1 (optics + particles blocks, origins in Å) and RELION 3.0 (one block,
origins in pixels, optics per particle) are read into one normalised RELION 3.1 form,
:class:`ParticleStar`, and always written back as RELION 3.1 (atomically), so the rest of
cryopose handles one form only. The image names (``<index>@<stack>``) are parsed and resolved
here too: :func:`particle_keys` is the one definition of "the same particle".

Errors in the input are :class:`~cryopose.errors.InputError` naming the file, the row (0-based)
or field, and what was expected.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..errors import InputError
from .atomic import atomic_write
from .mrc import stack_shape

__all__ = [
    "ParticleStar",
    "read_particles_star",
    "write_particles_star",
    "particles_with_optics",
    "parse_image_name",
    "resolve_stack_path",
    "with_absolute_image_names",
    "StackPathWarning",
    "StackNotFound",
    "particle_keys",
    "check_unique_particles",
    "OPTICS_COLUMNS",
    "FINITE_COLUMNS",
    "INT_COLUMNS",
]

#: Optics columns every optics group must have (rlnOpticsGroupName and rlnImageDimensionality are
#: filled in when missing).
OPTICS_COLUMNS = ("rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
#: Particle columns that must hold finite numbers when present; they are stored as float64.
FINITE_COLUMNS = (
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnOriginX",
    "rlnOriginY",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnMaxValueProbDistribution",
    "rlnParticleFigureOfMerit",
)
#: Integer-valued particle columns, stored as int64 when present.
INT_COLUMNS = ("rlnOpticsGroup", "rlnRandomSubset", "rlnClassNumber")
#: Per-particle optics of RELION 3.0 files, moved into the optics table on reading.
_RELION30_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
# ASCII classes spelt out rather than re.ASCII: pandas 3's string methods reject that flag.
_IMAGE_NAME_PATTERN = r"^[ \t\n\r\f\v]*([0-9]+)@([^ \t\n\r\f\v](?:.*[^ \t\n\r\f\v])?)[ \t\n\r\f\v]*$"
_IMAGE_NAME = re.compile(_IMAGE_NAME_PATTERN)


@dataclass
class ParticleStar:
    """A particle STAR file in RELION 3.1 form.

    ``optics``: one row per optics group: rlnOpticsGroup, rlnOpticsGroupName, rlnImagePixelSize (Å),
    rlnImageSize, rlnImageDimensionality, rlnVoltage (kV), rlnSphericalAberration (mm),
    rlnAmplitudeContrast, plus any other optics columns as read.
    ``particles``: one row per particle: rlnImageName, rlnOpticsGroup, and when present angles
    (degrees), origins rlnOriginX/YAngst (Å), defocus, confidences, ...; unknown columns kept as read.
    ``path``: the file it was read from, if any.
    """

    optics: pd.DataFrame
    particles: pd.DataFrame
    path: Path | None = None


def _read_blocks(path: Path) -> dict:
    if not path.is_file():
        raise InputError("STAR file not found", path=path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile/pandas raise assorted parser errors
        raise InputError(f"not a readable STAR file ({type(err).__name__}: {err})", path=path) from err
    if not blocks:
        raise InputError(
            "empty or unreadable: no data_ block found (expected RELION 3.1 data_optics + "
            "data_particles, or a RELION 3.0 data_ block)",
            path=path,
        )
    # starfile gives a dict for a block without loop_ (one row); make every block a table.
    tables = {
        name: (pd.DataFrame([b]) if isinstance(b, dict) else b).reset_index(drop=True) for name, b in blocks.items()
    }
    for name, table in tables.items():
        repeated = table.columns[table.columns.duplicated()].unique().tolist()
        if repeated:
            raise InputError(
                f"column {repeated[0]} appears more than once; each label may appear once per block",
                path=path,
                where=f"data_{name}",
            )
    return tables


def _numeric(
    df: pd.DataFrame,
    col: str,
    path: Path,
    block: str,
    *,
    finite: bool = True,
    integer: bool = False,
    positive: bool = False,
) -> np.ndarray:
    """Column ``col`` as float64, with an InputError naming the first offending row."""
    raw = df[col]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.ones(len(values), bool)
    expected = "a number"
    if finite:
        ok &= np.isfinite(values)
        expected = "a finite number"
    if integer:
        ok &= np.isfinite(values) & (np.round(values) == values)
        expected = "an integer"
    if positive:
        ok &= values > 0
        expected = f"a positive {expected.split(' ', 1)[1]}"
    bad = np.flatnonzero(~ok)
    if len(bad):
        more = f"; {len(bad)} such rows" if len(bad) > 1 else ""
        value = raw.iloc[bad[0]]
        shown = repr(value) if isinstance(value, str) else str(value)
        raise InputError(
            f"value {shown} is not {expected}{more}", path=path, where=f"{block} row {bad[0]} (0-based), column {col}"
        )
    return values


def _normalise_particle_columns(particles: pd.DataFrame, path: Path, block: str) -> None:
    """Check finiteness of known float columns and store them as float64; integer columns as int64."""
    for col in FINITE_COLUMNS:
        if col in particles.columns:
            particles[col] = _numeric(particles, col, path, block)
    for col in INT_COLUMNS:
        if col in particles.columns:
            particles[col] = _numeric(particles, col, path, block, integer=True).astype(np.int64)


def _check_image_names(particles: pd.DataFrame, path: Path, block: str) -> None:
    if "rlnImageName" not in particles.columns:
        raise InputError(
            "missing column: every particle needs rlnImageName (<index from 1>@<stack file>)",
            path=path,
            where=f"{block}, rlnImageName",
        )
    names = particles["rlnImageName"].astype(str)
    ok = names.str.match(_IMAGE_NAME_PATTERN).to_numpy(dtype=bool, na_value=False)
    if ok.all():
        ok = names.str.extract(_IMAGE_NAME_PATTERN)[0].astype(np.int64).to_numpy() >= 1
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise InputError(
            f"{names.iloc[row]!r} is not of the form <index from 1>@<stack file>",
            path=path,
            where=f"{block} row {row} (0-based), column rlnImageName",
        )


def _check_optics(optics: pd.DataFrame, path: Path) -> pd.DataFrame:
    block = "data_optics"
    for col in ("rlnOpticsGroup",) + OPTICS_COLUMNS:
        if col not in optics.columns:
            raise InputError(
                f"missing column; every optics group needs rlnOpticsGroup, {', '.join(OPTICS_COLUMNS)}",
                path=path,
                where=f"{block}, {col}",
            )
    if len(optics) == 0:
        raise InputError("no optics groups", path=path, where=block)
    optics = optics.copy()
    optics["rlnOpticsGroup"] = _numeric(optics, "rlnOpticsGroup", path, block, integer=True).astype(np.int64)
    dup = optics["rlnOpticsGroup"].duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise InputError(
            f"optics group {optics['rlnOpticsGroup'].iloc[row]} is defined twice",
            path=path,
            where=f"{block} row {row} (0-based), column rlnOpticsGroup",
        )
    optics["rlnImagePixelSize"] = _numeric(optics, "rlnImagePixelSize", path, block, positive=True)
    optics["rlnImageSize"] = _numeric(optics, "rlnImageSize", path, block, integer=True, positive=True).astype(np.int64)
    for col in _RELION30_OPTICS:
        optics[col] = _numeric(optics, col, path, block)
    if "rlnOpticsGroupName" not in optics.columns:
        optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]])
    if "rlnImageDimensionality" not in optics.columns:
        optics.insert(list(optics.columns).index("rlnImageSize") + 1, "rlnImageDimensionality", 2)
    return optics


def _pixel_size_relion30(df: pd.DataFrame, path: Path, block: str) -> np.ndarray:
    if "rlnImagePixelSize" in df.columns:
        return _numeric(df, "rlnImagePixelSize", path, block, positive=True)
    if "rlnPixelSize" in df.columns:
        return _numeric(df, "rlnPixelSize", path, block, positive=True)
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        return (
            _numeric(df, "rlnDetectorPixelSize", path, block, positive=True)
            * 1e4
            / _numeric(df, "rlnMagnification", path, block, positive=True)
        )
    raise InputError(
        "RELION 3.0 STAR without a pixel size: expected rlnImagePixelSize, rlnPixelSize, or "
        "rlnDetectorPixelSize (µm) and rlnMagnification",
        path=path,
        where=f"{block}, pixel size",
    )


def _from_relion30(df: pd.DataFrame, path: Path, block: str) -> ParticleStar:
    """One RELION 3.0 table → RELION 3.1 form: optics groups from the unique per-particle optics."""
    df = df.copy()
    _check_image_names(df, path, block)
    _normalise_particle_columns(df, path, block)
    px = _pixel_size_relion30(df, path, block)
    for col in _RELION30_OPTICS:
        if col not in df.columns:
            raise InputError(
                "missing column (a RELION 3.0 STAR file carries the optics per particle)",
                path=path,
                where=f"{block}, {col}",
            )
    if "rlnImageSize" in df.columns:
        sizes = _numeric(df, "rlnImageSize", path, block, integer=True, positive=True).astype(np.int64)
    else:  # not in the file: the first referenced stack's header says it
        _, stack = parse_image_name(str(df["rlnImageName"].iloc[0]), path, 0)
        sizes = np.full(len(df), stack_shape(resolve_stack_path(path, stack))[-1], dtype=np.int64)
    keys = pd.DataFrame(
        {
            "rlnImagePixelSize": px,
            "rlnImageSize": sizes,
            **{col: _numeric(df, col, path, block) for col in _RELION30_OPTICS},
        }
    )
    optics = keys.drop_duplicates().reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1, dtype=np.int64))
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]])
    optics.insert(4, "rlnImageDimensionality", 2)
    group = keys.merge(optics[["rlnOpticsGroup", *keys.columns]], how="left", on=list(keys.columns))[
        "rlnOpticsGroup"
    ].to_numpy(dtype=np.int64)
    for axis in ("X", "Y"):
        col = f"rlnOrigin{axis}"
        if col in df.columns:
            position = list(df.columns).index(col)
            values = df.pop(col).to_numpy(dtype=np.float64) * px
            if f"{col}Angst" not in df.columns:
                df.insert(position, f"{col}Angst", values)
    drop = [
        c
        for c in (
            *_RELION30_OPTICS,
            "rlnImagePixelSize",
            "rlnPixelSize",
            "rlnDetectorPixelSize",
            "rlnMagnification",
            "rlnImageSize",
            "rlnImageDimensionality",
        )
        if c in df.columns
    ]
    df = df.drop(columns=drop)
    if "rlnOpticsGroup" in df.columns:
        df["rlnOpticsGroup"] = group
    else:
        df.insert(list(df.columns).index("rlnImageName") + 1, "rlnOpticsGroup", group)
    return ParticleStar(optics=optics, particles=df.reset_index(drop=True), path=path)


def _from_relion31(optics: pd.DataFrame, particles: pd.DataFrame, path: Path) -> ParticleStar:
    block = "data_particles"
    optics = _check_optics(optics, path)
    particles = particles.copy()
    _check_image_names(particles, path, block)
    if "rlnOpticsGroup" not in particles.columns:
        raise InputError(
            "missing column (RELION 3.1 particles name their optics group)", path=path, where=f"{block}, rlnOpticsGroup"
        )
    _normalise_particle_columns(particles, path, block)
    known = particles["rlnOpticsGroup"].isin(optics["rlnOpticsGroup"]).to_numpy()
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        raise InputError(
            f"optics group {particles['rlnOpticsGroup'].iloc[row]} is not in data_optics "
            f"(it has {optics['rlnOpticsGroup'].tolist()})",
            path=path,
            where=f"{block} row {row} (0-based), column rlnOpticsGroup",
        )
    star = ParticleStar(optics=optics, particles=particles, path=path)
    for axis in ("X", "Y"):  # a 3.1 file with pixel origins (unusual) is converted too
        col = f"rlnOrigin{axis}"
        if col in particles.columns:
            px = particles_with_optics(star)["rlnImagePixelSize"].to_numpy(dtype=np.float64)
            position = list(particles.columns).index(col)
            values = particles.pop(col).to_numpy(dtype=np.float64) * px
            if f"{col}Angst" not in particles.columns:
                particles.insert(position, f"{col}Angst", values)
    return star


def read_particles_star(path: str | Path) -> ParticleStar:
    """Read a RELION 3.1 or 3.0 particle STAR file into RELION 3.1 form (see :class:`ParticleStar`).

    RELION 3.1: a ``data_optics`` and a ``data_particles`` block. RELION 3.0: one table with
    per-particle rlnVoltage/rlnSphericalAberration/rlnAmplitudeContrast, origins rlnOriginX/Y in
    pixels and the pixel size as rlnImagePixelSize, rlnPixelSize or rlnDetectorPixelSize (µm)
    × 1e4 / rlnMagnification; optics groups are made from the unique (pixel size, image size,
    voltage, Cs, amplitude contrast) combinations, origins are converted to Å, and a missing
    rlnImageSize is read from the first referenced stack's header.

    Raises:
        InputError: naming the file, block, row (0-based) and column, for an unreadable or empty
            file, a missing rlnImageName or optics column, a malformed rlnImageName, a non-finite
            angle/origin/defocus/confidence, or a particle whose optics group is not in the
            optics table.
    """
    path = Path(path)
    blocks = _read_blocks(path)
    if "optics" in blocks:
        if "particles" not in blocks:
            raise InputError(
                f"RELION 3.1 STAR with data_optics but no data_particles block (found "
                f"{', '.join('data_' + b for b in blocks)})",
                path=path,
            )
        star = _from_relion31(blocks["optics"], blocks["particles"], path)
    else:
        if len(blocks) != 1:
            raise InputError(
                f"expected one particle table (RELION 3.0) or data_optics + data_particles "
                f"(RELION 3.1), found {', '.join('data_' + b for b in blocks)}",
                path=path,
            )
        name, table = next(iter(blocks.items()))
        star = _from_relion30(table, path, f"data_{name}")
    if len(star.particles) == 0:
        raise InputError("no particles (the table has columns but no rows)", path=path, where="data_particles")
    return star


def write_particles_star(path: str | Path, star: ParticleStar) -> None:
    """Write ``star`` as a RELION 3.1 STAR file (``data_optics`` + ``data_particles``), atomically.

    Floats are written with the shortest representation that reads back to the same value, so a
    write/read round trip is exact.
    """
    with atomic_write(path) as tmp:
        starfile.write({"optics": star.optics, "particles": star.particles}, tmp, float_format=str)


def particles_with_optics(star: ParticleStar) -> pd.DataFrame:
    """The particle table (same index and order) with its optics group's columns added to each row.

    A column that the particle table already has (unusual) keeps the particle's own value.
    """
    table = star.particles.copy()
    optics = star.optics.set_index("rlnOpticsGroup")
    rows = optics.index.get_indexer(table["rlnOpticsGroup"])
    if (rows < 0).any():
        row = int(np.flatnonzero(rows < 0)[0])
        raise InputError(
            f"optics group {table['rlnOpticsGroup'].iloc[row]} is not in the optics table "
            f"(it has {optics.index.tolist()})",
            path=star.path,
            where=f"data_particles row {row} (0-based), column rlnOpticsGroup",
        )
    for col in optics.columns:
        if col not in table.columns:
            table[col] = optics[col].to_numpy()[rows]
    return table


def parse_image_name(name: str, path: str | Path | None = None, row: int | None = None) -> tuple[int, str]:
    """``"000012@path/particles_0.mrcs"`` → ``(11, "path/particles_0.mrcs")``.

    RELION's image indices count from 1; the returned index counts from 0. ``path`` and ``row``
    only serve the error message.
    """
    match = _IMAGE_NAME.match(str(name))
    if match is None or int(match.group(1)) < 1:
        where = "rlnImageName" if row is None else f"row {row} (0-based), column rlnImageName"
        raise InputError(f"{name!r} is not of the form <index from 1>@<stack file>", path=path, where=where)
    return int(match.group(1)) - 1, match.group(2)


class StackPathWarning(UserWarning):
    """A stack name was found relative to the STAR file's folder, not the working directory as
    RELION would look for it (so ``relion_*`` programs run from here would not find it)."""


class StackNotFound(InputError):
    """A stack named in a STAR file exists neither where RELION looks nor beside the STAR file."""


#: STAR files warned about in this process (one StackPathWarning per file).
_WARNED: set[str] = set()


def _is_entry_star(star_path: Path) -> bool:
    """An entry's STAR file (``particles_{h}.star`` with ``info_{h}.json`` beside it): its stack
    names are relative to the entry folder by the layout's definition (CESPED's), not RELION's."""
    match = re.fullmatch(r"particles_([01])\.star", star_path.name)
    return match is not None and (star_path.parent / f"info_{match.group(1)}.json").is_file()


def resolve_stack_path(star_path: str | Path, stack_rel: str | Path) -> Path:
    """The stack file that an image name of the STAR file ``star_path`` denotes, as an absolute path.

    The one rule of cryopose, used by every reader and both reconstruction backends (which pass
    RELION absolute names, so it runs anywhere). An absolute name is used as is. A relative one:

    * in **any particle STAR file**, as RELION resolves it: in the **working directory** (a
      refinement's ``run_data.star`` names ``Extract/job012/...`` relative to the project's
      root); only when it is not there, beside the STAR file, a fallback RELION would not make,
      announced once per file with a :class:`StackPathWarning`;
    * in **an entry's STAR file** (``particles_{h}.star`` with ``info_{h}.json`` beside it): beside
      it first, as CESPED's layout defines (so an entry reads the same from any folder, even from
      inside another entry holding stacks of the same names), then in the working directory.

    Raises:
        StackNotFound: naming both paths tried when neither exists.
    """
    star_path = Path(star_path)
    p = Path(stack_rel)
    if p.is_absolute():
        if p.is_file():
            return p
        raise StackNotFound(f"stack file {str(p)!r} not found", path=star_path, where="rlnImageName")
    in_cwd = Path.cwd() / p
    beside = star_path.parent.absolute() / p
    entry = _is_entry_star(star_path)
    for candidate in (beside, in_cwd) if entry else (in_cwd, beside):
        if candidate.is_file():
            break
    else:
        raise StackNotFound(
            f"stack file {str(stack_rel)!r} not found: tried {in_cwd} (working directory, as RELION) and "
            f"{beside} (beside the STAR file)",
            path=star_path,
            where="rlnImageName",
        )
    key = str(star_path.absolute())
    if candidate is beside and not entry and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"{star_path}: stack {str(stack_rel)!r} is not in the working directory {Path.cwd()} "
            f"(where RELION looks); found beside the STAR file instead ({beside}), and its other "
            "relative names are looked up the same way",
            StackPathWarning,
            stacklevel=2,
        )
    return candidate


def _stack_identity(star_path: str | Path | None, stack_rel: str) -> str:
    """The file a stack name in a STAR file denotes, as an absolute path with ``.``, ``..`` and
    symbolic links resolved. Looked up as :func:`resolve_stack_path` does; a stack that exists
    nowhere is taken beside the STAR file."""
    if star_path is None:
        return os.path.realpath(stack_rel)
    try:
        found = resolve_stack_path(star_path, stack_rel)
    except StackNotFound:  # missing: its identity is where the STAR file says it is
        found = Path(star_path).parent / stack_rel
    return os.path.realpath(found)


def with_absolute_image_names(star: ParticleStar, star_path: str | Path | None = None) -> ParticleStar:
    """A copy of ``star`` whose rlnImageName values name their stacks by absolute paths
    (resolved by :func:`resolve_stack_path` against ``star_path``, default ``star.path``), so the
    file can be read, by cryopose or by RELION, from any folder. Indices are written as RELION
    writes them (six digits)."""
    star_path = Path(star_path if star_path is not None else star.path or "particles.star")
    parts = star.particles.copy()
    located = [parse_image_name(n, star_path, r) for r, n in enumerate(parts["rlnImageName"].astype(str))]
    resolved = {stack: resolve_stack_path(star_path, stack) for stack in {s for _, s in located}}
    parts["rlnImageName"] = [f"{i + 1:06d}@{resolved[s]}" for i, s in located]
    return ParticleStar(star.optics.copy(), parts, star.path)


def particle_keys(names, star_path: str | Path | None = None) -> list[str]:
    """The identity of each particle image named in ``names`` (rlnImageName values of the STAR
    file ``star_path``): ``<index from 1>@<real path of the stack>``.

    This is the one definition of "the same particle" in cryopose, and it is RELION's: the index
    is a number (``000007@`` is ``7@``) and the stack is a file, however its path is spelt
    (``./stack.mrcs``, ``dir/../stack.mrcs``, an absolute path, a symbolic link). Relative names
    are resolved by :func:`resolve_stack_path` (working directory, then the STAR file's folder).

    Raises:
        InputError: for a name not of the form ``<index from 1>@<stack file>``, naming the row.
    """
    names = pd.Series(list(names), dtype=object).astype(str)
    parts = names.str.extract(_IMAGE_NAME_PATTERN)
    bad = parts[0].isna().to_numpy()
    if not bad.any():
        index = parts[0].astype(np.int64).to_numpy()
        bad = index < 1
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        parse_image_name(names.iloc[row], star_path, row)  # raises, naming the row
    where = {stack: _stack_identity(star_path, stack) for stack in parts[1].unique()}
    return [f"{i}@{where[stack]}" for i, stack in zip(index.tolist(), parts[1])]


def check_unique_particles(names, star_path: str | Path | None = None, block: str = "data_particles") -> list[str]:
    """:func:`particle_keys` of ``names``, after checking that no two rows name the same image.

    Raises:
        InputError: naming the STAR file, the later row and the earlier one with both spellings.
    """
    names = [str(n) for n in names]
    keys = particle_keys(names, star_path)
    first: dict[str, int] = {}
    for row, key in enumerate(keys):
        earlier = first.setdefault(key, row)
        if earlier != row:
            index, stack = key.split("@", 1)
            raise InputError(
                f"duplicate rlnImageName: {names[row]!r} names the same image as row {earlier} "
                f"({names[earlier]!r}), image {index} of {stack}; each particle may appear once",
                path=star_path,
                where=f"{block} row {row} (0-based), column rlnImageName",
            )
    return keys
