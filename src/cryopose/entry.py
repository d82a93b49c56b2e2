"""A benchmark entry on disk (:class:`Entry`: its layout, its validation; :class:`StarEntry`: a
plain RELION particle STAR file used as one) and how a name, a folder or a STAR file given on the
command line becomes one (:func:`resolve_entry`).

Kept apart from :mod:`cryopose.io`, which reads and writes single files, because an entry is a
folder of files that must agree with each other (sizes, symmetry, independent halves). Imports no
torch, so validating or downloading an entry stays cheap; the symmetry parser (which needs torch)
is imported only when an entry's symmetry is asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np

from .errors import InputError
from .io.mrc import _mrc_layout, stack_shape  # private helpers: validate() checks files as they are read
from .io.star import (
    _IMAGE_NAME_PATTERN,
    ParticleStar,
    check_unique_particles,
    particle_keys,
    read_particles_star,
    resolve_stack_path,
    with_absolute_image_names,
    write_particles_star,
)

__all__ = ["Entry", "StarEntry", "resolve_entry", "import_star", "DEFAULT_BENCHMARK_DIR"]

DEFAULT_BENCHMARK_DIR = Path(os.environ.get("CRYOPOSE_BENCHMARK_DIR", "resources/benchmark"))


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
        """CESPED's stack of half ``h``. Optional: what a half reads is what its STAR file names
        (:meth:`stack_files`), which may be other stacks (an entry made by ``cryopose import-star``)."""
        return self.root / f"particles_{self._half(h)}.mrcs"

    def stack_files(self, h: int) -> list[Path]:
        """The stack files half ``h``'s image names denote (:func:`cryopose.io.resolve_stack_path`),
        in order of first use."""
        star = self.read_star(h)
        stacks = star.particles["rlnImageName"].astype(str).str.extract(_IMAGE_NAME_PATTERN)[1].unique()
        return [resolve_stack_path(star.path, stack) for stack in stacks]

    def input_paths(self) -> list[Path]:
        """What a command reading this entry must never write over (:mod:`cryopose.guard`): the
        entry folder."""
        return [self.root]

    def describe(self) -> dict:
        """Where this entry's settings came from, beyond its layout (``cryopose info``): nothing."""
        return {}

    def write_half_star(self, h: int, path: str | Path) -> Path:
        """Write half ``h``'s particles as a STAR file with absolute image names (readable from any
        folder, by cryopose and by RELION alike)."""
        star = self.read_star(h)
        write_particles_star(path, with_absolute_image_names(star, star.path))
        return Path(path)

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
        """Half ``h``'s particles; ``.path`` is the STAR file their image names are relative to."""
        h = self._half(h)
        if h not in self._stars:
            self._stars[h] = read_particles_star(self.star_path(h))
        return self._stars[h]

    def info_bytes(self, h: int) -> bytes:
        """The content of ``info_{h}.json`` (what a copy of the entry writes)."""
        return self.info_path(h).read_bytes()

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
        from .symmetry import parse_symmetry  # here, not at the top: symmetry imports torch

        syms = []
        for h in self.halves:
            try:
                syms.append(parse_symmetry(str(self._info(h)["symmetry"])))
            except InputError as err:
                if err.path is None:
                    raise InputError(err.problem, path=self.info_path(h), where="symmetry") from err
                raise
        if syms[0] != syms[1]:
            raise InputError(
                f"the halves disagree on the symmetry: {syms[0]} (info_0.json) vs {syms[1]} (info_1.json)",
                path=self.root,
                where="symmetry",
            )
        return syms[0]

    def _optics_value(self, column: str) -> float:
        values = {}
        for h in self.halves:
            vals = np.unique(self.read_star(h).optics[column].to_numpy(dtype=np.float64))
            if len(vals) != 1:
                raise InputError(
                    f"optics groups disagree on {column}: {vals.tolist()} (an entry needs one value)",
                    path=self.star_path(h),
                    where=f"data_optics, column {column}",
                )
            values[h] = float(vals[0])
        if abs(values[0] - values[1]) > 1e-6 * max(abs(values[0]), 1.0):
            raise InputError(
                f"the halves disagree on {column}: {values[0]} (particles_0.star) vs {values[1]} (particles_1.star)",
                path=self.root,
                where=column,
            )
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
        """The identity of each particle of half ``h`` (:func:`cryopose.io.particle_keys`), in row order."""
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
            if self.stack_path(other) is None or not self.stack_path(other).is_file():
                continue  # the halves may share stacks (a RELION project): the image check below decides
            other_stack = os.path.realpath(self.stack_path(other))
            for row, key in enumerate(keys[h]):
                if key.split("@", 1)[1] == other_stack:
                    raise InputError(
                        f"{names[h][row]!r} is an image of {self.stack_path(other).name}, the stack of "
                        f"half {other}: the halves must be independent (each particle in one half only)",
                        path=self.star_path(h),
                        where=f"data_particles row {row} (0-based), column rlnImageName",
                    )
        row_of = {key: row for row, key in enumerate(keys[0])}
        for row, key in enumerate(keys[1]):
            if key in row_of:
                raise InputError(
                    f"{names[1][row]!r} is also particle {names[0][row_of[key]]!r} of half 0 (row "
                    f"{row_of[key]} of {self.star_path(0).name}): the halves must be independent "
                    "(each particle in one half only)",
                    path=self.star_path(1),
                    where=f"data_particles row {row} (0-based), column rlnImageName",
                )

    def _check_layout(self) -> None:
        for h in self.halves:
            for p in (self.star_path(h), self.info_path(h)):
                if not p.is_file():
                    raise InputError(
                        "missing file of the entry layout (particles_{h}.star, info_{h}.json for h = 0, 1; "
                        "the stacks are those the STAR files name)",
                        path=p,
                    )

    def validate(self) -> None:
        """Check that the entry's files exist and agree; raise :class:`InputError` naming the problem.

        Checks: the STAR and info files of both halves exist; the symmetry is known and both halves agree;
        pixel and box sizes agree across optics groups and halves; every stack a STAR file refers
        to exists, has a valid header and its full data, holds at least the highest image index
        referenced, and has images of the optics' rlnImageSize; the mask and the ground-truth map,
        when present, are cubes of that box size; no image appears twice, in one half or in both,
        however its name is spelt (:func:`cryopose.io.particle_keys`), and no half uses the other
        half's stack.
        """
        self._check_layout()
        _ = self.symmetry
        _ = self.pixel_size
        box = self.box_size
        self.check_independent_halves()
        for h in self.halves:
            star_path = self.read_star(h).path
            names = self.read_star(h).particles["rlnImageName"].astype(str)
            parts = names.str.extract(_IMAGE_NAME_PATTERN)
            highest = parts[0].astype(np.int64).groupby(parts[1], sort=False).max()
            for stack, top in highest.items():
                path = resolve_stack_path(star_path, stack)
                n, ny, nx = stack_shape(path)
                if (ny, nx) != (box, box):
                    raise InputError(
                        f"stack images are {ny} x {nx} pixels but {star_path} says rlnImageSize {box}",
                        path=path,
                        where="box size",
                    )
                if top > n:
                    raise InputError(
                        f"particles refer to image {top} (1-based) but the stack {path} holds {n} images",
                        path=star_path,
                        where=f"rlnImageName ({stack})",
                    )
        for path, what in ((self.mask_path, "mask"), (self.ground_truth_map_path, "ground-truth map")):
            if path is not None and path.exists():
                shape, _ = _mrc_layout(path)
                if tuple(shape) != (box, box, box):
                    raise InputError(
                        f"{what} has shape {shape} but the particles' box is {box} (expected {(box, box, box)})",
                        path=path,
                    )


