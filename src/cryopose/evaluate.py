"""The benchmark's judge: predictions checked against an entry's half, then scored.

This module holds the evaluation protocol (paper section 2.5, Appendix D). The predictions of a
half are read and checked by :func:`cryopose.predictions.load_predictions` (the one predictions
format); here they become half-maps and are scored against the ground truth.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import io
from .entry import Entry, resolve_entry
from .errors import InputError
from .geometry import euler_to_matrix
from .masks import mask_from_ground_truth
from .metrics import FSC_THRESHOLDS, angular_errors, compare_maps, map_degeneracy, pose_error_summary, shift_errors
from .predictions import CONFIDENCE, EULER, ORIGIN, PREDICTION_TYPES, Predictions, load_predictions
from .provenance import evaluation_provenance
from .reconstruct import DEFAULT_SCHEME, reconstruct, relion_command
from .symmetry import cesped_symmetry_matrices, symmetry_aware_angle

__all__ = ["evaluate", "ground_truth_maps", "prediction_star", "EvaluationResult", "cesped_metrics", "CESPED_METRICS"]


# ---------------------------------------------------------------------------------------------
# The protocol: maps from ground-truth and predicted poses, then metrics
# ---------------------------------------------------------------------------------------------


def prediction_star(
    entry: Entry,
    half: int,
    predictions: Predictions,
    prediction_type: str,
    use_pred_confidence: bool,
    cesped_compatible: bool = False,
) -> io.ParticleStar:
    """The entry's STAR for ``half`` with the predicted pose parameters transplanted into it.

    S2 predictions replace rlnAngleRot and rlnAngleTilt (the true rlnAnglePsi is kept); SO3 all
    three angles; SO3xR2 the angles and rlnOriginX/YAngst. Everything else (CTF, the other shifts)
    stays the ground truth, as in the paper. With ``use_pred_confidence`` the predicted confidence
    (1 where none was given) goes in rlnParticleFigureOfMerit for ``--fom_weighting``. Image names
    become absolute, so the STAR can be reconstructed from any folder.
    """
    star = entry.read_star(half)
    parts = star.particles.copy()
    table = predictions.table
    columns = EULER[:2] if prediction_type == "S2" else EULER
    for col in columns:
        parts[col] = table[col].to_numpy(dtype=np.float64)
    if prediction_type == "SO3xR2":
        for col in ORIGIN:
            parts[col] = table[col].to_numpy(dtype=np.float64)
    if use_pred_confidence:
        conf = predictions.confidence
        parts[CONFIDENCE] = 1.0 if conf is None else conf.numpy()
    elif CONFIDENCE in parts.columns:
        parts = parts.drop(columns=CONFIDENCE)
    optics = star.optics.copy()
    if cesped_compatible:
        optics, parts = _as_cesped_writes(optics, parts)
    return io.with_absolute_image_names(io.ParticleStar(optics, parts), star.path)


def _as_cesped_writes(optics: pd.DataFrame, parts: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tables as the CESPED package hands them to relion_reconstruct: particles sorted by
    rlnImageName and every float written by ``starfile.write`` as ``%.6f``. It matters: on small
    entries relion_reconstruct's map moves by a few % of its PCC when an input changes by 1e-7
    (Fourier voxels of near-zero weight are divided by it), so the same maps need the same numbers."""

    def six_decimals(table: pd.DataFrame) -> pd.DataFrame:
        table = table.copy()
        for col in table.columns:
            if pd.api.types.is_float_dtype(table[col]):
                table[col] = [float(f"{v:.6f}") for v in table[col].to_numpy()]
        return table

    parts = parts.sort_values("rlnImageName", kind="stable").reset_index(drop=True)
    return six_decimals(optics), six_decimals(parts)


def _entry_fingerprint(entry: Entry, backend: str, symmetry: str, pad: int, scheme: str | None = None) -> dict:
    digest = hashlib.sha256()
    for h in entry.halves:
        digest.update(entry.star_path(h).read_bytes())
        for stack in entry.stack_files(h):
            st = stack.stat()
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    # The torch backend's two schemes make different maps: a cache of one is not the other's.
    backend_id = f"torch:{scheme or DEFAULT_SCHEME}" if backend == "torch" else backend
    return {
        "entry": entry.name,
        "backend": backend_id,
        "symmetry": symmetry,
        "pad": pad,
        "inputs": digest.hexdigest(),
        "box_size": entry.box_size,
        "pixel_size": entry.pixel_size,
    }


