"""Synthetic benchmark entries in the CESPED layout.

A simulated entry is written exactly like a downloaded one (``particles_{h}.star``,
``particles_{h}.mrcs``, ``info_{h}.json``, ``<name>_mask.mrc``) plus the true density
``<name>_source_map.mrc`` and the parameters it was made from, ``simulation.json``.

Image formation, per particle (RELION's conventions; see :mod:`cryopose.geometry`)::

    image = noise + a · IFT[ CTF(k) · exp(-2πi k·s) · FT[ P_R V ] ]

where ``P_R V`` is the projection ``∫ V(R·(x, y, z)) dz`` (a central slice of the padded volume's
DFT), ``s`` the particle's displacement from the box centre in pixels (written as
``rlnOriginX/YAngst = -s · pixel_size``, the shift RELION applies to re-centre it), ``a`` a
per-particle contrast factor (thicker ice, damaged particles) and the noise white Gaussian with one
standard deviation for the whole entry, set from the requested SNR.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from . import ctf as ctf_mod
from . import io
from .errors import InputError
from .geometry import euler_to_matrix, matrix_to_euler, random_rotations
from .masks import soft_mask_from_map
from .symmetry import VALID_NAMES, parse_symmetry, symmetry_matrices

__all__ = [
    "SimulationSpec",
    "SUITES",
    "pseudo_molecule",
    "map_from_atoms",
    "map_from_model_file",
    "map_from_mrc",
    "sample_poses",
    "simulate_images",
    "simulate_entry",
    "simulate_suite",
]

SPEC_VERSION = 1


@dataclass(frozen=True)
class SimulationSpec:
    """Everything that determines a simulated entry; equal specs give identical files.

    Units: Å for lengths, µm for defocus, degrees for angles, kV, mm for Cs.
    """

    name: str
    symmetry: str = "C1"
    box_size: int = 64
    pixel_size: float = 2.13
    n_particles: int = 2000  # per half
    snr: float = 0.1
    seed: int = 0
    source: str = "pseudo"  # "pseudo", or the path of an MRC map or a PDB/mmCIF model
    molecule_diameter: float | None = None  # Å; default 60 % of the box
    defocus_range: tuple[float, float] = (0.5, 2.5)  # µm, uniform
    astigmatism_max: float = 0.08  # µm, |U - V| uniform in [0, this]
    voltage: float = 300.0
    spherical_aberration: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor: float = 40.0  # Å², the envelope every image gets
    shift_sigma: float = 2.0  # pixels, Gaussian, truncated at 3 sigma
    preferred_fraction: float = 0.0  # share of particles drawn near top views (tilt ~ 0)
    preferred_sigma: float = 20.0  # degrees, spread of the tilt of those particles
    contrast_sigma: float = 0.2  # spread of the per-particle contrast factor a (mean 1)
    #: Seed of the pseudo-molecule when it differs from ``seed``: two entries with the same
    #: molecule_seed show the same molecule under other conditions (the generalisation experiment).
    molecule_seed: int | None = None

    def problems(self) -> list[str]:
        """Every value that no simulation can use, one ``"<key> ..."`` sentence each (empty when
        the spec is sound). Types are judged first, so a string where a number belongs is named
        as such rather than failing a comparison."""
        out: list[str] = []
        ok: set[str] = set()  # fields of the right type, whose ranges are judged below
        for f in dataclasses.fields(self):
            kind, nullable = _FIELD_KINDS[f.name]
            value = getattr(self, f.name)
            if value is None and nullable:
                continue
            if _is_kind(value, kind):
                ok.add(f.name)
            else:
                out.append(f"{f.name} must be {_KIND_NAMES[kind]}{' or null' if nullable else ''}, got {value!r}")

        def need(key: str, good, expected: str) -> None:
            if key in ok and not good(getattr(self, key)):
                out.append(f"{key} must be {expected}, got {getattr(self, key)!r}")

        need(
            "name",
            lambda v: v and "/" not in v and "\0" not in v and not v.startswith("."),
            "a plain folder name (not empty, no '/', not starting with '.')",
        )
        if "symmetry" in ok:
            # Only the groups cryopose.symmetry builds: RELION also takes C0 and D0, which name no
            # finite group and so no benchmark entry.
            try:
                parse_symmetry(self.symmetry)
            except InputError:
                out.append(f"symmetry must be a proper point group, got {self.symmetry!r}; valid names: {VALID_NAMES}")
        # 16 px is the smallest box whose mask, CTF and reconstructions the benchmark still
        # computes; odd boxes have no Fourier centre on the grid RELION and the projector share.
        need("box_size", lambda v: v >= 16 and v % 2 == 0, "an even number of pixels >= 16")
        need("pixel_size", lambda v: v > 0, "> 0 (Å per pixel)")
        need("n_particles", lambda v: v >= 1, ">= 1 (particles per half)")
        need("snr", lambda v: v > 0, "> 0")
        need("seed", lambda v: v >= 0, ">= 0")
        need("molecule_seed", lambda v: v is None or v >= 0, ">= 0 or null")
        need("source", lambda v: v.strip() != "", "'pseudo' or the path of an MRC map or PDB/mmCIF model")
        if "defocus_range" in ok:
            lo, hi = self.defocus_range
            need("defocus_range", lambda v: 0 < lo <= hi, "[low, high] µm with 0 < low <= high")
        need("astigmatism_max", lambda v: v >= 0, ">= 0 µm")
        need("voltage", lambda v: v > 0, "> 0 kV")
        need("spherical_aberration", lambda v: v >= 0, ">= 0 mm")
        # A fraction of 1 leaves no phase contrast: the CTF is then a pure amplitude term and
        # RELION's phase shift atan(A/sqrt(1-A²)) is undefined.
        need("amplitude_contrast", lambda v: 0 <= v < 1, "in [0, 1)")
        need("bfactor", lambda v: v >= 0, ">= 0 Å²")
        need("shift_sigma", lambda v: v >= 0, ">= 0 px")
        need("preferred_fraction", lambda v: 0 <= v <= 1, "in [0, 1]")
        need("preferred_sigma", lambda v: v > 0, "> 0 degrees")
        need("contrast_sigma", lambda v: v >= 0, ">= 0")
        if {"molecule_diameter", "box_size", "pixel_size"} <= ok:
            width = self.box_size * self.pixel_size
            need(
                "molecule_diameter",
                lambda v: v is None or 0 < v <= width,
                f"null or in (0, box_size·pixel_size = {width:g} Å]",
            )
        return out

    def validate(self, where: str | None = None, path: str | Path | None = None) -> None:
        """:class:`InputError` naming ``path`` (the spec's file), ``where`` (e.g. the config
        entry) and every bad key with what was expected."""
        problems = self.problems()
        if problems:
            label = where if where is not None else f"simulation spec {self.name!r}"
            raise InputError("; ".join(problems), path=path, where=label)

    @property
    def diameter(self) -> float:
        return self.molecule_diameter or 0.6 * self.box_size * self.pixel_size

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["defocus_range"] = list(self.defocus_range)
        d["spec_version"] = SPEC_VERSION
        if d["molecule_seed"] is None:  # entries simulated before the key existed stay identical
            del d["molecule_seed"]
        return d

    @classmethod
    def from_dict(cls, d, path: str | Path | None = None, where: str | None = None) -> SimulationSpec:
        """The spec of a JSON/YAML mapping, judged whole (:meth:`validate`): every error names
        ``path`` (the file it came from), ``where`` (its place in that file) and the key."""
        label = where if where is not None else "simulation spec"
        if not isinstance(d, dict):
            raise InputError(
                f"expected a JSON object of simulation parameters, got {type(d).__name__} {d!r}", path=path, where=label
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"spec_version"})
        if unknown:
            raise InputError(f"unknown keys {unknown}; expected some of {sorted(known)}", path=path, where=label)
        if "name" not in d:
            raise InputError("name is missing: every spec needs the entry's folder name", path=path, where=label)
        d = {k: v for k, v in d.items() if k in known}
        for key, value in d.items():
            # JSON and YAML write 4 for 4.0: a whole number is a number, so it becomes the float
            # the field holds (and simulation.json compares equal however it was written).
            if _FIELD_KINDS[key][0] == "number" and _is_kind(value, "int"):
                d[key] = float(value)
        # A pair becomes the tuple the field holds; anything else stays as given, to be named.
        if isinstance(d.get("defocus_range"), (list, tuple)) and len(d["defocus_range"]) == 2:
            d["defocus_range"] = tuple(float(x) if _is_kind(x, "int") else x for x in d["defocus_range"])
        spec = cls(**d)
        spec.validate(where=label if where is not None else f"simulation spec {spec.name!r}", path=path)
        return spec


# What each field holds, as JSON gives it, and whether null is allowed.
_FIELD_KINDS = {
    "name": ("str", False),
    "symmetry": ("str", False),
    "box_size": ("int", False),
    "pixel_size": ("number", False),
    "n_particles": ("int", False),
    "snr": ("number", False),
    "seed": ("int", False),
    "source": ("str", False),
    "molecule_diameter": ("number", True),
    "defocus_range": ("range", False),
    "astigmatism_max": ("number", False),
    "voltage": ("number", False),
    "spherical_aberration": ("number", False),
    "amplitude_contrast": ("number", False),
    "bfactor": ("number", False),
    "shift_sigma": ("number", False),
    "preferred_fraction": ("number", False),
    "preferred_sigma": ("number", False),
    "contrast_sigma": ("number", False),
    "molecule_seed": ("int", True),
}
_KIND_NAMES = {
    "str": "a string",
    "int": "an integer",
    "number": "a finite number",
    "range": "a [low, high] pair of numbers",
}


def _is_kind(value, kind: str) -> bool:
    # bool is an int subclass in Python, but `true` is no box size.
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if kind == "number":
        return (
            isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool)
            and math.isfinite(value)
        )
    if kind == "range":
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_kind(v, "number") for v in value)
    raise AssertionError(kind)


# Suites: the default one runs the local leaderboard on a laptop CPU (config/config.yaml's entries);
# the tiny one runs in CI.
SUITES: dict[str, tuple[SimulationSpec, ...]] = {
    "default": (
        SimulationSpec("sim_c1", symmetry="C1", box_size=64, pixel_size=2.13, n_particles=3000, snr=0.5, seed=11),
        SimulationSpec(
            "sim_c4",
            symmetry="C4",
            box_size=64,
            pixel_size=2.13,
            n_particles=3000,
            snr=0.5,
            seed=12,
            preferred_fraction=0.3,
        ),
        SimulationSpec("sim_d2", symmetry="D2", box_size=64, pixel_size=2.13, n_particles=3000, snr=0.5, seed=13),
    ),
    "tiny": (
        SimulationSpec("tiny_c1", symmetry="C1", box_size=32, pixel_size=4.1, n_particles=300, snr=0.5, seed=21),
        SimulationSpec("tiny_c2", symmetry="C2", box_size=32, pixel_size=4.1, n_particles=300, snr=0.5, seed=22),
        SimulationSpec("tiny_d2", symmetry="D2", box_size=32, pixel_size=4.1, n_particles=300, snr=0.5, seed=23),
    ),
}


# ----------------------------------------------------------------------------------------------
# Densities
# ----------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _perpendicular_basis(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0, 0]) if abs(axis[0]) < 0.9 else np.array([0, 1.0, 0])
    u = _unit(np.cross(axis, helper))
    return u, np.cross(axis, u)


class _ChainBuilder:
    """Grows a C-alpha-like chain of helices, β-hairpins and loops inside an allowed region."""

    CA_CLASH = 3.6  # Å: closest approach of two residues from different segments

    def __init__(self, rng: np.random.Generator, inside, pool: np.ndarray):
        # pool: points sampled uniformly in the allowed region (restart sites; its mean is the centre)
        self.rng, self.inside, self.pool = rng, inside, pool
        self.centre = pool[np.argmin(np.linalg.norm(pool - pool.mean(0), axis=1))]
        self.residues: list[np.ndarray] = []
        self.atoms: list[np.ndarray] = []  # (k, 4): x, y, z, weight
        self.tree: cKDTree | None = None
        self.pos = self.centre.copy()
        self.direction = _unit(rng.normal(size=3))

    def _free(self, points: np.ndarray) -> bool:
        if not self.inside(points).all():
            return False
        if self.tree is None:
            return True
        return all(len(n) == 0 for n in self.tree.query_ball_point(points, self.CA_CLASH))

    def _commit(self, ca: np.ndarray, atoms: np.ndarray) -> None:
        self.residues.append(ca)
        self.atoms.append(atoms)
        self.tree = cKDTree(np.concatenate(self.residues))
        self.pos = ca[-1]

    def _propose_direction(self) -> np.ndarray:
        # Persistence plus a pull towards the centre keeps the fold compact, like a globular protein.
        to_centre = self.centre - self.pos
        pull = to_centre / (np.linalg.norm(to_centre) + 1e-9)
        return _unit(0.9 * self.rng.normal(size=3) + 0.5 * self.direction + 0.6 * pull)

    def helix(self, n: int) -> bool:
        axis = self._propose_direction()
        u, v = _perpendicular_basis(axis)
        start = self.pos + 4.0 * axis
        i = np.arange(n)
        phase = np.deg2rad(100.0) * i
        radial = np.cos(phase)[:, None] * u + np.sin(phase)[:, None] * v
        ca = start + 1.5 * i[:, None] * axis + 2.3 * radial
        if not self._free(ca):
            return False
        side = start + 1.5 * i[:, None] * axis + 4.6 * radial
        backbone = start + 1.5 * i[:, None] * axis + 1.6 * np.roll(radial, 1, axis=0)
        self._commit(ca, self._weighted(ca, backbone, side))
        self.direction = axis
        return True

    def hairpin(self, n: int) -> bool:
        axis = self._propose_direction()
        u, _ = _perpendicular_basis(axis)
        i = np.arange(n)
        zig = (-1.0) ** i
        start = self.pos + 3.8 * axis
        strand1 = start + 3.3 * i[:, None] * axis + 0.9 * zig[:, None] * u
        sheet_normal = np.cross(axis, u)
        # Antiparallel partner 4.8 Å away in the sheet plane: the β-sheet spacing.
        strand2 = strand1[::-1] + 4.8 * u
        ca = np.concatenate([strand1, strand2])
        if not self._free(ca):
            return False
        zz = np.concatenate([zig, zig[::-1]])
        side = ca + 3.0 * zz[:, None] * sheet_normal
        backbone = ca + 1.5 * axis * np.concatenate([np.ones(n), -np.ones(n)])[:, None]
        self._commit(ca, self._weighted(ca, backbone, side))
        self.direction = -axis
        return True

    def loop(self, n: int) -> bool:
        points = []
        pos, direction = self.pos, self.direction
        for _ in range(n):
            direction = _unit(direction + 0.8 * self.rng.normal(size=3) + 0.3 * _unit(self.centre - pos))
            pos = pos + 3.8 * direction
            points.append(pos)
        ca = np.array(points)
        if not self._free(ca):
            return False
        side = ca + 2.5 * _unit(self.rng.normal(size=ca.shape))
        self._commit(ca, self._weighted(ca, ca + 1.4 * _unit(self.rng.normal(size=ca.shape)), side))
        self.direction = direction
        return True

    @staticmethod
    def _weighted(ca, backbone, side) -> np.ndarray:
        # Weights ~ electrons: C-alpha+N (13), C+O (14), side chain (~20, a few heavy atoms).
        return np.concatenate(
            [
                np.c_[ca, np.full(len(ca), 13.0)],
                np.c_[backbone, np.full(len(ca), 14.0)],
                np.c_[side, np.full(len(ca), 20.0)],
            ]
        )

    def grow(self, n_residues: int) -> np.ndarray:
        failures = 0
        while sum(len(r) for r in self.residues) < n_residues and failures < 300:
            kind = self.rng.choice(["helix", "hairpin", "loop"], p=[0.5, 0.25, 0.25])
            ok = (
                self.helix(int(self.rng.integers(8, 19)))
                if kind == "helix"
                else self.hairpin(int(self.rng.integers(4, 8)))
                if kind == "hairpin"
                else self.loop(int(self.rng.integers(2, 6)))
            )
            if ok:
                failures = 0
                continue
            failures += 1
            if failures % 20 == 0:
                # Stuck: restart growth from a random free point (a new domain of the same fold).
                for _ in range(50):
                    candidate = self.pool[self.rng.integers(len(self.pool))]
                    if self._free(candidate[None]):
                        self.pos = candidate
                        break
        if not self.atoms:
            raise RuntimeError("pseudo_molecule: could not place any residue; region too small")
        return np.concatenate(self.atoms)


def _asymmetric_unit_direction(group: np.ndarray) -> np.ndarray:
    """The direction farthest from all its symmetry copies (the centre of a roomy asymmetric unit)."""
    k = np.arange(400) + 0.5
    z = 1 - 2 * k / 400
    phi = np.pi * (1 + 5**0.5) * k
    cand = np.c_[np.sqrt(1 - z**2) * np.cos(phi), np.sqrt(1 - z**2) * np.sin(phi), z]
    if len(group) == 1:
        return cand[0]
    copies = np.einsum("gij,nj->ngi", group[1:], cand)
    nearest = np.einsum("ngi,ni->ng", copies, cand).max(-1)  # cosine to the closest copy
    return cand[np.argmin(nearest)]


def pseudo_molecule(
    box_size: int,
    pixel_size: float,
    symmetry: str = "C1",
    seed: int = 0,
    diameter: float | None = None,
    bfactor: float = 30.0,
) -> np.ndarray:
    """A deterministic protein-like density with point symmetry.

    One asymmetric unit is grown as a chain of α-helices (1.5 Å rise, 100° per residue, 2.3 Å
    radius), antiparallel β-hairpins (3.3 Å per residue, 4.8 Å strand spacing) and loops, packed
    into the part of a sphere of the given diameter that belongs to the identity in the
    symmetry group's Dirichlet partition; the group's operators then place the other copies, so
    the map is exactly symmetric and the copies do not overlap.

    Args:
        box_size: D, voxels per side.
        pixel_size: Å per voxel.
        symmetry: RELION point group name.
        seed: the same seed gives the same map.
        diameter: Å; default 60 % of the box.
        bfactor: Å², Gaussian blur of every atom.

    Returns:
        ``(D, D, D)`` float32 map indexed ``[z, y, x]``, maximum 1.
    """
    rng = np.random.default_rng(seed)
    group = symmetry_matrices(symmetry).numpy()
    radius = 0.5 * (diameter or 0.6 * box_size * pixel_size)
    # A generic direction picks the asymmetric unit; C1's unit is the whole sphere.
    seed_dir = _asymmetric_unit_direction(group)
    images = seed_dir @ np.transpose(group, (0, 2, 1))  # (G, 3): g · seed_dir
    if len(group) == 1:
        scale = np.array([1.0, 0.85, 0.7])  # an ellipsoid: asymmetric maps get no accidental symmetry
    else:
        scale = np.array([1.0, 1.0, 1.0])

    # The ellipsoid's orientation is drawn from the seed too, so maps of other seeds differ in shape.
    axes = np.linalg.qr(rng.normal(size=(3, 3)))[0] if len(group) == 1 else np.eye(3)

    def inside(points: np.ndarray) -> np.ndarray:
        in_sphere = ((((points @ axes) / scale) ** 2).sum(-1)) <= radius**2
        if len(group) == 1:
            return in_sphere
        dots = points @ images.T
        # Keep 1.5 Å clear of the cell walls so symmetry copies do not clash.
        return in_sphere & (dots[:, 0] >= dots[:, 1:].max(-1) + 1.5)

    box_pts = rng.uniform(-radius, radius, size=(40000, 3))
    pool = box_pts[inside(box_pts)]
    if len(pool) < 10:
        raise ValueError(
            f"pseudo_molecule: a {2 * radius:.0f} Å molecule leaves no room for the asymmetric "
            f"unit of {symmetry}; use a larger diameter or box"
        )
    volume_a3 = 4 / 3 * math.pi * radius**3 * scale.prod() / len(group)
    # ~135 Å³ per residue in a folded protein; a random fold packs about half as densely.
    n_residues = int(0.5 * volume_a3 / 135.0)
    atoms = _ChainBuilder(rng, inside, pool).grow(max(n_residues, 10))
    all_atoms = np.concatenate([np.c_[atoms[:, :3] @ g.T, atoms[:, 3]] for g in group])
    vol = map_from_atoms(all_atoms[:, :3], all_atoms[:, 3], box_size, pixel_size, bfactor)
    return vol / vol.max()


def map_from_atoms(
    coords: np.ndarray, weights: np.ndarray, box_size: int, pixel_size: float, bfactor: float = 30.0
) -> np.ndarray:
    """Render atoms as Gaussians on a grid.

    Atoms are spread onto the grid with trilinear weights, then blurred with a Gaussian of the
    atoms' B-factor (σ = √(B/8π²) Å) and half a voxel, which together stand for the atomic
    scattering profile at the sampling used here.

    Args:
        coords: ``(N, 3)`` x, y, z in Å relative to the box centre (voxel ``D//2``).
        weights: ``(N,)`` scattering weights (e.g. electrons).
        box_size: D.
        pixel_size: Å per voxel.
        bfactor: Å².

    Returns:
        ``(D, D, D)`` float32 map indexed ``[z, y, x]``.
    """
    d = box_size
    grid = np.zeros((d, d, d), dtype=np.float64)
    p = coords / pixel_size + d // 2  # voxel coordinates x, y, z
    base = np.floor(p).astype(int)
    frac = p - base
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = (
                    weights
                    * np.where(dx, frac[:, 0], 1 - frac[:, 0])
                    * np.where(dy, frac[:, 1], 1 - frac[:, 1])
                    * np.where(dz, frac[:, 2], 1 - frac[:, 2])
                )
                ix, iy, iz = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                ok = (ix >= 0) & (ix < d) & (iy >= 0) & (iy < d) & (iz >= 0) & (iz < d)
                np.add.at(grid, (iz[ok], iy[ok], ix[ok]), w[ok])
    sigma_px = math.sqrt(bfactor / (8 * math.pi**2) / pixel_size**2 + 0.25)
    return ndimage.gaussian_filter(grid, sigma_px, mode="constant").astype(np.float32)


def map_from_model_file(path: str | Path, box_size: int, pixel_size: float) -> np.ndarray:
    """Density of an atomic model (PDB or mmCIF, read with gemmi), centred in the box.

    Every atom of the first model counts with its atomic number as weight and the median
    B-factor of the model as blur (hydrogens are skipped).
    """
    import gemmi

    path = Path(path)
    try:
        structure = gemmi.read_structure(str(path))
    except Exception as err:  # gemmi raises RuntimeError/ValueError with its own text
        raise InputError(f"cannot read atomic model: {err}", path=path) from err
    if len(structure) == 0:
        raise InputError("the model file holds no model", path=path)
    coords, weights, bfactors = [], [], []
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                if atom.element.name in ("H", "D"):
                    continue
                coords.append(atom.pos.tolist())
                weights.append(atom.element.atomic_number)
                bfactors.append(atom.b_iso)
    if not coords:
        raise InputError("the model has no non-hydrogen atoms", path=path)
    xyz = np.asarray(coords)
    xyz = xyz - xyz.mean(0)
    extent = 2 * np.abs(xyz).max()
    if extent > box_size * pixel_size:
        raise InputError(
            f"the model spans {extent:.0f} Å but the box is only "
            f"{box_size}×{pixel_size} = {box_size * pixel_size:.0f} Å: enlarge box_size or pixel_size",
            path=path,
        )
    vol = map_from_atoms(
        xyz, np.asarray(weights, float), box_size, pixel_size, float(np.median(bfactors)) if bfactors else 30.0
    )
    return vol / vol.max()


def map_from_mrc(path: str | Path, box_size: int, pixel_size: float) -> np.ndarray:
    """A user map resampled to ``pixel_size`` (Fourier cropping/padding) and cropped/padded to the box."""
    vol, src_px = io.read_map(path)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"expected a cubic 3D map, got shape {vol.shape}", path=path)
    bad = int(np.count_nonzero(~np.isfinite(vol)))
    if bad:
        # Caught here, not as non-finite particle images many steps later.
        raise InputError(f"the source map holds {bad} NaN or infinite voxel(s); a source map must be finite", path=path)
    if src_px <= 0:
        raise InputError("the map header has no pixel size (voxel_size is 0)", path=path)
    n = vol.shape[0]
    target_n = int(round(n * src_px / pixel_size / 2)) * 2
    if target_n != n:
        ft = np.fft.fftshift(np.fft.fftn(vol))
        out = np.zeros((target_n,) * 3, dtype=complex)
        m = min(n, target_n)
        s_src, s_dst = n // 2 - m // 2, target_n // 2 - m // 2
        out[s_dst : s_dst + m, s_dst : s_dst + m, s_dst : s_dst + m] = ft[
            s_src : s_src + m, s_src : s_src + m, s_src : s_src + m
        ]
        vol = np.fft.ifftn(np.fft.ifftshift(out)).real * (target_n / n) ** 3
        n = target_n
    out = np.zeros((box_size,) * 3, dtype=np.float32)
    m = min(n, box_size)
    s_src, s_dst = n // 2 - m // 2, box_size // 2 - m // 2
    out[s_dst : s_dst + m, s_dst : s_dst + m, s_dst : s_dst + m] = vol[
        s_src : s_src + m, s_src : s_src + m, s_src : s_src + m
    ]
    peak = np.abs(out).max()
    if not peak > 0:
        raise InputError("the source map is zero everywhere inside the box: nothing to project", path=path)
    return out / peak


def source_density(spec: SimulationSpec) -> np.ndarray:
    """The true map of a spec: built-in pseudo-molecule, or the user's map or model."""
    if spec.source == "pseudo":
        seed = spec.seed if spec.molecule_seed is None else spec.molecule_seed
        return pseudo_molecule(spec.box_size, spec.pixel_size, spec.symmetry, seed, spec.molecule_diameter)
    path = Path(spec.source)
    if not path.exists():
        raise InputError("source file not found (expected 'pseudo', an .mrc map or a .pdb/.cif model)", path=path)
    if path.suffix.lower() in (".mrc", ".map", ".mrcs"):
        return map_from_mrc(path, spec.box_size, spec.pixel_size)
    return map_from_model_file(path, spec.box_size, spec.pixel_size)


# ----------------------------------------------------------------------------------------------
# Particles
# ----------------------------------------------------------------------------------------------


def sample_poses(
    n: int, generator: torch.Generator, preferred_fraction: float = 0.0, preferred_sigma: float = 20.0
) -> torch.Tensor:
    """``(n, 3, 3)`` poses: uniform on SO(3), except a share drawn near top views.

    The preferred share has tilt ``|N(0, preferred_sigma)|`` (beam along the map's z axis) with
    uniform rot and psi — the usual preferred orientation of particles lying flat on the grid.
    """
    poses = random_rotations(n, generator=generator)
    if preferred_fraction > 0:
        pick = torch.rand(n, generator=generator, dtype=torch.float64) < preferred_fraction
        k = int(pick.sum())
        if k:
            angles = torch.stack(
                [
                    torch.rand(k, generator=generator, dtype=torch.float64) * 360 - 180,
                    (torch.randn(k, generator=generator, dtype=torch.float64) * preferred_sigma).abs() % 180,
                    torch.rand(k, generator=generator, dtype=torch.float64) * 360 - 180,
                ],
                -1,
            )
            poses[pick] = euler_to_matrix(angles)
    return poses


def _fourier_shift_phase(shifts_px: torch.Tensor, image_size: int) -> torch.Tensor:
    """``(B, S, S//2+1)`` phase factors that move an image by ``shifts_px`` ``(B, 2)`` (x, y) pixels."""
    ky = torch.fft.fftfreq(image_size, dtype=torch.float64)
    kx = torch.fft.rfftfreq(image_size, dtype=torch.float64)
    phase = (
        -2j
        * math.pi
        * (shifts_px[:, 0, None, None] * kx[None, None, :] + shifts_px[:, 1, None, None] * ky[None, :, None])
    )
    return torch.exp(phase)


def simulate_images(
    volume: torch.Tensor, poses: torch.Tensor, shifts_px: torch.Tensor, ctf: torch.Tensor, contrast: torch.Tensor
) -> torch.Tensor:
    """Noise-free particle images.

    Args:
        volume: ``(D, D, D)`` map indexed ``[z, y, x]``.
        poses: ``(B, 3, 3)`` pose matrices R (image → volume coordinates).
        shifts_px: ``(B, 2)`` displacement (x, y) of each particle from the box centre, pixels.
        ctf: ``(B, D, D//2+1)`` CTF in ``rfft2`` layout.
        contrast: ``(B,)`` per-particle scale.

    Returns:
        ``(B, D, D)`` float32 images, box centre at ``D//2``.
    """
    from torch_fourier_slice import project_3d_to_2d

    d = volume.shape[-1]
    proj = project_3d_to_2d(volume.float(), poses.float(), pad_factor=2.0).double()
    ft = torch.fft.rfft2(torch.fft.ifftshift(proj, dim=(-2, -1)))
    ft = ft * _fourier_shift_phase(shifts_px.double(), d) * ctf.double()
    images = torch.fft.fftshift(torch.fft.irfft2(ft, s=(d, d)), dim=(-2, -1))
    return (images * contrast.double()[:, None, None]).float()


def _signal_mask(box: int, diameter_px: float) -> torch.Tensor:
    c = torch.arange(box, dtype=torch.float64) - box // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) <= (diameter_px / 2) ** 2


def _particle_parameters(spec: SimulationSpec, n: int, g: torch.Generator) -> pd.DataFrame:
    poses = sample_poses(n, g, spec.preferred_fraction, spec.preferred_sigma)
    angles = matrix_to_euler(poses)
    shifts = (torch.randn(n, 2, generator=g, dtype=torch.float64) * spec.shift_sigma).clamp(
        -3 * spec.shift_sigma, 3 * spec.shift_sigma
    )
    lo, hi = spec.defocus_range
    mean_def = (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)) * 1e4  # Å
    astig = torch.rand(n, generator=g, dtype=torch.float64) * spec.astigmatism_max * 1e4
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 180.0
    contrast = (1 + spec.contrast_sigma * torch.randn(n, generator=g, dtype=torch.float64)).clamp(0.3, 1.7)
    # Confidence rises with the particle's contrast, with scatter: RELION's posterior maximum is
    # high for particles whose signal stands clearly above the noise.
    noise = 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    confidence = (1 - torch.exp(-1.2 * contrast**2) + noise).clamp(0.01, 1.0)
    return pd.DataFrame(
        {
            "rlnAngleRot": angles[:, 0].numpy(),
            "rlnAngleTilt": angles[:, 1].numpy(),
            "rlnAnglePsi": angles[:, 2].numpy(),
            "rlnOriginXAngst": (-shifts[:, 0] * spec.pixel_size).numpy(),
            "rlnOriginYAngst": (-shifts[:, 1] * spec.pixel_size).numpy(),
            "rlnDefocusU": (mean_def + astig / 2).numpy(),
            "rlnDefocusV": (mean_def - astig / 2).numpy(),
            "rlnDefocusAngle": angle.numpy(),
            "rlnCtfBfactor": np.full(n, spec.bfactor),
            "rlnMaxValueProbDistribution": confidence.numpy(),
            "_contrast": contrast.numpy(),
        }
    )


