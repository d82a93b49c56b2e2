"""``ParticlesDataset``: one half of a benchmark entry as a PyTorch dataset.

Compatible with the CESPED package's interface: ``dataset[i]`` returns
``(particle_id, image[1, S, S], (rotmat[3, 3], shift_angstrom[2], confidence[1]), metadata)`` and
the dataset has ``symmetry``, ``image_size``, ``sampling_rate``, ``update_md`` and ``save_md``.
Images are read through a memory map opened lazily in each process (safe with DataLoader
workers), preprocessed (normalise → CTF correction → crop → resize) and optionally augmented
with labels kept true (:mod:`cryopose.augment`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from . import io
from .augment import AugmentConfig, augment_batch
from .ctf import ctf_from_parameters, ctf_parameters
from .entry import DEFAULT_BENCHMARK_DIR, Entry, resolve_entry
from .errors import InputError
from .geometry import euler_to_matrix, is_rotation_matrix, matrix_to_euler
from .predictions import EULER, ORIGIN
from .preprocess import PreprocessConfig, output_geometry, preprocess_images
from .symmetry import cesped_canonical_mate, symmetry_mates

__all__ = ["ParticlesDataset", "DEFAULT_BENCHMARK_DIR"]


class ParticlesDataset(Dataset):
    """One half of an entry.

    Args:
        entry: entry name in ``benchmark_dir``, an entry folder, a plain particle STAR file, or an
            :class:`~cryopose.entry.Entry`.
        halfset: 0 or 1.
        benchmark_dir: folder holding entries (default ``resources/benchmark`` or
            ``$CRYOPOSE_BENCHMARK_DIR``).
        image_size: final image size in pixels (``None``: the cropped box).
        crop_fraction: central fraction of the box kept before resizing.
        normalise: background mean 0, std 1 outside the inscribed circle.
        ctf_correction: ``"phase_flip"`` (default), ``"wiener"`` or ``None``. Particles whose optics
            group says rlnCtfDataArePhaseFlipped = 1 are not corrected twice.
        wiener_constant: 1/SNR constant of the Wiener filter.
        augment: an :class:`~cryopose.augment.AugmentConfig` (or ``True`` for the paper's) to
            augment every image, with labels updated; ``None``/``False`` for none.
        generator: torch generator for reproducible augmentation.
        cesped_compatible: return each rotation label reduced to one symmetry mate, as the CESPED
            package's dataset does (:func:`~cryopose.symmetry.cesped_canonical_mate`, after any
            augmentation); by default the label is the raw pose (mates: :meth:`symmetry_mates`).
        symmetry: the point group when ``entry`` is a plain particle STAR file
            (:class:`~cryopose.entry.StarEntry`: its halves are rlnRandomSubset 1 and 2).

    Items: ``(particle_id: str, image: float32[1, S, S], (rotmat: float32[3, 3],
    shift_angstrom: float32[2], confidence: float32[1]), metadata: dict)``. ``particle_id`` is
    the particle's rlnImageName; shifts are RELION origins (rlnOriginX/YAngst) in Å; confidence
    is rlnMaxValueProbDistribution (1 when absent); metadata holds the particle's STAR row plus
    ``sampling_rate``. Missing angles give NaN rotation matrices.
    """

    def __init__(
        self,
        entry=None,
        halfset: int | None = None,
        benchmark_dir: str | Path | None = None,
        *,
        image_size: int | None = None,
        crop_fraction: float = 1.0,
        normalise: bool = True,
        ctf_correction: str | None = "phase_flip",
        wiener_constant: float = 0.1,
        augment: AugmentConfig | bool | None = None,
        generator: torch.Generator | None = None,
        cesped_compatible: bool = False,
        targetName=None,
        benchmarkDir=None,
        symmetry: str | None = None,
    ):
        # CESPED's keyword names, so ParticlesDataset(targetName=..., halfset=..., benchmarkDir=...) ports as is.
        entry = entry if entry is not None else targetName
        benchmark_dir = benchmark_dir if benchmark_dir is not None else benchmarkDir
        if entry is None or halfset is None:
            raise TypeError("ParticlesDataset needs an entry (name, folder or Entry) and a halfset (0 or 1)")
        if isinstance(ctf_correction, str) and ctf_correction.lower() == "none":
            ctf_correction = None
        self.entry = resolve_entry(entry, benchmark_dir, symmetry=symmetry)
        self.halfset = halfset
        self.star_path = self.entry.star_path(halfset)
        star = self.entry.read_star(halfset)
        self._optics = star.optics.copy()
        self._table = star.particles.copy().reset_index(drop=True)
        merged = io.particles_with_optics(star).reset_index(drop=True)
        sizes = merged["rlnImageSize"].to_numpy(dtype=np.int64)
        pixel_sizes = merged["rlnImagePixelSize"].to_numpy(dtype=np.float64)
        if len(np.unique(sizes)) != 1 or len(np.unique(pixel_sizes)) != 1:
            raise InputError(
                f"particles have several box sizes {np.unique(sizes).tolist()} or pixel sizes "
                f"{np.unique(pixel_sizes).tolist()}; a dataset needs one of each",
                path=self.star_path,
                where="data_optics",
            )
        self.original_box_size = int(sizes[0])
        self.original_sampling_rate = float(pixel_sizes[0])
        self.config = PreprocessConfig(
            normalise=normalise,
            ctf_correction=ctf_correction,
            wiener_constant=wiener_constant,
            crop_fraction=crop_fraction,
            image_size=image_size,
        )
        _, self._image_size, self._sampling_rate = output_geometry(
            self.original_box_size, self.original_sampling_rate, self.config
        )
        self.augment = AugmentConfig() if augment is True else (augment or None)
        self.generator = generator
        self.cesped_compatible = bool(cesped_compatible)
        flipped = merged.get("rlnCtfDataArePhaseFlipped", pd.Series(0, index=merged.index)).to_numpy()
        self._already_flipped = flipped.astype(bool)

        # CTF columns are validated once here; batches then only index these tensors.
        self._ctf_params = (
            ctf_parameters(merged, source=str(self.star_path)) if self.config.ctf_correction is not None else {}
        )
        stacks, index = [], np.empty(len(merged), dtype=np.int64)
        stack_of = np.empty(len(merged), dtype=np.int64)
        seen: dict[str, int] = {}
        for row, name in enumerate(merged["rlnImageName"]):
            i, stack = io.parse_image_name(name, self.star_path, row)
            if stack not in seen:
                seen[stack] = len(stacks)
                stacks.append(io.resolve_stack_path(self.star_path, stack))
            index[row], stack_of[row] = i, seen[stack]
        self._stack_paths = stacks
        self._image_index, self._stack_of = index, stack_of
        for k, path in enumerate(stacks):
            n, ny, nx = io.stack_shape(path)
            if (ny, nx) != (self.original_box_size,) * 2:
                raise InputError(
                    f"stack images are {ny}×{nx} but the STAR says rlnImageSize {self.original_box_size}",
                    path=path,
                    where="box size",
                )
            highest = int(index[stack_of == k].max())
            if highest >= n:
                raise InputError(
                    f"particles refer to image {highest + 1} (1-based) but the stack holds {n}",
                    path=self.star_path,
                    where=f"rlnImageName ({path.name})",
                )
        self._ids = merged["rlnImageName"].astype(str).tolist()
        # The same image under two spellings (7@x.mrcs, 000007@./x.mrcs) is one particle: io's
        # particle_keys is the single definition.
        io.check_unique_particles(self._ids, self.star_path)
        self._row_of_id = {pid: i for i, pid in enumerate(self._ids)}
        self._refresh_labels()
        self._stacks: dict[int, object] = {}
        self._pid = None

    # ------------------------------------------------------------------ properties
    @property
    def symmetry(self) -> str:
        return self.entry.symmetry

    @property
    def image_size(self) -> int:
        """Side in pixels of the images this dataset returns."""
        return self._image_size

    @property
    def sampling_rate(self) -> float:
        """Å per pixel of the images this dataset returns."""
        return self._sampling_rate

    @property
    def particle_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def metadata(self) -> pd.DataFrame:
        """The particle table (RELION 3.1 columns), with any predictions given to :meth:`update_md`."""
        return self._table.copy()

    def __len__(self) -> int:
        return len(self._ids)

    # ------------------------------------------------------------------ reading
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_stacks"], state["_pid"] = {}, None  # memory maps are reopened in each worker
        return state

    def _stack(self, k: int):
        if self._pid != os.getpid():
            self._stacks, self._pid = {}, os.getpid()
        if k not in self._stacks:
            self._stacks[k] = io.open_stack(self._stack_paths[k])
        return self._stacks[k]

    def _refresh_labels(self) -> None:
        t = self._table
        if all(c in t.columns for c in EULER):
            self._rotmats = euler_to_matrix(torch.tensor(t[EULER].to_numpy(dtype=np.float64))).float()
        else:
            self._rotmats = torch.full((len(t), 3, 3), float("nan"))
        if all(c in t.columns for c in ORIGIN):
            self._shifts = torch.tensor(t[ORIGIN].to_numpy(dtype=np.float64)).float()
        else:
            self._shifts = torch.zeros(len(t), 2)
        conf = (
            t["rlnMaxValueProbDistribution"]
            if "rlnMaxValueProbDistribution" in t.columns
            else pd.Series(1.0, index=t.index)
        )
        self._confidence = torch.tensor(conf.to_numpy(dtype=np.float64)).float()[:, None]

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            bad = int(idx[(idx < -n) | (idx >= n)][0])
            raise IndexError(f"particle index {bad} out of range for {n} particles in {self.star_path}")
        return idx % n if len(idx) else idx

    def read_raw(self, indices: Sequence[int]) -> torch.Tensor:
        """``(B, S0, S0)`` float32 images as stored, contiguous runs read at once."""
        idx = self._check_indices(indices)
        out = torch.empty(len(idx), self.original_box_size, self.original_box_size)
        for k in np.unique(self._stack_of[idx]):
            sel = np.flatnonzero(self._stack_of[idx] == k)
            out[sel] = torch.from_numpy(io.read_images(self._stack(int(k)), self._image_index[idx[sel]]))
        finite = torch.isfinite(out).flatten(1).all(1)
        if not bool(finite.all()):
            # A NaN pixel would silently poison a whole batch's loss or a reconstruction.
            i = int(idx[int(torch.nonzero(~finite)[0])])
            stack = self._stack_paths[int(self._stack_of[i])]
            raise InputError(
                f"image {int(self._image_index[i]) + 1} of this stack has NaN or infinite pixels; "
                f"finite values expected",
                path=stack,
                where=f"particle {self._ids[i]} (row {i + 1} of {self.star_path.name})",
            )
        return out

    def get_batch(self, indices: Sequence[int]):
        """A batch in one go: ``(ids, images[B, 1, S, S], (rotmats[B, 3, 3], shifts[B, 2],
        confidence[B, 1]), metadata: list of dicts)``. Neighbouring indices are read with one slice."""
        idx = self._check_indices(indices)
        raw = self.read_raw(idx)
        images = self._preprocess(raw, idx)
        rot, shifts, conf = self._rotmats[idx].clone(), self._shifts[idx].clone(), self._confidence[idx].clone()
        if self.augment is not None:
            # Shifts are in Å, so the preprocessed pixel size converts them.
            images, rot, shifts = augment_batch(images, rot, shifts, self.sampling_rate, self.augment, self.generator)
        if self.cesped_compatible:  # CESPED reduces the label after augmenting
            rot = cesped_canonical_mate(rot, self.symmetry)
        records = self._table.iloc[idx].to_dict("records")
        for r in records:
            r["sampling_rate"] = self.sampling_rate
        return [self._ids[i] for i in idx], images[:, None], (rot, shifts, conf), records

    def _preprocess(self, raw: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        config = self.config
        ctf = None
        if config.ctf_correction is not None:
            params = {k: v[idx] for k, v in self._ctf_params.items()}
            ctf = ctf_from_parameters(
                params, self.original_box_size, self.original_sampling_rate, use_bfactor=False, dtype=torch.float32
            )
            # Particles already phase-flipped on disk keep their phases: a CTF of +1 leaves them be.
            flipped = torch.from_numpy(self._already_flipped[idx])
            if flipped.any():
                ctf[flipped] = 1.0
        return preprocess_images(raw, config, ctf)

    def __getitems__(self, indices: list[int]):
        """DataLoader's batched fetch: one read for the whole batch, then split into items."""
        ids, images, (rot, shifts, conf), records = self.get_batch(indices)
        return [(ids[i], images[i], (rot[i], shifts[i], conf[i]), records[i]) for i in range(len(ids))]

    def __getitem__(self, i: int):
        return self.__getitems__([int(i)])[0]

    # ------------------------------------------------------------------ labels
    def symmetry_mates(self, rotmats: torch.Tensor) -> torch.Tensor:
        """``(..., G, 3, 3)``: every pose equivalent to ``rotmats`` under the entry's group (``g·R``)."""
        return symmetry_mates(rotmats, self.symmetry)

    def update_md(
        self, ids: Sequence[str], angles, shifts=None, confidence=None, angles_format: str = "rotmat"
    ) -> None:
        """Store predictions for the particles ``ids``.

        Args:
            ids: particle ids (rlnImageName) of this dataset.
            angles: ``(N, 3, 3)`` rotation matrices (``angles_format="rotmat"``) or ``(N, 3)``
                RELION Euler angles in degrees (``"zyz_degrees"``).
            shifts: ``(N, 2)`` origins in Å (rlnOriginX/YAngst), or ``None`` to keep them.
            confidence: ``(N,)`` or ``(N, 1)`` predicted confidence, written to rlnParticleFigureOfMerit.
        """
        ids = [str(i) for i in ids]
        unknown = [i for i in ids if i not in self._row_of_id]
        if unknown:
            raise InputError(
                f"{len(unknown)} particle ids are not in this half, e.g. {unknown[0]!r}",
                path=self.star_path,
                where="update_md ids",
            )
        if len(set(ids)) != len(ids):
            raise InputError("duplicate particle ids in one update", path=self.star_path, where="update_md ids")
        n = len(ids)
        a = torch.as_tensor(np.asarray(angles, dtype=np.float64))
        if angles_format == "rotmat":
            if a.shape != (n, 3, 3):
                raise InputError(
                    f"angles must have shape ({n}, 3, 3) for angles_format='rotmat', got {tuple(a.shape)}",
                    where="update_md angles",
                )
            ok = is_rotation_matrix(a, atol=1e-3)
            if not ok.all():
                row = int(torch.nonzero(~ok)[0])
                raise InputError(
                    f"angles[{row}] is not a rotation matrix (orthonormal, det +1)", where="update_md angles"
                )
            euler = matrix_to_euler(a)
        elif angles_format == "zyz_degrees":
            if a.shape != (n, 3):
                raise InputError(
                    f"angles must have shape ({n}, 3) for angles_format='zyz_degrees', got {tuple(a.shape)}",
                    where="update_md angles",
                )
            euler = a
        else:
            raise InputError(
                f"angles_format must be 'rotmat' or 'zyz_degrees', got {angles_format!r}",
                where="update_md angles_format",
            )
        if not torch.isfinite(euler).all():
            raise InputError("angles contain NaN or infinity", where="update_md angles")
        s = c = None
        if shifts is not None:
            s = np.asarray(shifts, dtype=np.float64)
            if s.shape != (n, 2) or not np.isfinite(s).all():
                raise InputError(
                    f"shifts must be finite with shape ({n}, 2) in Å, got {s.shape}", where="update_md shifts"
                )
        if confidence is not None:
            c = np.asarray(confidence, dtype=np.float64).reshape(-1)
            if c.shape != (n,) or not np.isfinite(c).all():
                raise InputError(
                    f"confidence must be {n} finite values, got shape {np.shape(confidence)}",
                    where="update_md confidence",
                )
        # Everything is validated: apply all of it, so a bad call changes nothing.
        rows = np.array([self._row_of_id[i] for i in ids])
        self._table.loc[rows, EULER] = euler.numpy()
        if s is not None:
            self._table.loc[rows, ORIGIN] = s
        if c is not None:
            if "rlnParticleFigureOfMerit" not in self._table.columns:
                self._table["rlnParticleFigureOfMerit"] = np.nan
            self._table.loc[rows, "rlnParticleFigureOfMerit"] = c
        self._refresh_labels()

    def save_md(self, path: str | Path) -> None:
        """Write the particle table (with predictions) as a RELION 3.1 STAR, atomically.

        Image names are rewritten relative to the new file's folder so the STAR still finds the
        stack wherever it is saved. Particles without a predicted confidence get
        rlnParticleFigureOfMerit = 1.
        """
        path = Path(path)
        if path.suffix != ".star":
            raise InputError("a STAR file name must end with .star", path=path)
        table = self._table.copy()
        if "rlnParticleFigureOfMerit" in table.columns:
            table["rlnParticleFigureOfMerit"] = table["rlnParticleFigureOfMerit"].fillna(1.0)
        dest = path.parent.resolve()
        names = []
        for row in range(len(table)):
            stack = self._stack_paths[self._stack_of[row]].resolve()
            names.append(f"{self._image_index[row] + 1:06d}@{os.path.relpath(stack, dest)}")
        table["rlnImageName"] = names
        io.write_particles_star(path, io.ParticleStar(optics=self._optics, particles=table))


