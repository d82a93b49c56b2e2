"""Reading and writing RELION STAR files, MRC stacks and maps, and benchmark entries.

STAR files of RELION 3.1 (optics + particles blocks, origins in Å) and RELION 3.0 (one block,
origins in pixels, optics per particle) are read into one normalised RELION 3.1 form,
:class:`ParticleStar`, and always written back as RELION 3.1. Stacks are opened as memory maps
(a real half is 20–47 GB) and read in contiguous runs. Every writer writes to a temporary name in
the destination folder and renames it into place, so a crash never leaves a half-written file
under the final name.

Errors in the input are :class:`~cryopose.errors.InputError` naming the file, the row (0-based)
or field, and what was expected.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Iterator

import mrcfile
import mrcfile.utils
import numpy as np
import pandas as pd
import starfile

from .errors import InputError
from .interrupt import uninterrupted

__all__ = [
    "atomic_write", "atomic_writes", "staged_folder", "temporary_folder", "is_temporary", "WriteError", "ParticleStar", "read_particles_star",
    "write_particles_star", "particles_with_optics", "parse_image_name", "particle_keys", "check_unique_particles",
    "resolve_stack_path", "open_stack",
    "stack_shape", "read_images", "StackWriter", "read_map", "write_map", "Entry",
]

#: Optics columns every optics group must have (rlnOpticsGroupName and rlnImageDimensionality are
#: filled in when missing).
OPTICS_COLUMNS = ("rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration",
                  "rlnAmplitudeContrast")
#: Particle columns that must hold finite numbers when present; they are stored as float64.
FINITE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                  "rlnOriginX", "rlnOriginY", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                  "rlnMaxValueProbDistribution", "rlnParticleFigureOfMerit")
#: Integer-valued particle columns, stored as int64 when present.
INT_COLUMNS = ("rlnOpticsGroup", "rlnRandomSubset", "rlnClassNumber")
#: Per-particle optics of RELION 3.0 files, moved into the optics table on reading.
_RELION30_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
# ASCII classes spelt out rather than re.ASCII: pandas 3's string methods reject that flag.
_IMAGE_NAME_PATTERN = r"^[ \t\n\r\f\v]*([0-9]+)@([^ \t\n\r\f\v](?:.*[^ \t\n\r\f\v])?)[ \t\n\r\f\v]*$"
_IMAGE_NAME = re.compile(_IMAGE_NAME_PATTERN)


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class WriteError(OSError):
    """A write that failed for lack of space, reported with the destination it was meant for."""

    def __str__(self) -> str:
        return str(self.strerror)


def _write_error(err: OSError, what, kept: str) -> WriteError:
    """The lack-of-space error ``err`` as one message: what could not be written, why, what was kept."""
    return WriteError(err.errno, f"could not write {what}: {os.strerror(err.errno)}; {kept}")


# Temporaries: hidden, next to their destination, and named after it and after the process that
# made them (".<name>.tmp-<pid>-h<host>-<random>"), so that a later writer of the same destination
# recognises the leftovers of a process that died without cleaning up (SIGKILL, a power cut) and
# removes them. A process is taken for dead only on this host (a shared file system may hold the
# temporaries of a live process on another node) and when its pid is gone or now belongs to a
# process started after the temporary was last touched (pid reuse).
# The host tag is a 64-bit hash: with a short one, two nodes of a large cluster sharing a file
# system would take each other's live temporaries for a dead local process's.
_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=8).hexdigest()
_TEMPORARY_TAIL = r"\.(tmp|old)-([0-9]+)-(?:h([0-9a-f]{16})-)?[0-9a-f]{8}"  # the host tag is absent in older names


def _temporary_name(base: str, kind: str = "tmp", suffix: str = "") -> str:
    return f".{base}.{kind}-{os.getpid()}-h{_HOST}-{secrets.token_hex(4)}{suffix}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a file or folder name that cryopose's writers give their temporaries."""
    return re.search(_TEMPORARY_TAIL, name) is not None and name.startswith(".")


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; ``None`` if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, touched: float) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    started = _process_start(pid)
    # A 2 s margin: /proc's boot time is whole seconds and the clocks may have been stepped.
    return started is None or started <= touched + 2.0