def _job_options(star_path: Path) -> dict[str, str]:
    """The options of the RELION job whose output ``star_path`` is (``job.star`` beside it, the
    ``joboptions_values`` block), or ``{}`` when there is none or it cannot be read."""
    import starfile

    job = star_path.parent / "job.star"
    if not job.is_file():
        return {}
    try:
        table = starfile.read(job, always_dict=True).get("joboptions_values")
        return dict(zip(table["rlnJobOptionVariable"].astype(str), table["rlnJobOptionValue"].astype(str)))
    except Exception:  # noqa: BLE001 - a job.star we cannot read only means "no defaults from it"
        return {}


@dataclass
class StarEntry(Entry):
    """A plain RELION particle STAR file (3.0 or 3.1, one or many optics groups; e.g. a
    refinement's ``run_data.star``) used as an entry: both halves in one file.

    * **Halves**: rlnRandomSubset 1 is half 0 and 2 is half 1 (RELION's gold-standard halves);
      a file without that column is split by row, even rows (0-based) half 0 and odd rows half 1,
      which is reproducible and what ``relion_refine`` is given by the relion_refine method.
    * **Image names** are resolved as RELION resolves them (:func:`cryopose.io.resolve_stack_path`:
      the working directory, then, with a warning, the STAR file's folder).
    * **Symmetry**: ``symmetry`` if given, else the ``sym_name`` of the RELION job that wrote the
      file (``job.star`` beside it), else an error asking for one.
    * **Mask**: ``mask`` if given, else the job's ``fn_mask`` when that file exists, else none
      (masked metrics are then left out).
    * **Name**: ``name`` if given, else the file's stem, prefixed by its folder for RELION's
      generic ``run_*`` names (``Refine3D/job020/run_data.star`` is ``job020_run_data``).
    """

    star: Path | None = None
    symmetry_name: str | None = None
    mask: Path | None = None
    entry_name: str | None = None

    def __post_init__(self):
        if self.star is None:
            raise TypeError("StarEntry needs star=<particle STAR file>")
        self.star = Path(self.star)
        if not self.star.is_file():
            raise InputError("particle STAR file not found", path=self.star)
        self.root = self.star.parent
        self._job = _job_options(self.star)
        if self.mask is None and self._job.get("fn_mask", "").strip():
            found = Path(self._job["fn_mask"].strip())
            self.mask = found if found.is_file() else None
        self.mask = None if self.mask is None else Path(self.mask)

    @property
    def name(self) -> str:
        if self.entry_name:
            return self.entry_name
        stem = self.star.stem
        return f"{self.star.parent.absolute().name}_{stem}" if stem.startswith("run_") else stem

    def star_path(self, h: int) -> Path:
        self._half(h)
        return self.star

    def stack_path(self, h: int) -> None:
        """None: the halves' stacks are those :meth:`stack_files` lists."""
        self._half(h)
        return None

    def info_path(self, h: int) -> None:
        """None: the symmetry is given (class docstring)."""
        self._half(h)
        return None

    def info_bytes(self, h: int) -> bytes:
        self._half(h)
        return (json.dumps({"symmetry": self.symmetry}) + "\n").encode()

    @property
    def mask_path(self) -> Path | None:
        return self.mask

    @property
    def ground_truth_map_path(self) -> Path | None:
        return None

    @cached_property
    def _all(self) -> ParticleStar:
        return read_particles_star(self.star)

    @cached_property
    def half_of_row(self) -> np.ndarray:
        """The half (0 or 1) of each particle row of the file (the class docstring's rule)."""
        parts = self._all.particles
        if "rlnRandomSubset" not in parts.columns:
            return np.arange(len(parts)) % 2
        subset = parts["rlnRandomSubset"].to_numpy()
        bad = np.flatnonzero(~np.isin(subset, (1, 2)))
        if len(bad):
            raise InputError(
                f"rlnRandomSubset is {subset[bad[0]]!r}; expected 1 (half 0) or 2 (half 1)",
                path=self.star,
                where=f"data_particles row {int(bad[0])} (0-based), column rlnRandomSubset",
            )
        return subset.astype(np.int64) - 1

    def read_star(self, h: int) -> ParticleStar:
        h = self._half(h)
        if h not in self._stars:
            rows = self.half_of_row == h
            if not rows.any():
                raise InputError(
                    f"no particle belongs to half {h} (rlnRandomSubset {h + 1}); a STAR file used as an "
                    "entry needs particles in both halves",
                    path=self.star,
                    where="rlnRandomSubset",
                )
            parts = self._all.particles[rows].reset_index(drop=True)
            self._stars[h] = ParticleStar(self._all.optics.copy(), parts, self.star)
        return self._stars[h]

    @cached_property
    def symmetry(self) -> str:
        from .symmetry import parse_symmetry

        given = self.symmetry_name or self._job.get("sym_name", "").strip()
        if not given:
            raise InputError(
                "a plain STAR file needs a symmetry: give --symmetry (e.g. C1, C4, D2), or keep the RELION "
                "job's job.star beside it",
                path=self.star,
                where="symmetry",
            )
        where = "symmetry" if self.symmetry_name else f"sym_name of {self.star.parent / 'job.star'}"
        try:
            return parse_symmetry(given)
        except InputError as err:
            raise InputError(err.problem, path=self.star, where=where) from err

    def _check_layout(self) -> None:
        self.half_of_row  # noqa: B018 - the halves rule is checked with the rest

    def input_paths(self) -> list[Path]:
        """The STAR file, the stacks it names and the mask (not the folder: a RELION job folder
        may well receive a command's output)."""
        stacks = {p for h in self.halves for p in self.stack_files(h)}
        return [self.star, *sorted(stacks), *([self.mask] if self.mask is not None else [])]

    def describe(self) -> dict:
        """Where this entry's settings came from (printed by ``cryopose info``)."""
        halves = "rlnRandomSubset" if "rlnRandomSubset" in self._all.particles.columns else "even/odd rows"
        return {"star": str(self.star), "halves_from": halves}