def write_preprocessed_entry(
    entry,
    out_dir: str | Path,
    *,
    image_size: int | None = None,
    crop_fraction: float = 1.0,
    normalise: bool = True,
    ctf_correction: str | None = "phase_flip",
    wiener_constant: float = 0.1,
    batch_size: int = 256,
    progress: bool = True,
    benchmark_dir: str | Path | None = None,
) -> Path:
    """Write a preprocessed copy of an entry to ``out_dir/<name>/`` in the same layout.

    The STAR files carry the new pixel size and box (rlnImagePixelSize, rlnImageSize), image
    names into the new stacks, and rlnCtfDataArePhaseFlipped = 1 after phase flipping, so
    RELION and :class:`ParticlesDataset` treat the copy correctly. (A Wiener-filtered stack has no
    RELION flag; it is meant for networks, not for reconstruction.) Each file is written under a
    temporary name and renamed; the mask and source map are cropped and resampled to match.
    The copy is built in a hidden sibling folder that replaces ``out_dir/<name>/`` only when
    complete, so a failure (a bad image, a full disk) leaves an earlier copy as it was.
    """
    src = resolve_entry(entry, benchmark_dir)
    src.check_independent_halves()  # halves sharing particles are refused before anything is written
    with io.staged_folder(Path(out_dir) / src.name) as work:
        _write_preprocessed(
            src,
            work,
            image_size=image_size,
            crop_fraction=crop_fraction,
            normalise=normalise,
            ctf_correction=ctf_correction,
            wiener_constant=wiener_constant,
            batch_size=batch_size,
            progress=progress,
        )
    return Path(out_dir) / src.name


