"""Reading and writing RELION STAR files, MRC stacks and maps, and benchmark entries.

STAR files of RELION 3.1 (optics + particles blocks, origins in Å) and RELION 3.0 (one block,
origins in pixels, optics per particle) are read into one normalised RELION 3.1 form,
:class:`ParticleStar`, and always written back as RELION 3.1. Stacks are opened as memory maps
(a real half is 20–47 GB) and read in contiguous runs. Every writer writes to a temporary name in
the destination folder and renames it into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import mrcfile
import numpy as np
import pandas as pd
import starfile

from .errors import InputError

__all__ = [
    "atomic_write", "ParticleStar", "read_particles_star", "write_particles_star", "particles_with_optics",
    "parse_image_name", "resolve_stack_path", "open_stack", "stack_shape", "read_images", "StackWriter",
    "read_map", "write_map", "Entry",
]

OPTICS_COLUMNS = ("rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration",
                  "rlnAmplitudeContrast")
FINITE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                  "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnMaxValueProbDistribution",
                  "rlnParticleFigureOfMerit")


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the body succeeds.

    The temporary name keeps the suffix (``particles_0.tmp-1a2b.star``) so libraries that look
    at it behave. On failure the temporary file is removed and an existing ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(3)}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------------------
# STAR
# ----------------------------------------------------------------------------------------------

@dataclass
class ParticleStar:
    """A particle STAR file in RELION 3.1 form.

    ``optics``: one row per optics group (rlnOpticsGroup, rlnOpticsGroupName, rlnImagePixelSize,
    rlnImageSize, rlnImageDimensionality, rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast).
    ``particles``: one row per particle; origins rlnOriginX/YAngst in Å; other columns kept as read.
    """

    optics: pd.DataFrame
    particles: pd.DataFrame
    path: Path | None = None


def _read_blocks(path: Path) -> dict:
    if not path.exists():
        raise InputError("file not found", path=path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile raises assorted parser errors
        raise InputError(f"not a readable STAR file ({type(err).__name__}: {err})", path=path) from err
    if not blocks:
        raise InputError("no data block found (expected RELION 3.1 data_optics + data_particles, or RELION 3.0 data_)",
                         path=path)
    return blocks


def _check_finite(df: pd.DataFrame, columns, path: Path, block: str) -> None:
    for col in columns:
        if col not in df.columns:
            continue
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise InputError(f"value {df[col].iloc[bad[0]]!r} is not a finite number "
                             f"({len(bad)} such rows)", path=path,
                             where=f"{block} row {bad[0]} (0-based), column {col}")


def _pixel_size_relion30(df: pd.DataFrame, path: Path) -> np.ndarray:
    if "rlnImagePixelSize" in df.columns:
        return df["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    if "rlnPixelSize" in df.columns:
        return df["rlnPixelSize"].to_numpy(dtype=np.float64)
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        return df["rlnDetectorPixelSize"].to_numpy(dtype=np.float64) * 1e4 / df["rlnMagnification"].to_numpy(
            dtype=np.float64)
    raise InputError("RELION 3.0 STAR without a pixel size: expected rlnImagePixelSize, rlnPixelSize, or "
                     "rlnDetectorPixelSize and rlnMagnification", path=path, where="pixel size")


def _from_relion30(df: pd.DataFrame, path: Path) -> ParticleStar:
    df = df.copy()
    px = _pixel_size_relion30(df, path)
    if not np.all(np.isfinite(px) & (px > 0)):
        row = int(np.flatnonzero(~(np.isfinite(px) & (px > 0)))[0])
        raise InputError(f"pixel size {px[row]} is not a positive number", path=path, where=f"row {row} (0-based)")
    for col in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        if col not in df.columns:
            raise InputError("missing column (RELION 3.0 STAR files carry optics per particle)", path=path, where=col)
    if "rlnImageSize" in df.columns:
        sizes = df["rlnImageSize"].to_numpy(dtype=np.int64)
    else:
        _, stack = parse_image_name(str(df["rlnImageName"].iloc[0]), path, 0)
        sizes = np.full(len(df), stack_shape(resolve_stack_path(path, stack))[-1])
    keys = pd.DataFrame({
        "rlnImagePixelSize": px, "rlnImageSize": sizes,
        "rlnVoltage": df["rlnVoltage"].to_numpy(dtype=np.float64),
        "rlnSphericalAberration": df["rlnSphericalAberration"].to_numpy(dtype=np.float64),
        "rlnAmplitudeContrast": df["rlnAmplitudeContrast"].to_numpy(dtype=np.float64),
    })
    optics = keys.drop_duplicates().reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]])
    optics["rlnImageDimensionality"] = 2
    group = keys.merge(optics, how="left", on=list(keys.columns))["rlnOpticsGroup"].to_numpy()
    for axis in ("X", "Y"):
        col = f"rlnOrigin{axis}"
        if col in df.columns:
            df[f"rlnOrigin{axis}Angst"] = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64) * px
            df = df.drop(columns=col)
    drop = [c for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                        "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification", "rlnImageSize") if c in df.columns]
    df = df.drop(columns=drop)
    df["rlnOpticsGroup"] = group
    return ParticleStar(optics=optics, particles=df.reset_index(drop=True), path=path)


def read_particles_star(path: str | Path) -> ParticleStar:
    """Read a RELION 3.1 or 3.0 particle STAR file into RELION 3.1 form (see :class:`ParticleStar`).

    Raises :class:`InputError` naming the file, block, row and column for: unreadable files,
    missing rlnImageName or optics columns, non-finite angles/origins/defocus/confidences,
    particles that refer to an optics group the optics table lacks.
    """
    path = Path(path)
    blocks = _read_blocks(path)
    if "particles" in blocks and "optics" in blocks:
        optics = blocks["optics"].reset_index(drop=True)
        particles = blocks["particles"].reset_index(drop=True)
        if not isinstance(optics, pd.DataFrame) or not isinstance(particles, pd.DataFrame):
            raise InputError("data_optics and data_particles must be loop_ tables", path=path)
        for col in ("rlnOpticsGroup",) + OPTICS_COLUMNS:
            if col not in optics.columns:
                raise InputError(f"missing column in the optics table; expected {', '.join(OPTICS_COLUMNS)}",
                                 path=path, where=f"data_optics, {col}")
        _check_finite(optics, OPTICS_COLUMNS, path, "data_optics")
        if "rlnOpticsGroup" not in particles.columns:
            raise InputError("missing column (RELION 3.1 particles name their optics group)", path=path,
                             where="data_particles, rlnOpticsGroup")
        unknown = sorted(set(particles["rlnOpticsGroup"]) - set(optics["rlnOpticsGroup"]))
        if unknown:
            row = int(np.flatnonzero(particles["rlnOpticsGroup"].isin(unknown))[0])
            raise InputError(f"optics group {unknown[0]} is not in data_optics (it has "
                             f"{sorted(optics['rlnOpticsGroup'].tolist())})", path=path,
                             where=f"data_particles row {row} (0-based), rlnOpticsGroup")
        if "rlnOpticsGroupName" not in optics.columns:
            optics["rlnOpticsGroupName"] = [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]]
        if "rlnImageDimensionality" not in optics.columns:
            optics["rlnImageDimensionality"] = 2
        star = ParticleStar(optics=optics, particles=particles, path=path)
        for axis in ("X", "Y"):  # a 3.1 file with pixel origins (rare) is converted too
            if f"rlnOrigin{axis}" in particles.columns and f"rlnOrigin{axis}Angst" not in particles.columns:
                px = particles_with_optics(star)["rlnImagePixelSize"].to_numpy(dtype=np.float64)
                particles[f"rlnOrigin{axis}Angst"] = particles.pop(f"rlnOrigin{axis}").to_numpy(np.float64) * px
    elif "particles" in blocks or "optics" in blocks:
        raise InputError("RELION 3.1 STAR needs both data_optics and data_particles blocks; found "
                         f"{sorted(blocks)}", path=path)
    else:
        tables = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
        if len(tables) != 1:
            raise InputError(f"expected one particle table (RELION 3.0) or data_optics + data_particles "
                             f"(RELION 3.1), found blocks {sorted(blocks)}", path=path)
        if "rlnImageName" not in tables[0].columns:
            raise InputError("missing column: every particle needs an image", path=path, where="rlnImageName")
        star = _from_relion30(tables[0], path)
    if "rlnImageName" not in star.particles.columns:
        raise InputError("missing column: every particle needs an image", path=path, where="data_particles, rlnImageName")
    if len(star.particles) == 0:
        raise InputError("no particles", path=path, where="data_particles")
    _check_finite(star.particles, FINITE_COLUMNS, path, "data_particles")
    return star


def write_particles_star(path: str | Path, star: ParticleStar) -> None:
    """Write ``star`` as a RELION 3.1 STAR file (optics + particles), atomically."""
    with atomic_write(path) as tmp:
        starfile.write({"optics": star.optics, "particles": star.particles}, tmp, float_format="%.6f")


def particles_with_optics(star: ParticleStar) -> pd.DataFrame:
    """The particle table with each row's optics-group columns (pixel size, voltage, ...) merged in."""
    optics_cols = [c for c in star.optics.columns if c not in star.particles.columns or c == "rlnOpticsGroup"]
    merged = star.particles.merge(star.optics[optics_cols], how="left", on="rlnOpticsGroup")
    merged.index = star.particles.index
    return merged