def _remove_stale_temporaries(folder: Path, base: str, suffix: str = "") -> None:
    """Remove the temporaries that dead processes left for the destination ``folder/base+suffix``.

    A staged folder's ``.old-`` copy left by a process killed in the middle of its swap is put
    back when the destination is missing (the earlier output is restored, not lost)."""
    # One tail, or several: a writer writing into another's temporary (write_map into a file of
    # atomic_writes) makes "..name.tmp-<pid>-...tmp-<pid>-....mrc".
    pattern = re.compile(rf"^\.+{re.escape(base)}((?:{_TEMPORARY_TAIL})+){re.escape(suffix)}$")
    try:
        entries = [(e, re.findall(_TEMPORARY_TAIL, m.group(1))) for e in os.scandir(folder)
                   if (m := pattern.match(e.name))]
    except OSError:
        return
    for e, owners in sorted(entries, key=lambda item: item[1][0][0]):  # "old" before "tmp"
        kind = owners[0][0]
        if any(host and host != _HOST for _, _, host in owners):
            continue
        try:
            touched = e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if any(_owner_alive(int(pid), touched) for _, pid, _ in owners):
            continue
        path = Path(e.path)
        if e.is_dir(follow_symlinks=False):
            kept = path / base
            target = folder / base
            if kind == "old" and kept.exists() and not target.exists() and not target.is_symlink():
                with contextlib.suppress(OSError):
                    os.replace(kept, target)
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _make_temporary_folder(parent: Path, base: str, kind: str = "tmp") -> Path:
    """A new hidden folder ``parent/.base.<kind>-...``, made by os.mkdir: its permissions follow the
    umask like any folder's (mkdtemp's 0700 would survive the rename into place)."""
    while True:
        path = parent / _temporary_name(base, kind)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it to ``path`` only if the body succeeds.

    The temporary name is hidden and keeps the suffix (``.particles_0.tmp-<pid>-h<host>-<hex>.star``)
    so libraries that look at the suffix behave. On success the file is fsync'ed and renamed over
    ``path`` with :func:`os.replace` (atomic on one file system). On any exception (SIGTERM
    included, see :mod:`cryopose.interrupt`) the temporary file is removed and an existing
    ``path`` is left untouched; temporaries of ``path`` that a killed process left are removed
    first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent, path.stem, path.suffix)
    tmp = path.with_name(_temporary_name(path.stem, "tmp", path.suffix))
    try:
        try:
            yield tmp
        except OSError as err:
            if err.errno in _NO_SPACE and not isinstance(err, WriteError):
                raise _write_error(err, path, f"the partial file was removed and the previous {path.name} (if any) "
                                              f"is unchanged") from err
            raise
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_write: the block wrote nothing to {tmp} (destination {path})")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible everywhere
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writes(paths) -> Iterator[dict[str, Path]]:
    """:func:`atomic_write` for a group of files: yields ``{name: temporary path}`` (keyed by file
    name); nothing is renamed until the body has written them all, then they are renamed in
    reverse order of ``paths`` (the first is renamed last: put the file that marks completion
    first), with SIGTERM held back until the last rename so the group is never split. On any
    exception every temporary file is removed and no destination changes."""
    paths = [Path(p) for p in paths]
    if len({p.name for p in paths}) != len(paths):
        raise ValueError(f"atomic_writes: file names must be distinct, got {[p.name for p in paths]}")
    with contextlib.ExitStack() as guard:  # exits after the renames below
        with contextlib.ExitStack() as stack:
            temporaries = {p.name: stack.enter_context(atomic_write(p)) for p in paths}
            try:
                yield temporaries
            except OSError as err:
                if err.errno in _NO_SPACE:
                    names = ", ".join(p.name for p in paths)
                    raise _write_error(err, f"{names} in {paths[0].parent}", "no file there was changed") from err
                raise
            guard.enter_context(uninterrupted())