def resolve_entry(entry, benchmark_dir=None, *, symmetry=None, mask=None) -> Entry:
    """An :class:`Entry` from an Entry, an entry folder, a plain particle STAR file
    (:class:`StarEntry`, with ``symmetry`` and ``mask``), or a name in ``benchmark_dir``
    (default ``resources/benchmark``, or ``$CRYOPOSE_BENCHMARK_DIR``).

    ``symmetry`` and ``mask`` are for a STAR file only (an entry folder has its own); given with
    an entry folder they are refused rather than silently ignored."""
    if isinstance(entry, Entry):
        resolved = entry
    else:
        path = Path(entry)
        if path.suffix == ".star" and path.is_file():
            return StarEntry(path, star=path, symmetry_name=symmetry, mask=mask)
        if path.is_dir() and (path / "particles_0.star").exists():
            resolved = Entry(path)
        else:
            root = Path(benchmark_dir if benchmark_dir is not None else DEFAULT_BENCHMARK_DIR) / str(entry)
            if not root.is_dir():
                raise InputError(
                    f"no entry {entry!r}: neither a particle STAR file, an entry folder nor a name in the "
                    f"benchmark directory {root.parent}",
                    path=root,
                )
            resolved = Entry(root)
    if not isinstance(resolved, StarEntry):
        for option, value in (("--symmetry", symmetry), ("--mask", mask)):
            if value is not None:
                raise InputError(
                    f"{option} is for a plain STAR file; an entry folder has its own (info_{{h}}.json, "
                    "<name>_mask.mrc)",
                    path=resolved.root,
                    where=option,
                )
    return resolved


def import_star(entry: StarEntry, out_dir: str | Path, name: str | None = None) -> Path:
    """Write ``out_dir/<name>/`` (default name: ``entry.name``), an entry folder that refers to the
    STAR file's particles where they are: ``particles_{h}.star`` (each half, image names made
    absolute, so the folder reads the same from anywhere), ``info_{h}.json`` (the symmetry) and
    ``<name>_mask.mrc`` (a copy of the mask, if any). No stack is copied (a real half is tens of
    GB). The folder is built aside and replaces an earlier one whole, once complete and valid.
    """
    import shutil

    from .io.atomic import atomic_write, staged_folder

    name = name or entry.name
    entry.validate()  # every stack is found and fits before anything is written
    target = Path(out_dir) / name
    with staged_folder(target) as work:
        for h in entry.halves:
            entry.write_half_star(h, work / f"particles_{h}.star")
            with atomic_write(work / f"info_{h}.json") as tmp:
                tmp.write_bytes(entry.info_bytes(h))
        if entry.mask_path is not None:
            shutil.copyfile(entry.mask_path, work / f"{name}_mask.mrc")
        Entry(work).validate()  # the copy is an entry on its own (staged_folder's name is hidden, not the entry's)
    return target