def _reconstruct_each(star_paths: list, jobs: int, **options) -> list[tuple[np.ndarray, float]]:
    """:func:`reconstruct` of several STAR files, ``jobs`` at a time (threads: each relion_reconstruct
    is its own single-threaded process, so two halves on two cores take the time of one). The torch
    backend on the CPU shares torch's threads among the jobs (one each on two cores): a one-thread
    reconstruction keeps its core busy through the steps that one thread does anyway (reading,
    CTFs, Python), where two threads on one reconstruction leave a core idle."""
    if jobs <= 1 or len(star_paths) == 1:
        return [reconstruct(p, **options) for p in star_paths]
    if options.get("backend", "torch") == "torch" and options.get("threads") is None:
        options = {**options, "threads": max(1, torch.get_num_threads() // jobs)}
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        return list(pool.map(lambda p: reconstruct(p, **options), star_paths))
    except BaseException:
        # On SIGTERM (or a failed half) the clean-up runs now, not after the other reconstruction
        # (minutes): a scheduler follows SIGTERM with SIGKILL, and then none would run at all.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=False)


#: The files :func:`ground_truth_maps` keeps in its cache folder (the record last).
GROUND_TRUTH_FILES = ("GT_half0.mrc", "GT_half1.mrc", "ground_truth.json")


def evaluation_files(plots: bool = True) -> list[str]:
    """The names of the files :func:`evaluate` writes into ``outdir`` (the command line checks
    before it starts that none of them is an input)."""
    names = ["metrics.json", "V_half0.mrc", "V_half1.mrc", "V.mrc", "particles.csv", "fsc.csv"]
    return names + (["fsc.png", "angular_errors.png", "orientations.png"] if plots else [])


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _cached_ground_truth(entry: Entry, cache_dir: Path, fingerprint: dict) -> tuple[list[np.ndarray], float] | None:
    """The cached pair when ``cache_dir`` holds a complete cache for exactly these inputs, else
    ``None`` (it is rebuilt). A map of another box or pixel size is an error naming it: it is
    another entry's cache (or an older version's), never used and never silently overwritten."""
    *paths, record_path = [cache_dir / name for name in GROUND_TRUTH_FILES]
    box, px = entry.box_size, entry.pixel_size
    maps = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            volume, volume_px = io.read_map(path)
        except InputError:
            continue  # a damaged map: the cache is rebuilt
        if volume.shape != (box,) * 3 or not math.isclose(volume_px, px, rel_tol=1e-3):
            raise InputError(
                f"a ground-truth map of box {volume.shape[0]} at {volume_px:g} Å/px, but {entry.name} has "
                f"box {box} at {px:g} Å/px: this cache is of another entry (or an earlier version of "
                f"this one); delete {cache_dir} or give --ground-truth-dir a folder of its own",
                path=path,
            )
        maps.append(volume)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("entry") not in (None, entry.name):
        raise InputError(
            f"the ground-truth cache of entry {record.get('entry')!r}, not of {entry.name!r}: delete "
            f"{cache_dir} or give --ground-truth-dir a folder of its own",
            path=record_path,
            where="entry",
        )
    if len(maps) != len(paths):
        return None
    # The record names the checksums of the two maps it was written with: a pair mixed from two
    # runs (or a map edited since) does not match and is rebuilt.
    expected = {**fingerprint, "maps": {p.name: _sha256(p) for p in paths}}
    if record != expected:
        return None
    return maps, px


def _check_cache_folder(cache_dir: Path) -> None:
    """The cache is published by replacing its whole folder: refuse a folder that holds anything
    but a ground-truth cache (and cryopose's temporaries), rather than sweep it away."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError("the ground-truth cache must be a folder, but this is a file", path=cache_dir)
    if not cache_dir.is_dir():
        return
    others = sorted(
        p.name for p in cache_dir.iterdir() if p.name not in GROUND_TRUTH_FILES and not io.is_temporary(p.name)
    )
    if others:
        raise InputError(
            f"holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, which are not part of a "
            f"ground-truth cache ({', '.join(GROUND_TRUTH_FILES)}); the cache replaces its folder as a "
            "whole, so give it a folder of its own",
            path=cache_dir,
            where="ground-truth cache",
        )


def ground_truth_maps(
    entry: Entry,
    cache_dir: str | Path,
    backend: str = "torch",
    pad: int = 2,
    progress: bool = True,
    jobs: int = 1,
    **reconstruct_options,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The half-maps GT0, GT1 reconstructed from the entry's ground-truth poses, cached.

    The folder ``cache_dir`` holds ``GT_half{h}.mrc`` and a ``ground_truth.json`` record of the
    inputs (entry, STAR contents, stack sizes and times, box and pixel size, backend, symmetry,
    padding) and of the two maps' checksums. It is built in a hidden sibling folder and renamed
    into place whole, so an interruption never leaves a half-made pair; it is reused only when it
    is complete and its record matches, so every method evaluated on an entry shares it.

    Raises:
        InputError: when ``cache_dir`` holds maps of another box or pixel size, the record of
            another entry, or files that are not part of a cache (it is not overwritten).

    Returns:
        ``(GT0, GT1, pixel_size)``.
    """
    cache_dir = Path(cache_dir)
    fingerprint = _entry_fingerprint(entry, backend, entry.symmetry, pad, reconstruct_options.get("scheme"))
    cached = _cached_ground_truth(entry, cache_dir, fingerprint)
    if cached is not None:
        (m0, m1), px = cached
        return m0, m1, px
    _check_cache_folder(cache_dir)
    # Each half's particles as read (an entry may be one STAR file holding both halves); errors
    # name the entry's STAR file, and both backends resolve its image names the same way.
    results = _reconstruct_each(
        [entry.read_star(h) for h in entry.halves],
        jobs,
        symmetry=entry.symmetry,
        backend=backend,
        pad=pad,
        progress=progress,
        **reconstruct_options,
    )
    maps = [vol for vol, _ in results]
    px = results[0][1]
    *names, record_name = GROUND_TRUTH_FILES
    with io.staged_folder(cache_dir) as work:
        for name, vol in zip(names, maps):
            io.write_map(work / name, vol, px)
        record = {**fingerprint, "maps": {name: _sha256(work / name) for name in names}}
        with io.atomic_write(work / record_name) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return maps[0], maps[1], px


def _read_entry_mask(entry: Entry) -> np.ndarray | None:
    """The entry's own mask, checked against its box and pixel size, or ``None`` when it has none."""
    if entry.mask_path is None or not entry.mask_path.is_file():
        return None
    mask, mask_px = io.read_map(entry.mask_path)
    box = (entry.box_size,) * 3
    if mask.shape != box:
        raise InputError(f"mask has shape {mask.shape} but the maps are {box}", path=entry.mask_path)
    if not math.isclose(mask_px, entry.pixel_size, rel_tol=0.01):
        raise InputError(
            f"mask pixel size {mask_px:g} Å differs from the particles' {entry.pixel_size:g} Å",
            path=entry.mask_path,
            where="voxel size",
        )
    if not np.isfinite(mask).all() or mask.min() < -1e-3 or mask.max() > 1 + 1e-3:
        raise InputError("mask values must lie in [0, 1]", path=entry.mask_path)
    mask = np.clip(mask, 0, 1)
    if not mask.any():  # it would zero both maps: every masked metric undefined
        raise InputError(
            "mask is zero everywhere; expected values in [0, 1] that are > 0 over the molecule", path=entry.mask_path
        )
    return mask


@dataclass
class EvaluationResult:
    """What :func:`evaluate` computed: ``metrics`` (flat, JSON-ready), ``particles`` (one row per
    particle of both halves), ``fsc`` (one row per shell) and the maps ``GT0, GT1, V0, V1``."""

    metrics: dict
    particles: pd.DataFrame
    fsc: pd.DataFrame
    maps: dict


def evaluate(
    entry: Entry | str | Path,
    half0_predictions: str | Path,
    half1_predictions: str | Path,
    prediction_type: str = "SO3",
    backend: str | None = None,
    use_pred_confidence: bool = True,
    outdir: str | Path | None = None,
    ground_truth_dir: str | Path | None = None,
    pad: int = 2,
    low_resolution_angstrom: float = 30.0,
    plots: bool = True,
    progress: bool = True,
    jobs: int = 1,
    method: str | None = None,
    trained_on: str | None = None,
    cesped_compatible: bool = False,
    submitted_from: str | None = None,
    provenance: dict | None = None,
    **reconstruct_options,
) -> EvaluationResult:
    """Score the predicted poses of both halves of an entry (paper section 2.5, Appendix D).

    ``half{h}_predictions`` is a STAR with the predictions for half ``h`` (made by the model trained
    on the other half). The protocol:

    1. GT0, GT1: half-maps from the ground-truth poses (:func:`ground_truth_maps`, cached), and
       GT = (GT0 + GT1)/2; V0, V1 from the predicted poses (:func:`prediction_star`, weighted by the
       predicted confidence when ``use_pred_confidence``), and V = (V0 + V1)/2.
    2. Maps: PCC and FSC resolution at 0.143 and 0.5 (:func:`cryopose.metrics.fsc_resolution`) of
       (GT, V), (V0, V1) and (GT0, GT1), unmasked and masked (the entry's mask, else one built from
       GT: ``mask_source`` says which). ``delta_PCC = PCC(GT0,GT1) − PCC(GT,V)`` (paper eq. 9) and
       ``delta_FSCR<t> = FSCR<t>(GT,V) − FSCR<t>(GT0,GT1)`` in Å, so both are ≥ 0 when the
       predictions lose quality; the masked deltas use masked values on both sides. Cross-half
       agreement: ``cross_<m>`` is the mean over h of ``<m>(V_h, GT_1−h)`` (PCC, FSCR<t>; no
       shared particle noise), ``delta_cross_PCC = PCC(GT0,GT1) − cross_PCC`` and
       ``delta_cross_FSCR<t> = cross_FSCR<t> − FSCR<t>(GT0,GT1)`` (GT_h in place of V_h): exactly 0
       for the true poses, positive = worse as the paper's deltas. A metric of
       a map that is zero, constant or not finite once reconstructed is ``None`` (null), as is
       every delta using it; ``null_reasons`` maps each such metric to why (e.g. ``"V1 is zero"``).
    3. Poses: symmetry-aware angular errors; MAnE, wMAnE (weights: rlnMaxValueProbDistribution,
       1 when absent), median, accuracies, per half and for both; shift errors for SO3xR2.

    ``method`` names the predictions' method in ``metrics.json`` (the leaderboard's key);
    ``submitted_from`` says where finished poses came from (a submission: nothing was trained;
    recorded in ``metrics.json`` and the leaderboard), ``trained_on`` the entry its models learnt
    from (default this entry; another one in the
    generalisation experiment).
    ``metrics.json``'s ``provenance`` block holds the evaluation's own (cryopose version, judge
    version, entry fingerprint, machine: :func:`cryopose.provenance.evaluation_provenance`) and
    ``provenance``, what the caller knows of the predictions (``method_version``, ``params_hash``,
    ``train_machine``: ``cryopose evaluate --model-record``).
    ``backend``: ``"torch"`` (the default) or ``"relion"``. ``cesped_compatible`` scores by the
    CESPED package's definitions instead of cryopose's (README, "cryopose and CESPED"): relion
    backend at pad 2 (the default then; asking for torch is an error), FSC shells binned by the
    floor of the radius and resolutions at the first threshold crossing
    (:func:`cryopose.metrics.cesped_fsc_resolution`), angular errors over scipy's group
    (:func:`cryopose.symmetry.cesped_symmetry_matrices`), MAnE the mean of the halves' means;
    ``metrics.json`` then also holds ``"cesped_compatible": true`` and ``"cesped"``: CESPED's
    metrics under its names, with its masking choices (:data:`CESPED_METRICS`).
    ``jobs`` reconstructions run at once (the two halves; worth 2 with the relion backend on two or
    more cores, as each relion_reconstruct is single-threaded; memory grows accordingly). With
    ``outdir`` it writes, each file atomically and only once everything is computed:
    ``metrics.json``, ``particles.csv``, ``fsc.csv``, ``V_half0.mrc``, ``V_half1.mrc``, ``V.mrc``
    and (``plots``) ``fsc.png``, ``angular_errors.png``, ``orientations.png``. The ground-truth
    half-maps go to ``ground_truth_dir`` (default ``outdir/ground_truth``, or a temporary folder).

    Bad input (predictions missing, repeating, adding or swapping particles; non-finite values;
    confidences that are negative, NaN or all 0 when they weight the maps; a mask of the wrong box
    or zero everywhere; complex-valued stacks; RELION missing for the relion backend) raises
    :class:`InputError` before any file is written.
    """
    t_start = time.perf_counter()
    entry = resolve_entry(entry)  # an Entry, an entry folder or a plain particle STAR file
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}", where="prediction_type"
        )
    if backend is None:
        backend = "relion" if cesped_compatible else "torch"
    if backend not in ("torch", "relion"):
        raise InputError(f"unknown backend {backend!r}; expected 'torch' or 'relion'", where="backend")
    if cesped_compatible and (backend != "relion" or pad != 2):
        raise InputError(
            f"the CESPED-compatible mode reconstructs as CESPED does (relion_reconstruct, --pad 2); "
            f"got backend {backend!r}, pad {pad}: leave them out or use backend 'relion', pad 2",
            where="backend",
        )
    entry.validate()
    predictions = [
        load_predictions(entry, h, p, prediction_type, use_confidence=use_pred_confidence)
        for h, p in zip(entry.halves, (half0_predictions, half1_predictions))
    ]
    for path, pred in zip((half0_predictions, half1_predictions), predictions):
        # All-zero weights reconstruct a zero map: refused here, naming the predictions, rather
        # than scored or refused later under the temporary STAR's name.
        if pred.confidence is not None and not bool((pred.confidence > 0).any()):
            raise InputError(
                f"all {len(pred.confidence)} confidences are 0, so they weight nothing into the map; "
                f"expected finite values >= 0, not all 0 (to ignore the column, evaluate with "
                f"--no-pred-confidence)",
                path=path,
                where="rlnParticleFigureOfMerit",
            )
    if backend == "relion":
        relion_command(reconstruct_options.get("launcher"), reconstruct_options.get("mpi_processes", 1))
    mask = _read_entry_mask(entry)  # read and checked before any work
    symmetry = entry.symmetry

    # Scratch files (the predicted STARs) live next to the output, where the next run finds and
    # removes what a killed run left; only a call that names no folder at all uses the system's.
    scratch = Path(outdir) if outdir else Path(ground_truth_dir) if ground_truth_dir else None
    with (
        io.temporary_folder(scratch.parent, scratch.name)
        if scratch is not None
        else io.temporary_folder(tempfile.gettempdir(), "cryopose-evaluate")
    ) as tmp:
        gt_dir = (
            Path(ground_truth_dir)
            if ground_truth_dir
            else (Path(outdir) / "ground_truth" if outdir else Path(tmp) / "ground_truth")
        )
        t0 = time.perf_counter()
        gt0, gt1, px = ground_truth_maps(
            entry, gt_dir, backend=backend, pad=pad, progress=progress, jobs=jobs, **reconstruct_options
        )
        t_gt = time.perf_counter() - t0
        t0 = time.perf_counter()
        star_paths = []
        for h, pred in zip(entry.halves, predictions):
            star_paths.append(Path(tmp) / f"predicted_half{h}.star")
            io.write_particles_star(
                star_paths[-1], prediction_star(entry, h, pred, prediction_type, use_pred_confidence, cesped_compatible)
            )
        v = [
            vol
            for vol, _ in _reconstruct_each(
                star_paths,
                jobs,
                symmetry=symmetry,
                backend=backend,
                use_weights=use_pred_confidence,
                pad=pad,
                progress=progress,
                **reconstruct_options,
            )
        ]
        t_pred = time.perf_counter() - t0

    gt = 0.5 * (gt0 + gt1)
    vmean = 0.5 * (v[0] + v[1])
    mask_source = "entry" if mask is not None else "ground truth map"
    no_mask = None  # why there is no mask, when none can be built
    if mask is None:
        # A mask cannot be built from a ground truth without density; the masked metrics are then
        # null with this reason rather than an error: the unmasked ones still mean something.
        problem = map_degeneracy(gt)
        try:
            mask = None if problem else mask_from_ground_truth(gt, px)
        except ValueError as err:  # no voxel above the threshold (a map with nothing positive)
            problem = f"has no density to threshold ({err})"
        if mask is None:
            no_mask, mask_source = f"no mask: GT {problem}, so none can be built from it", "none"
    pairs = {"(GT,V)": (gt, vmean), "(V0,V1)": (v[0], v[1]), "(GT0,GT1)": (gt0, gt1)}
    comparisons = {
        name: compare_maps(
            a,
            b,
            px,
            mask=mask,
            low_resolution_angstrom=low_resolution_angstrom,
            names=tuple(name.strip("()").split(",")),
            cesped_compatible=cesped_compatible,
        )
        for name, (a, b) in pairs.items()
    }
    # Cross-half agreement: V_h against the other half's ground truth GT_(1-h), which holds none of
    # V_h's particles, so none of their noise. Its reference, GT_h against GT_(1-h), is (GT0,GT1).
    cross = [
        compare_maps(
            v[h],
            (gt1, gt0)[h],
            px,
            mask=mask,
            low_resolution_angstrom=low_resolution_angstrom,
            names=(f"V{h}", f"GT{1 - h}"),
            cesped_compatible=cesped_compatible,
        )
        for h in (0, 1)
    ]

    particles, pose_metrics = _pose_metrics(entry, predictions, prediction_type, symmetry, cesped_compatible)
    metrics: dict = {
        "method": method,
        "entry": entry.name,
        "trained_on": trained_on or entry.name,
        **({"submitted_from": submitted_from} if submitted_from else {}),
        "symmetry": symmetry,
        "prediction_type": prediction_type,
        "backend": backend,
        "use_pred_confidence": bool(use_pred_confidence),
        "mask_source": mask_source,
        "pixel_size": float(px),
        "box_size": float(entry.box_size),
    }
    metrics.update(pose_metrics)
    # Undefined map metrics are NaN (null in metrics.json); null_reasons says why for each.
    null_reasons: dict[str, str] = {}
    for name, cmp in comparisons.items():
        metrics.update(cmp.as_dict(name))
        null_reasons.update(cmp.null_reasons(name))
        if no_mask:
            for key in cmp.as_dict(name):
                metrics[f"masked_{key}"] = math.nan
                null_reasons[f"masked_{key}"] = no_mask
    _cross_half_metrics(cross, no_mask, metrics, null_reasons)
    for prefix in ("", "masked_"):
        deltas = {f"{prefix}delta_PCC": (f"{prefix}PCC(GT0,GT1)", f"{prefix}PCC(GT,V)")}
        deltas.update(
            {
                f"{prefix}delta_FSCR{t:g}": (f"{prefix}FSCR{t:g}(GT,V)", f"{prefix}FSCR{t:g}(GT0,GT1)")
                for t in FSC_THRESHOLDS
            }
        )
        # V's cross-half value against GT's (GT_h in place of V_h), signed as the paper's deltas
        # (positive = worse): 0 for the true poses by construction.
        deltas[f"{prefix}delta_cross_PCC"] = (f"{prefix}PCC(GT0,GT1)", f"{prefix}cross_PCC")
        deltas.update(
            {
                f"{prefix}delta_cross_FSCR{t:g}": (f"{prefix}cross_FSCR{t:g}", f"{prefix}FSCR{t:g}(GT0,GT1)")
                for t in FSC_THRESHOLDS
            }
        )
        for delta, (minuend, subtrahend) in deltas.items():
            metrics[delta] = metrics[minuend] - metrics[subtrahend]
            causes = [null_reasons[k] for k in (minuend, subtrahend) if k in null_reasons]
            if causes:
                null_reasons[delta] = _join_reasons(causes)
    if cesped_compatible:
        metrics["cesped_compatible"] = True
        metrics["cesped"] = cesped_metrics(metrics)
    metrics["null_reasons"] = null_reasons
    # Where the row comes from (cryopose.provenance): what merging two leaderboards compares.
    scheme = reconstruct_options.get("scheme") or DEFAULT_SCHEME
    metrics["provenance"] = {
        **evaluation_provenance(entry, backend, pad, use_pred_confidence, cesped_compatible, scheme),
        **(provenance or {}),
    }
    metrics["seconds_ground_truth_reconstruction"] = t_gt
    metrics["seconds_predicted_reconstruction"] = t_pred
    metrics["seconds_total"] = time.perf_counter() - t_start
    metrics = {k: _plain(val) for k, val in metrics.items()}

    fsc = pd.DataFrame(
        {
            "shell": np.arange(len(comparisons["(GT,V)"].frequencies)),
            "frequency_per_A": comparisons["(GT,V)"].frequencies,
        }
    )
    with np.errstate(divide="ignore"):
        fsc["resolution_A"] = np.where(fsc["frequency_per_A"] > 0, 1.0 / fsc["frequency_per_A"], np.inf)
    for name, cmp in comparisons.items():
        fsc[f"FSC{name}"] = cmp.fsc
        fsc[f"masked_FSC{name}"] = cmp.masked_fsc
    result = EvaluationResult(
        metrics=metrics, particles=particles, fsc=fsc, maps={"GT0": gt0, "GT1": gt1, "V0": v[0], "V1": v[1]}
    )
    if outdir is not None:
        _write_outputs(Path(outdir), result, px, vmean, plots)
    return result