@contextlib.contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``target``; on success it replaces ``target`` (an existing
    folder is moved aside first and deleted after the swap), on any exception (SIGTERM included)
    it is deleted and ``target`` stays as it was. For outputs made of several files that must
    change together. The swap is not cut short by SIGTERM; the staging folders of a killed
    process are removed (and a target it had moved aside put back) by the next call."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target.parent, target.name)
    work = _make_temporary_folder(target.parent, target.name, "tmp")
    try:
        yield work
        old = None
        try:
            with uninterrupted():
                if target.exists():
                    old = _make_temporary_folder(target.parent, target.name, "old")
                    os.replace(target, old / target.name)
                try:
                    os.replace(work, target)
                except BaseException:
                    if old is not None:
                        os.replace(old / target.name, target)
                    raise
        finally:
            # Outside the held section: deleting a large old copy (a preprocessed entry) takes long
            # enough for a scheduler to follow SIGTERM with SIGKILL; cut short, the next writer
            # removes what is left.
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(work, ignore_errors=True)
        if err.errno in _NO_SPACE:
            raise _write_error(err, target, f"the partial copy was removed and the earlier {target.name} (if any) "
                                            f"is unchanged") from err
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@contextlib.contextmanager
def temporary_folder(parent: str | Path, base: str) -> Iterator[Path]:
    """A hidden scratch folder ``parent/.base.tmp-...`` for the duration of the block, deleted on
    any exit (SIGTERM included); scratch folders of ``base`` that a killed process left in
    ``parent`` are removed first. Put it next to the output it serves, not in the system temp
    folder, so that it is on the same disk and found by the next run."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent, base)
    work = _make_temporary_folder(parent, base, "tmp")
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# STAR
# ----------------------------------------------------------------------------------------------

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
        raise InputError("empty or unreadable: no data_ block found (expected RELION 3.1 data_optics + "
                         "data_particles, or a RELION 3.0 data_ block)", path=path)
    # starfile gives a dict for a block without loop_ (one row); make every block a table.
    tables = {name: (pd.DataFrame([b]) if isinstance(b, dict) else b).reset_index(drop=True)
              for name, b in blocks.items()}
    for name, table in tables.items():
        repeated = table.columns[table.columns.duplicated()].unique().tolist()
        if repeated:
            raise InputError(f"column {repeated[0]} appears more than once; each label may appear once per block",
                             path=path, where=f"data_{name}")
    return tables


def _numeric(df: pd.DataFrame, col: str, path: Path, block: str, *, finite: bool = True,
             integer: bool = False, positive: bool = False) -> np.ndarray:
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
        raise InputError(f"value {shown} is not {expected}{more}", path=path,
                         where=f"{block} row {bad[0]} (0-based), column {col}")
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
        raise InputError("missing column: every particle needs rlnImageName (<index from 1>@<stack file>)",
                         path=path, where=f"{block}, rlnImageName")
    names = particles["rlnImageName"].astype(str)
    ok = names.str.match(_IMAGE_NAME_PATTERN).to_numpy(dtype=bool, na_value=False)
    if ok.all():
        ok = names.str.extract(_IMAGE_NAME_PATTERN)[0].astype(np.int64).to_numpy() >= 1
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise InputError(f"{names.iloc[row]!r} is not of the form <index from 1>@<stack file>", path=path,
                         where=f"{block} row {row} (0-based), column rlnImageName")


def _check_optics(optics: pd.DataFrame, path: Path) -> pd.DataFrame:
    block = "data_optics"
    for col in ("rlnOpticsGroup",) + OPTICS_COLUMNS:
        if col not in optics.columns:
            raise InputError(f"missing column; every optics group needs rlnOpticsGroup, {', '.join(OPTICS_COLUMNS)}",
                             path=path, where=f"{block}, {col}")
    if len(optics) == 0:
        raise InputError("no optics groups", path=path, where=block)
    optics = optics.copy()
    optics["rlnOpticsGroup"] = _numeric(optics, "rlnOpticsGroup", path, block, integer=True).astype(np.int64)
    dup = optics["rlnOpticsGroup"].duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise InputError(f"optics group {optics['rlnOpticsGroup'].iloc[row]} is defined twice", path=path,
                         where=f"{block} row {row} (0-based), column rlnOpticsGroup")
    optics["rlnImagePixelSize"] = _numeric(optics, "rlnImagePixelSize", path, block, positive=True)
    optics["rlnImageSize"] = _numeric(optics, "rlnImageSize", path, block, integer=True,
                                      positive=True).astype(np.int64)
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
        return (_numeric(df, "rlnDetectorPixelSize", path, block, positive=True) * 1e4
                / _numeric(df, "rlnMagnification", path, block, positive=True))
    raise InputError("RELION 3.0 STAR without a pixel size: expected rlnImagePixelSize, rlnPixelSize, or "
                     "rlnDetectorPixelSize (µm) and rlnMagnification", path=path, where=f"{block}, pixel size")


def _from_relion30(df: pd.DataFrame, path: Path, block: str) -> ParticleStar:
    """One RELION 3.0 table → RELION 3.1 form: optics groups from the unique per-particle optics."""
    df = df.copy()
    _check_image_names(df, path, block)
    _normalise_particle_columns(df, path, block)
    px = _pixel_size_relion30(df, path, block)
    for col in _RELION30_OPTICS:
        if col not in df.columns:
            raise InputError("missing column (a RELION 3.0 STAR file carries the optics per particle)",
                             path=path, where=f"{block}, {col}")
    if "rlnImageSize" in df.columns:
        sizes = _numeric(df, "rlnImageSize", path, block, integer=True, positive=True).astype(np.int64)
    else:  # not in the file: the first referenced stack's header says it
        _, stack = parse_image_name(str(df["rlnImageName"].iloc[0]), path, 0)
        sizes = np.full(len(df), stack_shape(resolve_stack_path(path, stack))[-1], dtype=np.int64)
    keys = pd.DataFrame({
        "rlnImagePixelSize": px, "rlnImageSize": sizes,
        **{col: _numeric(df, col, path, block) for col in _RELION30_OPTICS},
    })
    optics = keys.drop_duplicates().reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1, dtype=np.int64))
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]])
    optics.insert(4, "rlnImageDimensionality", 2)
    group = keys.merge(optics[["rlnOpticsGroup", *keys.columns]], how="left",
                       on=list(keys.columns))["rlnOpticsGroup"].to_numpy(dtype=np.int64)
    for axis in ("X", "Y"):
        col = f"rlnOrigin{axis}"
        if col in df.columns:
            position = list(df.columns).index(col)
            values = df.pop(col).to_numpy(dtype=np.float64) * px
            if f"{col}Angst" not in df.columns:
                df.insert(position, f"{col}Angst", values)
    drop = [c for c in (*_RELION30_OPTICS, "rlnImagePixelSize", "rlnPixelSize", "rlnDetectorPixelSize",
                        "rlnMagnification", "rlnImageSize", "rlnImageDimensionality") if c in df.columns]
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
        raise InputError("missing column (RELION 3.1 particles name their optics group)", path=path,
                         where=f"{block}, rlnOpticsGroup")
    _normalise_particle_columns(particles, path, block)
    known = particles["rlnOpticsGroup"].isin(optics["rlnOpticsGroup"]).to_numpy()
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        raise InputError(f"optics group {particles['rlnOpticsGroup'].iloc[row]} is not in data_optics "
                         f"(it has {optics['rlnOpticsGroup'].tolist()})", path=path,
                         where=f"{block} row {row} (0-based), column rlnOpticsGroup")
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
            raise InputError(f"RELION 3.1 STAR with data_optics but no data_particles block (found "
                             f"{', '.join('data_' + b for b in blocks)})", path=path)
        star = _from_relion31(blocks["optics"], blocks["particles"], path)
    else:
        if len(blocks) != 1:
            raise InputError(f"expected one particle table (RELION 3.0) or data_optics + data_particles "
                             f"(RELION 3.1), found {', '.join('data_' + b for b in blocks)}", path=path)
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
        raise InputError(f"optics group {table['rlnOpticsGroup'].iloc[row]} is not in the optics table "
                         f"(it has {optics.index.tolist()})", path=star.path,
                         where=f"data_particles row {row} (0-based), column rlnOpticsGroup")
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


def resolve_stack_path(star_path: str | Path, stack_rel: str | Path) -> Path:
    """Where a stack named in a STAR file lives.

    RELION resolves relative names against the working directory; CESPED entries name stacks
    relative to the STAR file's folder. The STAR file's folder is tried first, then the working
    directory; an absolute name is used as is.

    Raises:
        InputError: naming both paths tried when neither exists.
    """
    p = Path(stack_rel)
    if p.is_absolute():
        if p.is_file():
            return p
        raise InputError(f"stack file {str(p)!r} not found", path=star_path, where="rlnImageName")
    beside = Path(star_path).parent / p
    if beside.is_file():
        return beside
    if p.is_file():
        return p
    raise InputError(f"stack file {str(stack_rel)!r} not found: tried {beside} (beside the STAR file) and "
                     f"{Path.cwd() / p} (working directory)", path=star_path, where="rlnImageName")


def _stack_identity(star_path: str | Path | None, stack_rel: str) -> str:
    """The file a stack name in a STAR file denotes, as an absolute path with ``.``, ``..`` and
    symbolic links resolved. Looked up as :func:`resolve_stack_path` does (beside the STAR file,
    then the working directory); a stack that exists nowhere is taken beside the STAR file."""
    if star_path is None:
        return os.path.realpath(stack_rel)
    try:
        found = resolve_stack_path(star_path, stack_rel)
    except InputError:  # missing: its identity is where the STAR file says it is
        found = Path(star_path).parent / stack_rel
    return os.path.realpath(found)


def particle_keys(names, star_path: str | Path | None = None) -> list[str]:
    """The identity of each particle image named in ``names`` (rlnImageName values of the STAR
    file ``star_path``): ``<index from 1>@<real path of the stack>``.

    This is the one definition of "the same particle" in cryopose, and it is RELION's: the index
    is a number (``000007@`` is ``7@``) and the stack is a file, however its path is spelt
    (``./stack.mrcs``, ``dir/../stack.mrcs``, an absolute path, a symbolic link). Relative names
    are resolved against the STAR file's folder (see :func:`resolve_stack_path`).

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
            raise InputError(f"duplicate rlnImageName: {names[row]!r} names the same image as row {earlier} "
                             f"({names[earlier]!r}), image {index} of {stack}; each particle may appear once",
                             path=star_path, where=f"{block} row {row} (0-based), column rlnImageName")
    return keys