def _write_preprocessed(
    src: Entry,
    dest: Path,
    *,
    image_size,
    crop_fraction,
    normalise,
    ctf_correction,
    wiener_constant,
    batch_size,
    progress,
) -> None:
    from tqdm.auto import tqdm

    from .preprocess import center_crop, fourier_resize_map

    total = sum(src.n_particles(h) for h in src.halves)
    bar = tqdm(total=total, desc=f"preprocess {src.name}", unit="img", disable=not progress)
    with bar:
        for h in src.halves:
            ds = ParticlesDataset(
                src,
                h,
                image_size=image_size,
                crop_fraction=crop_fraction,
                normalise=normalise,
                ctf_correction=ctf_correction,
                wiener_constant=wiener_constant,
            )
            n, size = len(ds), ds.image_size
            stack_name = f"particles_{h}.mrcs"
            with io.StackWriter(dest / stack_name, n, size, ds.sampling_rate) as writer:
                for start in range(0, n, batch_size):
                    idx = np.arange(start, min(n, start + batch_size))
                    writer.write(start, ds._preprocess(ds.read_raw(idx), idx).numpy())
                    bar.update(len(idx))
            optics = ds._optics.copy()
            optics["rlnImagePixelSize"] = ds.sampling_rate
            optics["rlnImageSize"] = size
            if ctf_correction == "phase_flip" or "rlnCtfDataArePhaseFlipped" in optics.columns:
                optics["rlnCtfDataArePhaseFlipped"] = (
                    1 if ctf_correction == "phase_flip" else optics["rlnCtfDataArePhaseFlipped"]
                )
            table = ds.metadata
            # Predictions must name the particles as the source entry does: keep the original name
            # (RELION's own label for this), and the first one when a copy is preprocessed again.
            if "rlnImageOriginalName" not in table.columns:
                table["rlnImageOriginalName"] = table["rlnImageName"]
            table["rlnImageName"] = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
            io.write_particles_star(dest / f"particles_{h}.star", io.ParticleStar(optics=optics, particles=table))
            with io.atomic_write(dest / f"info_{h}.json") as tmp:
                tmp.write_bytes(src.info_bytes(h))
    crop, _, _ = output_geometry(ds.original_box_size, ds.original_sampling_rate, ds.config)
    for path, out in (
        (src.mask_path, dest / f"{src.name}_mask.mrc"),
        (src.ground_truth_map_path, dest / f"{src.name}_source_map.mrc"),
    ):
        if path is not None and path.exists():
            vol, _ = io.read_map(path)
            vol = torch.from_numpy(vol)
            start = vol.shape[0] // 2 - crop // 2
            vol = fourier_resize_map(center_crop(vol[start : start + crop], crop), size)
            if "mask" in out.name:
                vol = vol.clamp(0, 1)
            io.write_map(out, vol.numpy(), ds.sampling_rate)