def _join_reasons(causes: list[str]) -> str:
    """The causes, each once: ``["GT1 is zero; V1 is zero", "GT1 is zero"]`` → ``"GT1 is zero; V1 is zero"``."""
    return "; ".join(dict.fromkeys(part for cause in causes for part in cause.split("; ")))


def _cross_half_metrics(cross: list, no_mask: str | None, metrics: dict, null_reasons: dict) -> None:
    """``cross_<m>``: the mean over h of ``<m>(V_h, GT_1−h)`` (``cross[h]``) for each metric ``m``
    of :meth:`~cryopose.metrics.MapComparison.as_dict`, masked ones as ``masked_cross_<m>``. NaN
    when either half's is, with that half's reason; masked ones NaN with ``no_mask`` when set."""
    values = [c.as_dict() for c in cross]
    reasons = [c.null_reasons() for c in cross]
    for name in values[0]:
        masked = name.startswith("masked_")
        key = f"masked_cross_{name.removeprefix('masked_')}" if masked else f"cross_{name}"
        metrics[key] = 0.5 * (values[0][name] + values[1][name])
        causes = [r[name] for r in reasons if name in r]
        if causes:
            null_reasons[key] = _join_reasons(causes)
    if no_mask:
        for name in values[0]:
            metrics[f"masked_cross_{name}"] = math.nan
            null_reasons[f"masked_cross_{name}"] = no_mask