# ----------------------------------------------------------------------------------------------
# MRC
# ----------------------------------------------------------------------------------------------

_COMPLEX_MRC_MODES = {3: "complex int16", 4: "complex float32"}


def _mrc_layout(path: Path) -> tuple[tuple[int, ...], int]:
    """Data shape and the byte count the header promises; checks the header and the file size."""
    if not path.is_file():
        raise InputError("MRC file not found", path=path)
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
            header = mrc.header.copy()
    except Exception as err:  # mrcfile raises ValueError/OSError/EOFError for bad headers
        raise InputError(f"not a valid MRC file ({type(err).__name__}: {err})", path=path) from err
    # Every stack and map is opened through here. Complex data (Fourier transforms) would be cast
    # to real when read, dropping the imaginary part with no more than a numpy warning: refused.
    mode = int(header.mode)
    if mode in _COMPLEX_MRC_MODES:
        raise InputError(f"MRC mode {mode} holds complex values ({_COMPLEX_MRC_MODES[mode]}); real-valued "
                         f"images or maps expected (mode 0, 1, 2, 6 or 12)", path=path, where="header mode")
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except Exception as err:
        raise InputError(f"not a valid MRC file ({type(err).__name__}: {err})", path=path) from err
    dims = (int(header.nz), int(header.ny), int(header.nx))
    if min(dims) < 1:
        raise InputError(f"invalid MRC header: dimensions nz, ny, nx = {dims}", path=path)
    shape = mrcfile.utils.data_shape_from_header(header)
    expected = int(header.nbytes) + int(header.nsymbt) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"truncated MRC file: the header promises {' x '.join(map(str, dims))} values of "
                         f"{dtype.name} (expected {expected} bytes) but the file has {actual} bytes", path=path)
    return tuple(int(s) for s in shape), expected