def parse_image_name(name: str, path: str | Path | None = None, row: int | None = None) -> tuple[int, str]:
    """``"000012@stack.mrcs"`` → ``(11, "stack.mrcs")``: RELION's 1-based index made 0-based."""
    index, sep, stack = str(name).partition("@")
    where = "rlnImageName" if row is None else f"row {row} (0-based), rlnImageName"
    if not sep or not stack or not index.strip().isdigit() or int(index) < 1:
        raise InputError(f"{name!r} is not of the form <index from 1>@<stack file>", path=path, where=where)
    return int(index) - 1, stack


def resolve_stack_path(star_path: str | Path, stack: str) -> Path:
    """Where a stack named in a STAR file lives.

    RELION resolves relative names against the working directory; CESPED entries name stacks
    relative to the STAR file's folder. The STAR folder is tried first, then the working
    directory.
    """
    p = Path(stack)
    if p.is_absolute():
        if p.exists():
            return p
        raise InputError("stack file not found", path=p, where=f"referenced by {star_path}")
    beside = Path(star_path).parent / p
    if beside.exists():
        return beside
    if p.exists():
        return p
    raise InputError(f"stack file {stack!r} not found beside the STAR file ({beside}) nor in the working "
                     f"directory ({Path.cwd() / p})", path=star_path, where="rlnImageName")