def _plain(value):
    """JSON-ready: numbers become Python floats, NaN (an undefined map metric, whose reason is in
    ``null_reasons``) becomes None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.floating, np.integer)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _pose_metrics(
    entry: Entry, predictions: list[Predictions], prediction_type: str, symmetry: str, cesped_compatible: bool = False
) -> tuple[pd.DataFrame, dict]:
    rows, errors, confidences, metrics = [], [], [], {}
    all_shift_errors = []
    # CESPED's errors use scipy's group, which is not RELION's for T and I (cesped_symmetry_matrices).
    group = cesped_symmetry_matrices(symmetry) if cesped_compatible else None
    half_rmse: list[float] = []
    for h, pred in zip(entry.halves, predictions):
        truth = entry.read_star(h).particles
        true_angles = truth[EULER].to_numpy(dtype=np.float64)
        pred_angles = pred.table[EULER].to_numpy(dtype=np.float64)
        if prediction_type == "S2":  # the pose scored is the one reconstructed: predicted cone, true psi
            pred_angles = np.column_stack([pred_angles[:, :2], true_angles[:, 2]])
        pred_rot = euler_to_matrix(torch.tensor(pred_angles)) if prediction_type == "S2" else pred.rotmats
        true_rot = euler_to_matrix(torch.tensor(true_angles))
        if cesped_compatible:
            err = symmetry_aware_angle(true_rot, torch.as_tensor(pred_rot, dtype=torch.float64), symmetry, group=group)
        else:
            err = angular_errors(true_rot, pred_rot, symmetry)
        conf = (
            truth["rlnMaxValueProbDistribution"].to_numpy(dtype=np.float64)
            if "rlnMaxValueProbDistribution" in truth.columns
            else np.ones(len(truth))
        )
        table = pd.DataFrame(
            {
                "half": h,
                "rlnImageName": truth["rlnImageName"].astype(str).to_numpy(),
                "angular_error_deg": err.numpy(),
                "gt_confidence": conf,
            }
        )
        for j, col in enumerate(EULER):
            table[f"true_{col}"] = true_angles[:, j]
            table[f"pred_{col}"] = pred_angles[:, j]
        if pred.confidence is not None:
            table["pred_confidence"] = pred.confidence.numpy()
        if pred.shifts is not None:
            true_shifts = (
                truth[ORIGIN].to_numpy(dtype=np.float64)
                if set(ORIGIN) <= set(truth.columns)
                else np.zeros((len(truth), 2))
            )
            table["shift_error_A"] = shift_errors(true_shifts, pred.shifts).numpy()
            all_shift_errors.append(table["shift_error_A"].to_numpy())
            half_rmse.append(float(np.sqrt(np.mean(table["shift_error_A"].to_numpy() ** 2))))
        summary = pose_error_summary(err, conf)
        metrics[f"MAnE_half{h}"] = summary["MAnE"]
        metrics[f"wMAnE_half{h}"] = summary["wMAnE"]
        rows.append(table)
        errors.append(err)
        confidences.append(torch.tensor(conf))
    metrics.update(pose_error_summary(torch.cat(errors), torch.cat(confidences)))
    metrics["n_particles"] = metrics.pop("n")
    if all_shift_errors:
        s = np.concatenate(all_shift_errors)
        metrics["shift_error_mean_A"] = float(s.mean())
        metrics["shift_error_median_A"] = float(np.median(s))
        metrics["shift_RMSE_A"] = float(np.sqrt(np.mean(s**2)))
    if cesped_compatible:
        # CESPED's mean error is the mean of the two halves' means (cryopose's: of all particles;
        # they differ when the halves differ in size); its RMSE likewise. wMAnE is pooled in both.
        metrics["MAnE"] = 0.5 * (metrics[f"MAnE_half{entry.halves[0]}"] + metrics[f"MAnE_half{entry.halves[1]}"])
        if half_rmse:
            metrics["shift_RMSE_A"] = 0.5 * sum(half_rmse)
    return pd.concat(rows, ignore_index=True), metrics


#: The metrics of the CESPED package's ``evaluate`` (25.12.0, ``use_gt_mask=True``), by its names
#: (spelling included), as cryopose metrics: a key, or ``(minuend, subtrahend)`` for a difference.
#: Its masking choices: the half-map pairs (GT0,GT1) and (V0,V1) are masked; (GT,V) has a masked
#: and an unmasked PCC but unmasked resolutions; its ``mapVsGT_correlaton_diff`` subtracts the
#: unmasked PCC(GT,V) from the masked PCC(GT0,GT1).
CESPED_METRICS: dict[str, str | tuple[str, str]] = {
    "meanAngularError": "MAnE",
    "wMeanAngularError": "wMAnE",
    "shiftsRMSE": "shift_RMSE_A",
    "GT_correlation": "masked_PCC(GT0,GT1)",
    "GT_resolution0143": "masked_FSCR0.143(GT0,GT1)",
    "GT_resolution05": "masked_FSCR0.5(GT0,GT1)",
    "half2half_resolution": "masked_FSCR0.143(V0,V1)",
    "half2half_resolution05": "masked_FSCR0.5(V0,V1)",
    "half2half_correlation": "masked_PCC(V0,V1)",
    "mapVsGT_correlaton_masked": "masked_PCC(GT,V)",
    "mapVsGT_correlaton_unmasked": "PCC(GT,V)",
    "mapVsGT_resolution": "FSCR0.143(GT,V)",
    "mapVsGT_resolution05": "FSCR0.5(GT,V)",
    "mapVsGT_correlaton_diff_masked": ("masked_PCC(GT0,GT1)", "masked_PCC(GT,V)"),
    "mapVsGT_correlaton_diff": ("masked_PCC(GT0,GT1)", "PCC(GT,V)"),
}


def cesped_metrics(metrics: dict) -> dict[str, float | None]:
    """CESPED's metrics by its names (:data:`CESPED_METRICS`) from cryopose's ``metrics``; meant for
    the metrics of a CESPED-compatible evaluation (its resolutions and mean error follow CESPED's
    rules). ``shiftsRMSE`` only for SO3xR2 predictions (CESPED computes it from whatever shifts a
    prediction file holds); undefined values are ``None``."""
    out: dict[str, float | None] = {}
    for name, definition in CESPED_METRICS.items():
        keys = definition if isinstance(definition, tuple) else (definition,)
        values = [metrics.get(k) for k in keys]
        if any(v is None for v in values):
            if name != "shiftsRMSE":
                out[name] = None
            continue
        out[name] = _plain(values[0] - values[1] if len(values) == 2 else values[0])
    return out


def _write_outputs(outdir: Path, result: EvaluationResult, pixel_size: float, vmean: np.ndarray, plots: bool) -> None:
    from . import plots as plotting

    names = evaluation_files(plots)
    # All files are written under temporary names first and renamed together at the end, so a
    # failure (a full disk) leaves an earlier evaluation's files as they were; metrics.json is
    # renamed last: its presence means the evaluation is complete.
    with io.atomic_writes([outdir / n for n in names]) as tmp:
        io.write_map(tmp["V_half0.mrc"], result.maps["V0"], pixel_size)
        io.write_map(tmp["V_half1.mrc"], result.maps["V1"], pixel_size)
        io.write_map(tmp["V.mrc"], vmean, pixel_size)
        result.particles.to_csv(tmp["particles.csv"], index=False, float_format="%.6g")
        result.fsc.to_csv(tmp["fsc.csv"], index=False, float_format="%.6g")
        if plots:
            plotting.plot_fsc(result.fsc, result.metrics, tmp["fsc.png"])
            plotting.plot_angular_errors(result.particles, result.metrics, tmp["angular_errors.png"])
            plotting.plot_orientations(result.particles, tmp["orientations.png"])
        tmp["metrics.json"].write_text(json.dumps(result.metrics, indent=2, allow_nan=False) + "\n")