def open_stack(path: str | Path):
    """Open an MRC stack read-only as a memory map; no image is read until it is indexed.

    Returns the :func:`mrcfile.mmap` object (``.data`` is a :class:`numpy.memmap`); close it when done.

    Raises:
        InputError: for a missing file, an invalid header, or a file shorter than its header
            promises (naming the expected and actual byte counts).
    """
    path = Path(path)
    _mrc_layout(path)
    try:
        return mrcfile.mmap(path, mode="r", permissive=False)
    except Exception as err:
        raise InputError(f"cannot memory-map the MRC file ({type(err).__name__}: {err})", path=path) from err


def stack_shape(path: str | Path) -> tuple[int, int, int]:
    """``(n, ny, nx)`` of an MRC stack from its header (a single 2D image gives ``n = 1``).

    The header and the file size are checked as in :func:`open_stack`; no data is read.
    """
    path = Path(path)
    shape, _ = _mrc_layout(path)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3:
        raise InputError(f"expected an image stack, got data of shape {shape}", path=path)
    return shape


def _stack_name(stack) -> str | None:
    return getattr(getattr(stack, "_iostream", None), "name", None)


def read_images(stack, indices) -> np.ndarray:
    """Images ``indices`` (0-based, any order, repeats allowed) of an open stack, as float32.

    The sorted unique indices are read in contiguous runs, one slice of the memory map each, so a
    batch of neighbouring particles costs one read and the stack is never loaded whole.

    Args:
        stack: an object from :func:`open_stack` (or anything with a ``.data`` array, or an array).
        indices: integer indices.

    Returns:
        ``(len(indices), S, S)`` float32, in the requested order.

    Raises:
        InputError: for an index outside the stack, naming the index and the stack length.
    """
    data = getattr(stack, "data", stack)
    if data.ndim == 2:
        data = data[None]
    idx = np.asarray(indices).reshape(-1)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"read_images: indices must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64)
    n = data.shape[0]
    outside = (idx < 0) | (idx >= n)
    if outside.any():
        bad = int(idx[outside][0])
        raise InputError(f"image index {bad} (0-based) is outside the stack of {n} images (valid: 0 to {n - 1})",
                         path=_stack_name(stack))
    uniq, inverse = np.unique(idx, return_inverse=True)
    out = np.empty((len(uniq),) + data.shape[1:], dtype=np.float32)
    if len(uniq):
        starts = np.concatenate([[0], np.flatnonzero(np.diff(uniq) != 1) + 1])
        ends = np.concatenate([starts[1:], [len(uniq)]])
        for a, b in zip(starts, ends):
            out[a:b] = data[uniq[a]:uniq[a] + (b - a)]
    return out[inverse.reshape(-1)]


