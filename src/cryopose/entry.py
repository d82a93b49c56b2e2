"""A benchmark entry on disk (:class:`Entry`: its layout, its validation) and how a name or a
folder given on the command line becomes one (:func:`resolve_entry`).

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
)

__all__ = ["Entry", "resolve_entry", "DEFAULT_BENCHMARK_DIR"]

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

    def validate(self) -> None:
        """Check that the entry's files exist and agree; raise :class:`InputError` naming the problem.

        Checks: the layout files of both halves exist; the symmetry is known and both halves agree;
        pixel and box sizes agree across optics groups and halves; every stack a STAR file refers
        to exists, has a valid header and its full data, holds at least the highest image index
        referenced, and has images of the optics' rlnImageSize; the mask and the ground-truth map,
        when present, are cubes of that box size; no image appears twice, in one half or in both,
        however its name is spelt (:func:`cryopose.io.particle_keys`), and no half uses the other
        half's stack.
        """
        for h in self.halves:
            for p in (self.star_path(h), self.stack_path(h), self.info_path(h)):
                if not p.is_file():
                    raise InputError(
                        "missing file of the entry layout (particles_{h}.star, particles_{h}.mrcs, "
                        "info_{h}.json for h = 0, 1)",
                        path=p,
                    )
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
            if path.exists():
                shape, _ = _mrc_layout(path)
                if tuple(shape) != (box, box, box):
                    raise InputError(
                        f"{what} has shape {shape} but the particles' box is {box} (expected {(box, box, box)})",
                        path=path,
                    )


def resolve_entry(entry, benchmark_dir=None) -> Entry:
    """An :class:`Entry` from an Entry, an entry folder, or a name in ``benchmark_dir``
    (default ``resources/benchmark``, or ``$CRYOPOSE_BENCHMARK_DIR``)."""
    if isinstance(entry, Entry):
        return entry
    path = Path(entry)
    if path.is_dir() and (path / "particles_0.star").exists():
        return Entry(path)
    root = Path(benchmark_dir if benchmark_dir is not None else DEFAULT_BENCHMARK_DIR) / str(entry)
    if not root.is_dir():
        raise InputError(
            f"no entry {entry!r}: neither an entry folder nor a name in the benchmark directory {root.parent}",
            path=root,
        )
    return Entry(root)