# ----------------------------------------------------------------------------------------------
# MRC
# ----------------------------------------------------------------------------------------------

def open_stack(path: str | Path):
    """Open an MRC stack read-only as a memory map (no image is read until indexed).

    Raises :class:`InputError` for a missing file, an invalid header, or data shorter than the
    header promises.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("stack file not found", path=path)
    try:
        with warnings.catch_warnings():  # permissive mode warns; the checks below raise instead
            warnings.simplefilter("ignore", RuntimeWarning)
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as err:
        raise InputError(f"not a readable MRC file ({err})", path=path) from err
    if mrc.data is None:
        header = mrc.header
        expected = int(header.nx) * int(header.ny) * int(header.nz)
        mrc.close()
        raise InputError(f"MRC header or data invalid: header promises {expected} voxels "
                         f"but the file is {path.stat().st_size} bytes (truncated or corrupt)", path=path)
    expected_bytes = mrc.header.nbytes + int(mrc.header.nsymbt) + mrc.data.nbytes
    actual = path.stat().st_size
    if actual < expected_bytes:
        mrc.close()
        raise InputError(f"truncated: expected {expected_bytes} bytes, found {actual}", path=path)
    return mrc


def stack_shape(path: str | Path) -> tuple[int, int, int]:
    """``(n, ny, nx)`` from the header only."""
    path = Path(path)
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
            h = mrc.header
            return int(h.nz), int(h.ny), int(h.nx)
    except (OSError, ValueError) as err:
        raise InputError(f"not a readable MRC file ({err})", path=path) from err


def read_images(stack, indices) -> np.ndarray:
    """Images ``indices`` (0-based, any order, repeats allowed) of an open stack as float32.

    Sorted unique indices are read in contiguous runs, one slice of the memory map each, so a
    batch of neighbouring particles costs one read.

    Returns:
        ``(len(indices), S, S)`` float32.
    """
    data = stack.data
    if data.ndim == 2:
        data = data[None]
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = data.shape[0]
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise InputError(f"image index {bad} (0-based) is outside the stack of {n} images",
                         path=getattr(stack, "_iostream", None) and getattr(stack._iostream, "name", None))
    uniq, inverse = np.unique(idx, return_inverse=True)
    out = np.empty((len(uniq),) + data.shape[1:], dtype=np.float32)
    if len(uniq):
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        start = 0
        for run in np.split(uniq, breaks):
            out[start:start + len(run)] = data[run[0]:run[-1] + 1]
            start += len(run)
    return out[inverse]


class StackWriter:
    """Write an MRC stack of known size batch by batch, through a memory map, atomically.

    ``with StackWriter(path, n_images, box_size, pixel_size) as w: w.write(start, images)``.
    The file appears at ``path`` only when the block exits cleanly.
    """

    def __init__(self, path: str | Path, n_images: int, box_size: int, pixel_size: float, dtype=np.float32):
        self.path = Path(path)
        self.shape = (int(n_images), int(box_size), int(box_size))
        self.pixel_size = float(pixel_size)
        self.dtype = dtype
        self._ctx = None
        self._mrc = None
        self._stats = [np.inf, -np.inf, 0.0, 0.0, 0]  # min, max, sum, sum of squares, count

    def __enter__(self) -> "StackWriter":
        self._ctx = atomic_write(self.path)
        tmp = self._ctx.__enter__()
        self._mrc = mrcfile.new_mmap(tmp, shape=self.shape, mrc_mode=2 if self.dtype == np.float32 else None,
                                     overwrite=True)
        self._mrc.set_image_stack()
        self._mrc.voxel_size = self.pixel_size
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        images = np.asarray(images, dtype=self.dtype)
        if images.shape[1:] != self.shape[1:] or start < 0 or start + len(images) > self.shape[0]:
            raise ValueError(f"StackWriter.write: images {images.shape} at {start} do not fit stack {self.shape}")
        self._mrc.data[start:start + len(images)] = images
        s = self._stats
        s[0], s[1] = min(s[0], float(images.min())), max(s[1], float(images.max()))
        s[2] += float(images.sum(dtype=np.float64))
        s[3] += float((images.astype(np.float64) ** 2).sum())
        s[4] += images.size

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                lo, hi, total, sq, count = self._stats
                header = self._mrc.header
                if count:
                    mean = total / count
                    header.dmin, header.dmax, header.dmean = lo, hi, mean
                    header.rms = np.sqrt(max(sq / count - mean ** 2, 0.0))
                self._mrc.flush()
            self._mrc.close()
        except BaseException:
            self._ctx.__exit__(*__import__("sys").exc_info())
            raise
        return self._ctx.__exit__(exc_type, exc, tb)


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """A 3D map as float32 ``(D, D, D)`` indexed ``[z, y, x]`` and its pixel size in Å."""
    path = Path(path)
    if not path.exists():
        raise InputError("map file not found", path=path)
    try:
        with mrcfile.open(path, mode="r", permissive=True) as mrc:
            if mrc.data is None:
                raise InputError("MRC header or data invalid (truncated or corrupt)", path=path)
            return np.asarray(mrc.data, dtype=np.float32).copy(), float(mrc.voxel_size.x)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"not a readable MRC file ({err})", path=path) from err


def write_map(path: str | Path, volume: np.ndarray, pixel_size: float) -> None:
    """Write a map (``[z, y, x]``) with its pixel size, atomically."""
    with atomic_write(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.asarray(volume, dtype=np.float32))
            mrc.voxel_size = float(pixel_size)


# ----------------------------------------------------------------------------------------------
# Entries
# ----------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """A benchmark entry on disk, in CESPED's Zenodo layout::

        <root>/particles_{h}.star  particles_{h}.mrcs  info_{h}.json   (h = 0, 1)
        <root>/<name>_mask.mrc
        <root>/<name>_source_map.mrc  (simulated entries: the true density)
    """

    root: Path
    halves: tuple[int, int] = (0, 1)
    _stars: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise InputError("entry folder not found", path=self.root)

    @classmethod
    def from_benchmark(cls, benchmark_dir: str | Path, name: str) -> "Entry":
        return cls(Path(benchmark_dir) / name)

    @property
    def name(self) -> str:
        return self.root.name

    def _half(self, h: int) -> int:
        if h not in (0, 1):
            raise InputError(f"half must be 0 or 1, got {h!r}", path=self.root, where="half")
        return h

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
        return self.root / f"{self.name}_source_map.mrc"

    def read_star(self, h: int) -> ParticleStar:
        if h not in self._stars:
            self._stars[h] = read_particles_star(self.star_path(h))
        return self._stars[h]

    def _info(self, h: int) -> dict:
        path = self.info_path(h)
        if not path.exists():
            raise InputError("info file not found (expected {\"symmetry\": ...})", path=path)
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON ({err})", path=path) from err
        if not isinstance(info, dict) or "symmetry" not in info:
            raise InputError("expected an object with a \"symmetry\" key", path=path, where="symmetry")
        return info

    @cached_property
    def symmetry(self) -> str:
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
            raise InputError(f"the halves disagree on the symmetry: {syms[0]} vs {syms[1]}",
                             path=self.root, where="info_0.json / info_1.json")
        return syms[0]

    def _optics_value(self, column: str) -> float:
        values = {}
        for h in self.halves:
            vals = np.unique(self.read_star(h).optics[column].to_numpy(dtype=np.float64))
            if len(vals) != 1:
                raise InputError(f"optics groups disagree on {column}: {vals.tolist()} (cryopose needs one value "
                                 "per entry)", path=self.star_path(h), where=f"data_optics, {column}")
            values[h] = float(vals[0])
        if abs(values[0] - values[1]) > 1e-6 * max(abs(values[0]), 1.0):
            raise InputError(f"halves disagree on {column}: {values[0]} vs {values[1]}", path=self.root,
                             where=column)
        return values[0]

    @property
    def pixel_size(self) -> float:
        """Å per pixel, from rlnImagePixelSize."""
        return self._optics_value("rlnImagePixelSize")

    @property
    def box_size(self) -> int:
        return int(self._optics_value("rlnImageSize"))

    def n_particles(self, h: int) -> int:
        return len(self.read_star(h).particles)

    def validate(self) -> None:
        """Check that every file exists and agrees with the others; raise :class:`InputError` if not."""
        for h in self.halves:
            for p in (self.star_path(h), self.stack_path(h), self.info_path(h)):
                if not p.exists():
                    raise InputError("missing file of the entry layout", path=p)
        _ = self.symmetry
        px, box = self.pixel_size, self.box_size
        for h in self.halves:
            star = self.read_star(h)
            n, ny, nx = stack_shape(self.stack_path(h))
            if (ny, nx) != (box, box):
                raise InputError(f"stack images are {ny}×{nx} but {self.star_path(h).name} says rlnImageSize {box}",
                                 path=self.stack_path(h), where="box size")
            stacks = {}
            for row, name in enumerate(star.particles["rlnImageName"]):
                index, stack = parse_image_name(name, self.star_path(h), row)
                if stacks.get(stack, -1) < index:
                    stacks[stack] = index
            for stack, highest in stacks.items():
                path = resolve_stack_path(self.star_path(h), stack)
                count = n if path.resolve() == self.stack_path(h).resolve() else stack_shape(path)[0]
                if highest >= count:
                    raise InputError(f"particles refer to image {highest + 1} (1-based) but the stack holds "
                                     f"{count}", path=self.star_path(h), where=f"rlnImageName ({stack})")
            open_stack(self.stack_path(h)).close()  # size check against the header
        if self.mask_path.exists():
            shape = stack_shape(self.mask_path)
            if shape != (box, box, box):
                raise InputError(f"mask is {shape} but the particles' box is {box}", path=self.mask_path)
        _ = px