class StackWriter:
    """Write an MRC image stack of known size batch by batch, through a memory map, atomically.

    ::

        with StackWriter(path, n_images, box_size, pixel_size) as w:
            w.write(0, images[:256])
            w.write(256, images[256:])

    The file is made with :func:`mrcfile.new_mmap` under a temporary name; on a clean exit the
    pixel size (voxel size) and the header statistics (accumulated while writing) are set and the
    file is renamed to ``path``. Every image must have been written by then (else ValueError). On
    an exception the temporary file is removed and nothing appears at ``path``.
    """

    def __init__(self, path: str | Path, n_images: int, box_size: int, pixel_size: float, dtype=np.float32):
        self.path = Path(path)
        if int(n_images) < 1 or int(box_size) < 1:
            raise ValueError(f"StackWriter: need n_images >= 1 and box_size >= 1, got {n_images}, {box_size}")
        if not (np.isfinite(pixel_size) and pixel_size > 0):
            raise ValueError(f"StackWriter: pixel_size must be positive, got {pixel_size}")
        self.shape = (int(n_images), int(box_size), int(box_size))
        self.pixel_size = float(pixel_size)
        self.dtype = np.dtype(dtype)
        self.mode = mrcfile.utils.mode_from_dtype(self.dtype)  # ValueError for a dtype MRC cannot store
        self._ctx = None
        self._mrc = None
        self._written = np.zeros(self.shape[0], bool)
        self._overlap = False
        self._stats = [np.inf, -np.inf, 0.0, 0.0]  # min, max, sum, sum of squares

    def __enter__(self) -> "StackWriter":
        self._ctx = atomic_write(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._mrc = mrcfile.new_mmap(tmp, shape=self.shape, mrc_mode=self.mode, overwrite=True)
            # The new file is sparse: on a full disk a store into the memory map kills the process
            # with SIGBUS. Reserving its blocks now turns that into an ENOSPC error before any work.
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            finally:
                os.close(fd)
            self._mrc.set_image_stack()
            self._mrc.voxel_size = self.pixel_size
        except BaseException:
            self._close_quietly()
            self._ctx.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        """Store ``images`` (``(k, S, S)``) as images ``start`` .. ``start + k - 1`` (0-based)."""
        if self._mrc is None:
            raise RuntimeError("StackWriter.write outside its with-block")
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        start = int(start)
        if images.shape[1:] != self.shape[1:] or start < 0 or start + len(images) > self.shape[0]:
            raise ValueError(f"StackWriter.write: images of shape {images.shape} at index {start} do not fit "
                             f"the stack {self.shape} ({self.path})")
        if len(images) == 0:
            return
        images = images.astype(self.dtype, copy=False)
        lo, hi = images.min(), images.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"StackWriter.write: non-finite values in images {start}..{start + len(images) - 1} "
                             f"({self.path})")
        self._mrc.data[start:start + len(images)] = images
        if self._written[start:start + len(images)].any():
            self._overlap = True  # statistics are recomputed from the file at the end
        self._written[start:start + len(images)] = True
        s = self._stats
        wide = images.astype(np.float64)
        s[0], s[1] = min(s[0], float(lo)), max(s[1], float(hi))
        s[2] += float(wide.sum())
        s[3] += float(np.square(wide).sum())

    def _close_quietly(self) -> None:
        if self._mrc is not None:
            with contextlib.suppress(Exception):
                self._mrc.close()
            self._mrc = None

    def _recompute_stats(self) -> None:
        data = self._mrc.data
        s = [np.inf, -np.inf, 0.0, 0.0]
        for a in range(0, self.shape[0], 1024):
            chunk = np.asarray(data[a:a + 1024], dtype=np.float64)
            s = [min(s[0], chunk.min()), max(s[1], chunk.max()), s[2] + chunk.sum(), s[3] + np.square(chunk).sum()]
        self._stats = s

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._close_quietly()
            return self._ctx.__exit__(exc_type, exc, tb)
        try:
            missing = np.flatnonzero(~self._written)
            if len(missing):
                raise ValueError(f"StackWriter: {len(missing)} of {self.shape[0]} images were never written "
                                 f"(first: index {missing[0]}); {self.path} not created")
            if self._overlap:
                self._recompute_stats()
            lo, hi, total, sq = self._stats
            count = float(np.prod(self.shape))
            mean = total / count
            header = self._mrc.header
            header.dmin, header.dmax, header.dmean = lo, hi, mean
            header.rms = np.sqrt(max(sq / count - mean * mean, 0.0))
            self._mrc.flush()
            self._mrc.close()
            self._mrc = None
        except BaseException:
            self._close_quietly()
            self._ctx.__exit__(*sys.exc_info())
            raise
        return self._ctx.__exit__(None, None, None)


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """A cubic 3D map as float32 ``(D, D, D)`` indexed ``[z, y, x]``, and its pixel size in Å.

    The pixel size is the header's voxel size (x); it is 0.0 when the header does not set one.
    """
    path = Path(path)
    shape, _ = _mrc_layout(path)
    if len(shape) != 3 or len(set(shape)) != 1:
        raise InputError(f"expected a cubic 3D map, got data of shape {shape}", path=path)
    try:
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            return np.array(mrc.data, dtype=np.float32), float(mrc.voxel_size.x)
    except Exception as err:
        raise InputError(f"not a readable MRC map ({type(err).__name__}: {err})", path=path) from err