def _optics_table(spec: SimulationSpec) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [spec.pixel_size],
            "rlnImageSize": [spec.box_size],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [spec.voltage],
            "rlnSphericalAberration": [spec.spherical_aberration],
            "rlnAmplitudeContrast": [spec.amplitude_contrast],
        }
    )


def _write_half(
    spec: SimulationSpec,
    volume: torch.Tensor,
    half: int,
    folder: Path,
    noise_sigma: float | None,
    batch_size: int,
    progress: tqdm | None,
) -> float:
    g = torch.Generator().manual_seed(spec.seed * 1000 + half)
    params = _particle_parameters(spec, spec.n_particles, g)
    d = spec.box_size
    stack_name = f"particles_{half}.mrcs"
    optics = _optics_table(spec)
    with io.StackWriter(folder / stack_name, spec.n_particles, d, spec.pixel_size) as writer:
        for start in range(0, spec.n_particles, batch_size):
            rows = params.iloc[start : start + batch_size]
            poses = euler_to_matrix(torch.tensor(rows[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()))
            shifts = -torch.tensor(rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()) / spec.pixel_size
            ctf = ctf_mod.ctf_2d(
                torch.tensor(rows["rlnDefocusU"].to_numpy()),
                torch.tensor(rows["rlnDefocusV"].to_numpy()),
                torch.tensor(rows["rlnDefocusAngle"].to_numpy()),
                spec.voltage,
                spec.spherical_aberration,
                spec.amplitude_contrast,
                spec.pixel_size,
                d,
                bfactor=spec.bfactor,
            )
            clean = simulate_images(volume, poses, shifts, ctf, torch.tensor(rows["_contrast"].to_numpy()))
            if noise_sigma is None:
                # One noise level for the entry, from the signal variance of the first batch
                # inside the molecule's circle: SNR = var(signal) / var(noise) there.
                inside = _signal_mask(d, spec.diameter / spec.pixel_size)
                signal_var = float(clean.double()[:, inside].var(dim=-1).mean())
                noise_sigma = math.sqrt(signal_var / spec.snr)
            noise = torch.randn(clean.shape, generator=g, dtype=torch.float32) * noise_sigma
            writer.write(start, (clean + noise).numpy())
            if progress is not None:
                progress.update(len(rows))
    particles = params.drop(columns="_contrast")
    particles.insert(0, "rlnImageName", [f"{i + 1:06d}@{stack_name}" for i in range(spec.n_particles)])
    particles.insert(1, "rlnOpticsGroup", 1)
    particles["rlnRandomSubset"] = half + 1
    io.write_particles_star(folder / f"particles_{half}.star", io.ParticleStar(optics=optics, particles=particles))
    with io.atomic_write(folder / f"info_{half}.json") as tmp:
        Path(tmp).write_text(json.dumps({"symmetry": parse_symmetry(spec.symmetry)}) + "\n")
    return noise_sigma


def simulate_entry(
    spec: SimulationSpec,
    benchmark_dir: str | Path,
    overwrite: bool = False,
    batch_size: int = 256,
    progress: bool = True,
) -> Path:
    """Write one simulated entry to ``benchmark_dir/spec.name`` and return that folder.

    The entry is built in a temporary sibling folder and renamed into place at the end, so an
    interrupted run never leaves a half-written entry. An existing entry made from the same spec
    is kept (the call is idempotent); one made from another spec is an error unless
    ``overwrite``.
    """
    spec.validate()
    benchmark_dir = Path(benchmark_dir)
    target = benchmark_dir / spec.name
    if target.exists():
        existing = target / "simulation.json"
        same = existing.exists() and json.loads(existing.read_text()) == spec.to_json()
        if same and not overwrite:
            return target
        if not overwrite:
            raise InputError(
                "an entry made from different parameters (or a real entry) is already here; "
                "pass overwrite=True (--overwrite) to replace it",
                path=target,
            )
    with io.staged_folder(target) as work:
        volume = source_density(spec)
        io.write_map(work / f"{spec.name}_source_map.mrc", volume, spec.pixel_size)
        io.write_map(work / f"{spec.name}_mask.mrc", soft_mask_from_map(volume), spec.pixel_size)
        vol_t = torch.from_numpy(volume)
        bar = tqdm(total=2 * spec.n_particles, desc=f"simulate {spec.name}", unit="img", disable=not progress)
        with bar:
            sigma = _write_half(spec, vol_t, 0, work, None, batch_size, bar)
            _write_half(spec, vol_t, 1, work, sigma, batch_size, bar)
        (work / "simulation.json").write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return target


def simulate_suite(
    suite: str,
    benchmark_dir: str | Path,
    entries: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Simulate every entry of a named suite (``SUITES``), or the named subset of it."""
    if suite not in SUITES:
        raise InputError(f"unknown suite {suite!r}; expected one of {sorted(SUITES)}", where="suite")
    specs = SUITES[suite]
    if entries:
        names = {s.name for s in specs}
        missing = sorted(set(entries) - names)
        if missing:
            raise InputError(f"entries {missing} are not in suite {suite!r} (it has {sorted(names)})", where="entries")
        specs = tuple(s for s in specs if s.name in entries)
    return [simulate_entry(s, benchmark_dir, overwrite=overwrite, progress=progress) for s in specs]