def write_map(path: str | Path, volume: np.ndarray, pixel_size: float) -> None:
    """Write a 3D map (``[z, y, x]``) as float32 with its pixel size (the voxel size), atomically."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"write_map: expected a 3D volume, got shape {volume.shape}")
    with atomic_write(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = float(pixel_size)


# ----------------------------------------------------------------------------------------------
# Entries
# ----------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """A benchmark entry on disk, in CESPED's Zenodo layout::

        <root>/particles_{h}.star   particles_{h}.mrcs   info_{h}.json     (h = 0, 1)
        <root>/<name>_mask.mrc
        <root>/<name>_source_map.mrc   (simulated entries only: the true density)

    ``name`` is the folder's name. STAR files are read once and cached.
    """

    root: Path
    halves: ClassVar[tuple[int, int]] = (0, 1)
    _stars: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise InputError("entry folder not found", path=self.root)

    @classmethod
    def from_benchmark(cls, benchmark_dir: str | Path, name: str) -> "Entry":
        """The entry ``name`` of the benchmark folder ``benchmark_dir``."""
        root = Path(benchmark_dir) / str(name)
        if not root.is_dir():
            have = sorted(p.name for p in Path(benchmark_dir).iterdir() if p.is_dir()) \
                if Path(benchmark_dir).is_dir() else []
            raise InputError(f"no entry {name!r} in the benchmark folder (it has: {', '.join(have) or 'nothing'})",
                             path=root)
        return cls(root)

    @property
    def name(self) -> str:
        # "." (also "./", "g/.") has the empty name and "g/.." the name "..": the folder's real name
        # is the entry's, or a copy would be written to "<out>/" itself and replace every entry there.
        if self.root.name in ("", ".."):
            return self.root.resolve().name
        return self.root.name

    def _half(self, h) -> int:
        if isinstance(h, (bool, np.bool_)) or not isinstance(h, (int, np.integer)) or int(h) not in (0, 1):
            raise InputError(f"half must be 0 or 1, got {h!r}", path=self.root, where="half")
        return int(h)

    def star_path(self, h: int) -> Path:
        return self.root / f"particles_{self._half(h)}.star"

    def stack_path(self, h: int) -> Path:
        return self.root / f"particles_{self._half(h)}.mrcs"

    def info_path(self, h: int) -> Path:
        return self.root / f"info_{self._half(h)}.json"

    @property
    def mask_path(self) -> Path:
        return self.root / f"{self.name}_mask.mrc"

    @property
    def ground_truth_map_path(self) -> Path:
        """The true density of a simulated entry (real entries have none)."""
        return self.root / f"{self.name}_source_map.mrc"

    def read_star(self, h: int) -> ParticleStar:
        h = self._half(h)
        if h not in self._stars:
            self._stars[h] = read_particles_star(self.star_path(h))
        return self._stars[h]

    def _info(self, h: int) -> dict:
        path = self.info_path(h)
        if not path.is_file():
            raise InputError('info file not found (expected {"symmetry": "C1"} or similar)', path=path)
        try:
            info = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"not valid JSON ({err})", path=path) from err
        if not isinstance(info, dict) or "symmetry" not in info:
            raise InputError('expected a JSON object with a "symmetry" key', path=path, where="symmetry")
        return info

    @cached_property
    def symmetry(self) -> str:
        """The point-group symmetry from info_0.json / info_1.json (they must agree), normalised."""
        from .symmetry import parse_symmetry

        syms = []
        for h in self.halves:
            try:
                syms.append(parse_symmetry(str(self._info(h)["symmetry"])))
            except InputError as err:
                if err.path is None:
                    raise InputError(err.problem, path=self.info_path(h), where="symmetry") from err
                raise
        if syms[0] != syms[1]:
            raise InputError(f"the halves disagree on the symmetry: {syms[0]} (info_0.json) vs {syms[1]} "
                             "(info_1.json)", path=self.root, where="symmetry")
        return syms[0]

    def _optics_value(self, column: str) -> float:
        values = {}
        for h in self.halves:
            vals = np.unique(self.read_star(h).optics[column].to_numpy(dtype=np.float64))
            if len(vals) != 1:
                raise InputError(f"optics groups disagree on {column}: {vals.tolist()} (an entry needs one value)",
                                 path=self.star_path(h), where=f"data_optics, column {column}")
            values[h] = float(vals[0])
        if abs(values[0] - values[1]) > 1e-6 * max(abs(values[0]), 1.0):
            raise InputError(f"the halves disagree on {column}: {values[0]} (particles_0.star) vs {values[1]} "
                             "(particles_1.star)", path=self.root, where=column)
        return values[0]

    @property
    def pixel_size(self) -> float:
        """Å per pixel, from rlnImagePixelSize (one value for all optics groups of both halves)."""
        return self._optics_value("rlnImagePixelSize")

    @property
    def box_size(self) -> int:
        """Image side in pixels, from rlnImageSize (one value for all optics groups of both halves)."""
        return int(self._optics_value("rlnImageSize"))

    def n_particles(self, h: int) -> int:
        return len(self.read_star(h).particles)

    def particle_keys(self, h: int) -> list[str]:
        """The identity of each particle of half ``h`` (:func:`particle_keys`), in row order."""
        h = self._half(h)
        return particle_keys(self.read_star(h).particles["rlnImageName"], self.star_path(h))

    def check_independent_halves(self) -> None:
        """No image appears twice in a half, no half uses the other half's stack or images: the
        halves must be independent, or cross-prediction (train on one, predict the other) is void."""
        keys, names = {}, {}
        for h in self.halves:
            names[h] = self.read_star(h).particles["rlnImageName"].astype(str).tolist()
            keys[h] = check_unique_particles(names[h], self.star_path(h))
        for h in self.halves:
            other = 1 - h
            other_stack = os.path.realpath(self.stack_path(other))
            for row, key in enumerate(keys[h]):
                if key.split("@", 1)[1] == other_stack:
                    raise InputError(f"{names[h][row]!r} is an image of {self.stack_path(other).name}, the stack of "
                                     f"half {other}: the halves must be independent (each particle in one half only)",
                                     path=self.star_path(h), where=f"data_particles row {row} (0-based), column "
                                                                   "rlnImageName")
        row_of = {key: row for row, key in enumerate(keys[0])}
        for row, key in enumerate(keys[1]):
            if key in row_of:
                raise InputError(f"{names[1][row]!r} is also particle {names[0][row_of[key]]!r} of half 0 (row "
                                 f"{row_of[key]} of {self.star_path(0).name}): the halves must be independent "
                                 "(each particle in one half only)", path=self.star_path(1),
                                 where=f"data_particles row {row} (0-based), column rlnImageName")

    def validate(self) -> None:
        """Check that the entry's files exist and agree; raise :class:`InputError` naming the problem.

        Checks: the layout files of both halves exist; the symmetry is known and both halves agree;
        pixel and box sizes agree across optics groups and halves; every stack a STAR file refers
        to exists, has a valid header and its full data, holds at least the highest image index
        referenced, and has images of the optics' rlnImageSize; the mask and the ground-truth map,
        when present, are cubes of that box size; no image appears twice, in one half or in both,
        however its name is spelt (:func:`particle_keys`), and no half uses the other half's stack.
        """
        for h in self.halves:
            for p in (self.star_path(h), self.stack_path(h), self.info_path(h)):
                if not p.is_file():
                    raise InputError("missing file of the entry layout (particles_{h}.star, particles_{h}.mrcs, "
                                     "info_{h}.json for h = 0, 1)", path=p)
        _ = self.symmetry
        _ = self.pixel_size
        box = self.box_size
        self.check_independent_halves()
        for h in self.halves:
            star_path = self.star_path(h)
            names = self.read_star(h).particles["rlnImageName"].astype(str)
            parts = names.str.extract(_IMAGE_NAME_PATTERN)
            highest = parts[0].astype(np.int64).groupby(parts[1], sort=False).max()
            for stack, top in highest.items():
                path = resolve_stack_path(star_path, stack)
                n, ny, nx = stack_shape(path)
                if (ny, nx) != (box, box):
                    raise InputError(f"stack images are {ny} x {nx} pixels but {star_path} says rlnImageSize "
                                     f"{box}", path=path, where="box size")
                if top > n:
                    raise InputError(f"particles refer to image {top} (1-based) but the stack {path} holds "
                                     f"{n} images", path=star_path, where=f"rlnImageName ({stack})")
        for path, what in ((self.mask_path, "mask"), (self.ground_truth_map_path, "ground-truth map")):
            if path.exists():
                shape, _ = _mrc_layout(path)
                if tuple(shape) != (box, box, box):
                    raise InputError(f"{what} has shape {shape} but the particles' box is {box} "
                                     f"(expected {(box, box, box)})", path=path)
