"""How the map metrics respond to known misalignment (the CESPED paper's Appendix H).

Two oracle experiments on the ground-truth poses of an entry:

* ``noise<d>``: uniform noise in ``[−d°, +d°]`` added to each Euler angle (rot, tilt, psi) of
  every particle (the paper's Table 4: ±1°, 3°, 5°);
* ``random<p>``: ``p`` % of the particles get uniformly random rotations (Table 5: 10, 20, 30 %).

``exact`` is the unperturbed reference. The draws are nested so that the levels of one experiment
differ only in their amplitude: one noise pattern ``u ∈ [−1, 1]³`` per particle scaled by ``d``,
and one random order of the particles of which the first ``p`` % are replaced, each by its own
random rotation. A stronger level therefore perturbs the same particles by more, and the trend of
the metrics with the level is not blurred by different draws. Shifts stay the true ones.

The headline metrics are those of the two half-maps reconstructed from the perturbed poses,
(V0, V1): the gold-standard FSC and PCC that the paper's Tables 4–5 and Figures 4–5 show (their
0° column is the entries' own half-map agreement, not 1). The table keeps (GT, V) too, the
perturbed map against the ground-truth map of the same particles: it shares their noise, so its
PCC starts at 1 and its FSC stays at Nyquist until the misalignment is large; and the cross-half
agreement, each perturbed half-map against the other half's ground truth (no shared noise).

The metrics kept, and the direction in which each gets worse, are those of the ``sensitivity``
view of :mod:`cryopose.metric_table`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import io
from .entry import Entry
from .errors import InputError
from .geometry import matrix_to_euler, random_rotations
from .metric_table import columns, format_value, is_worse, metric
from .predictions import EULER, true_origins, write_predictions

__all__ = [
    "parse_perturbation",
    "perturbation_name",
    "perturb_angles",
    "write_perturbed_predictions",
    "evaluate_perturbations",
    "perturbation_files",
    "sensitivity_table",
    "monotone_violations",
    "missing_values",
    "write_sensitivity",
    "EXPERIMENTS",
]

#: experiment → (label, unit of the level)
EXPERIMENTS = {"noise": ("uniform angular noise", "±°"), "random": ("particles with random poses", "%")}
_NAME = re.compile(r"^(?:(exact)|(noise)(\d+(?:\.\d+)?)|(random)(\d+(?:\.\d+)?))$")
#: the metrics the table keeps, each worse in the direction of its row (metric_table.metric(key).better)
METRICS = columns("sensitivity")
#: the paper's quantities, shown in the Markdown table and the figures
HALF_MAP_METRICS = columns("sensitivity_headline")


def parse_perturbation(name: str) -> tuple[str, float]:
    """``"noise3"`` → ``("noise", 3.0)`` (degrees); ``"random20"`` → ``("random", 20.0)`` (percent);
    ``"exact"`` → ``("exact", 0.0)``."""
    m = _NAME.match(str(name))
    if m is None:
        raise InputError(
            f"unknown perturbation {name!r}; expected 'exact', 'noise<degrees>' (e.g. noise3) or "
            f"'random<percent>' (e.g. random10)",
            where="perturbation",
        )
    if m.group(1):
        return "exact", 0.0
    kind, value = (m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5))
    level = float(value)
    if kind == "random" and not 0 <= level <= 100:
        raise InputError(f"{name}: a percentage of particles must be in [0, 100]", where="perturbation")
    return kind, level


def perturbation_name(kind: str, level: float) -> str:
    """The inverse of :func:`parse_perturbation` (``("noise", 1.0)`` → ``"noise1"``)."""
    if kind == "exact":
        return "exact"
    if kind not in EXPERIMENTS:
        raise InputError(f"unknown experiment {kind!r}; expected one of {sorted(EXPERIMENTS)}", where="perturbation")
    return f"{kind}{level:g}"


def _generator(seed: int, entry_name: str, half: int, stream: int) -> torch.Generator:
    # Halves and entries get independent draws; the same (seed, entry, half) always the same ones.
    return torch.Generator().manual_seed(
        int(seed) * 1_000_003 + half * 7919 + stream * 104_729 + sum(map(ord, entry_name))
    )


def perturb_angles(
    angles_deg: torch.Tensor,
    kind: str,
    level: float,
    generator_noise: torch.Generator,
    generator_random: torch.Generator,
) -> torch.Tensor:
    """Perturbed Euler angles.

    Args:
        angles_deg: ``(N, 3)`` float64 (rot, tilt, psi) in degrees.
        kind, level: ``("noise", d)``: ``+ d·u`` with ``u`` uniform in ``[−1, 1]³`` per particle;
            ``("random", p)``: the first ``round(p·N/100)`` particles of a random order get uniform
            random rotations; ``("exact", 0)``: unchanged.
        generator_noise, generator_random: the two independent draws (their first use must be here,
            so that every level sees the same ``u``, order and rotations).

    Returns:
        ``(N, 3)`` float64 degrees.
    """
    angles = torch.as_tensor(angles_deg, dtype=torch.float64).clone()
    n = angles.shape[0]
    u = torch.rand(n, 3, generator=generator_noise, dtype=torch.float64) * 2 - 1
    order = torch.randperm(n, generator=generator_random)
    replacement = random_rotations(n, generator=generator_random).double()
    if kind == "noise":
        return angles + level * u
    if kind == "random":
        chosen = order[: int(round(level * n / 100))]
        angles[chosen] = matrix_to_euler(replacement[chosen])
        return angles
    if kind == "exact":
        return angles
    raise InputError(f"unknown perturbation kind {kind!r}", where="perturbation")


def write_perturbed_predictions(
    entry: Entry, half: int, perturbation: str, out_star: str | Path, seed: int = 0
) -> Path:
    """The ground-truth predictions STAR of ``half`` with the angles perturbed as ``perturbation``
    names (:func:`parse_perturbation`); true shifts, confidence 1."""
    kind, level = parse_perturbation(perturbation)
    return _write_perturbed(entry, half, kind, level, out_star, seed, _true_angles(entry, half))


def _write_perturbed(
    entry: Entry, half: int, kind: str, level: float, out_star: str | Path, seed: int, truth: np.ndarray
) -> Path:
    """:func:`write_perturbed_predictions` of the ground-truth angles ``truth`` already read."""
    perturbed = perturb_angles(
        torch.tensor(truth), kind, level, _generator(seed, entry.name, half, 1), _generator(seed, entry.name, half, 2)
    )
    return write_predictions(
        entry, half, out_star, angles_deg=perturbed.numpy(), shifts_angstrom=true_origins(entry, half)
    )


def _true_angles(entry: Entry, half: int) -> np.ndarray:
    """``(N, 3)`` the ground-truth (rot, tilt, psi) of ``half`` in degrees, refused when missing."""
    star = entry.read_star(half)
    missing = [c for c in EULER if c not in star.particles.columns]
    if missing:
        raise InputError(f"missing ground-truth angle column(s) {missing}", path=star.path)
    return star.particles[EULER].to_numpy(dtype=np.float64)


def perturbation_files(plots: bool = False) -> list[str]:
    """The names of the files :func:`evaluate_perturbations` writes into each level's folder: the
    perturbed predictions, then what :func:`cryopose.evaluate.evaluate` writes."""
    from .evaluate import evaluation_files

    return ["half0.star", "half1.star", *evaluation_files(plots)]


def evaluate_perturbations(
    entry: Entry | str | Path,
    perturbations,
    out_root: str | Path,
    ground_truth_dir: str | Path | None = None,
    seed: int = 0,
    backend: str | None = None,
    jobs: int = 1,
    cesped_compatible: bool = False,
    progress: bool = True,
    report=None,
    **reconstruct_options,
) -> dict[str, Path]:
    """Every perturbation of one entry, perturbed and evaluated in one process.

    For each name of ``perturbations`` (:func:`parse_perturbation`), in the order given, the folder
    ``out_root/<name>/<entry>/`` gets ``half0.star`` and ``half1.star``
    (:func:`write_perturbed_predictions` with ``seed``), then the evaluation of those predictions
    as :func:`cryopose.evaluate.evaluate` makes it with ``method="perturbation:<name>"``,
    prediction type SO3, no predicted confidence and no plots (``metrics.json``, ``fsc.csv``, ...):
    the same files, and the same numbers, as evaluating each level on its own. The entry is read
    once, and the ground-truth half-maps come from the cache ``ground_truth_dir`` (default
    ``out_root/ground_truth/<entry>``), built first when it is missing or out of date. Each file
    is written atomically, one level after the other.

    Every name, the entry and the backend are checked before anything is written: an unknown
    perturbation (or one given twice) raises :class:`InputError` and no folder is made.

    Args:
        backend, jobs, cesped_compatible, reconstruct_options: as :func:`cryopose.evaluate.evaluate`.
        progress: the reconstructions' progress bars.
        report: called with one line per level once it is written (e.g. ``print``).

    Returns:
        ``{name: its folder}``.
    """
    from .entry import resolve_entry
    from .evaluate import evaluate, ground_truth_maps
    from .reconstruct import relion_command

    names = [str(n) for n in perturbations]
    if not names:
        raise InputError("no perturbation given", where="perturbation")
    levels = {name: parse_perturbation(name) for name in names}
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"perturbation {repeated[0]!r} given twice", where="perturbation")
    entry = resolve_entry(entry)
    if backend is None:
        backend = "relion" if cesped_compatible else "torch"
    if backend not in ("torch", "relion"):
        raise InputError(f"unknown backend {backend!r}; expected 'torch' or 'relion'", where="backend")
    if cesped_compatible and (backend != "relion" or reconstruct_options.get("pad", 2) != 2):
        raise InputError(
            "the CESPED-compatible mode reconstructs as CESPED does (relion_reconstruct, --pad 2); "
            f"got backend {backend!r}: leave it out or use backend 'relion'",
            where="backend",
        )
    entry.validate()
    truth = {h: _true_angles(entry, h) for h in entry.halves}
    if backend == "relion":
        relion_command(reconstruct_options.get("launcher"), reconstruct_options.get("mpi_processes", 1))
    out_root = Path(out_root)
    gt_dir = Path(ground_truth_dir) if ground_truth_dir is not None else out_root / "ground_truth" / entry.name
    # Built (or checked) once, before the first level: every evaluation below finds it cached.
    ground_truth_maps(entry, gt_dir, backend=backend, progress=progress, jobs=jobs, **reconstruct_options)

    folders = {}
    for i, (name, (kind, level)) in enumerate(levels.items()):
        folder = out_root / name / entry.name
        stars = [
            _write_perturbed(entry, h, kind, level, folder / f"half{h}.star", seed, truth[h]) for h in entry.halves
        ]
        m = evaluate(
            entry,
            stars[0],
            stars[1],
            prediction_type="SO3",
            backend=backend,
            use_pred_confidence=False,
            outdir=folder,
            ground_truth_dir=gt_dir,
            plots=False,
            progress=progress,
            jobs=jobs,
            method=f"perturbation:{name}",
            cesped_compatible=cesped_compatible,
            # What `cryopose evaluate` records of predictions made by no registered method.
            provenance={"method_version": None, "params_hash": None, "train_machine": None},
            **reconstruct_options,
        ).metrics  # not its maps: the next level's would be made beside them
        folders[name] = folder
        if report is not None:
            shown = ", ".join(
                f"{key} {_cell(m.get(key), key)}{' ' + metric(key).unit if metric(key).unit else ''}"
                for key in ("MAnE", "PCC(V0,V1)", "FSCR0.5(V0,V1)")
            )
            report(
                f"{entry.name}: {name} ({i + 1}/{len(levels)}) evaluated in {m['seconds_total']:.1f} s: "
                f"{shown}; written to {folder}"
            )
    return folders


def sensitivity_table(metrics_files) -> pd.DataFrame:
    """One row per (entry, experiment, level) from the evaluations' ``metrics.json``, whose
    ``method`` is ``perturbation:<name>``; the ``exact`` evaluation is level 0 of both experiments.
    Columns: entry, experiment, level, unit, then :data:`METRICS` (NaN where ``metrics.json`` has
    null: an undefined metric, e.g. of a zero map), then ``null_reasons`` (``"metric: reason; ..."``
    or empty)."""
    rows = []
    for path in metrics_files:
        path = Path(path)
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"not a readable metrics file ({err})", path=path) from err
        method = str(m.get("method", ""))
        if not method.startswith("perturbation:"):
            raise InputError(
                f"method {method!r} is not a perturbation (expected 'perturbation:<name>')", path=path, where="method"
            )
        kind, level = parse_perturbation(method.split(":", 1)[1])
        values = {k: (math.nan if m.get(k) is None else float(m[k])) for k in METRICS}
        reasons = m.get("null_reasons") or {}
        # JSON, not "k: reason; ...": a reason may itself hold "; " (several causes of one null).
        why = {k: reasons[k] for k in METRICS if m.get(k) is None and k in reasons}
        why = json.dumps(why) if why else ""
        for experiment in EXPERIMENTS if kind == "exact" else [kind]:
            rows.append(
                {
                    "entry": m["entry"],
                    "experiment": experiment,
                    "level": level,
                    "unit": EXPERIMENTS[experiment][1],
                    **values,
                    "null_reasons": why,
                }
            )
    if not rows:
        raise InputError("no evaluations given", where="metrics")
    table = pd.DataFrame(rows).sort_values(["entry", "experiment", "level"], ignore_index=True)
    repeated = table.duplicated(["entry", "experiment", "level"])
    if repeated.any():
        r = table[repeated].iloc[0]
        raise InputError(f"two evaluations of {r['entry']} at {r['experiment']} level {r['level']:g}", where="metrics")
    return table


def monotone_violations(
    table: pd.DataFrame, pcc_tolerance: float = 1e-3, resolution_tolerance: float = 0.01
) -> list[str]:
    """Where a metric gets better as the level rises, in the direction of its row in
    :mod:`cryopose.metric_table`: a correlation (unitless) by more than ``pcc_tolerance`` (the
    tables' precision), a resolution in Å finer by more than ``resolution_tolerance`` of its
    value, or a pose error (MAnE) down at all (beyond float rounding). The tolerances are for the half-maps'
    noise: ±1° moves the density of a 130 Å particle by about 1 Å, invisible in an 8–13 Å map,
    where the (V0, V1) metrics then wander by a few 10⁻⁴. Empty when monotone. Missing values
    (NaN) are skipped: each value is compared with the previous level that has one
    (:func:`missing_values` lists them)."""
    out = []
    for (entry, experiment), g in table.groupby(["entry", "experiment"]):
        g = g.sort_values("level")
        for key in METRICS:
            present = g[key].notna().to_numpy()
            levels = g["level"].to_numpy()[present]
            v = g[key].to_numpy(dtype=float)[present]
            tolerance, relative = _tolerance(key, pcc_tolerance, resolution_tolerance)
            for i in range(len(v) - 1):
                if is_worse(key, v[i], v[i + 1], tolerance, relative):  # better at the higher level
                    out.append(
                        f"{entry}, {experiment}: {key} goes from {v[i]:.4g} at {levels[i]:g} "
                        f"to {v[i + 1]:.4g} at {levels[i + 1]:g}"
                    )
    return out


def _tolerance(key: str, pcc_tolerance: float, resolution_tolerance: float) -> tuple[float, bool]:
    """``(tolerance, relative)`` of :func:`monotone_violations` for ``key``, by its unit."""
    unit = metric(key).unit
    if unit == "":  # correlations: the tables' precision
        return pcc_tolerance, False
    if unit == "Å":
        return resolution_tolerance, True
    return 1e-6, True  # pose errors: beyond float rounding


def missing_values(table: pd.DataFrame) -> list[str]:
    """``"<entry>, <experiment>: <metric> is missing at <level> (<reason>)"`` for every NaN of
    :data:`METRICS` in ``table``; empty when every value is there."""
    out = []
    for _, r in table.sort_values(["entry", "experiment", "level"]).iterrows():
        raw = r.get("null_reasons")
        reasons = json.loads(raw) if isinstance(raw, str) and raw else {}  # NaN when read back from a CSV
        for key in METRICS:
            if pd.isna(r[key]):
                out.append(
                    f"{r['entry']}, {r['experiment']}: {key} is missing at {r['level']:g} "
                    f"({reasons.get(key, 'null in metrics.json')})"
                )
    return out


def write_sensitivity(table: pd.DataFrame, out_csv: str | Path, fsc_files: dict | None = None) -> list[Path]:
    """``out_csv``, a Markdown table beside it (``.md``) and the figure (``.png``): PCC and FSC
    resolution against the level, per entry (the paper's Tables 4–5). ``fsc_files``:
    ``{(entry, perturbation name): fsc.csv}`` adds ``<stem>_fsc.png`` with the FSC(V0,V1) curves per
    level (the paper's Figures 4–5)."""
    from .plots import plot_sensitivity, plot_sensitivity_fsc

    out_csv, md, png, *fsc_png = sensitivity_paths(out_csv, bool(fsc_files))
    curves = {}  # (entry, experiment, level) → FSC table; exact is level 0 of both experiments
    for (entry, name), path in (fsc_files or {}).items():
        kind, level = parse_perturbation(name)
        fsc = pd.read_csv(path)
        for experiment in EXPERIMENTS if kind == "exact" else [kind]:
            curves[(entry, experiment, level)] = fsc
    written = []
    with io.atomic_write(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    written.append(out_csv)
    with io.atomic_write(md) as tmp:
        tmp.write_text(_markdown(table))
    written.append(md)
    plot_sensitivity(table, png, EXPERIMENTS, HALF_MAP_METRICS)
    written.append(png)
    if fsc_files:
        plot_sensitivity_fsc(curves, fsc_png[0], EXPERIMENTS)
        written.append(fsc_png[0])
    return written


def sensitivity_paths(out_csv: str | Path, fsc: bool = True) -> list[Path]:
    """The files :func:`write_sensitivity` writes: ``out_csv``, ``<stem>.md``, ``<stem>.png`` and,
    with FSC curves, ``<stem>_fsc.png``."""
    out_csv = Path(out_csv)
    paths = [out_csv, out_csv.with_suffix(".md"), out_csv.with_suffix(".png")]
    return paths + ([out_csv.with_name(out_csv.stem + "_fsc.png")] if fsc else [])


def _cell(value, key: str) -> str:
    # "–" when undefined (null in metrics.json) or not evaluated: never a number
    return format_value(key, None if value is None or pd.isna(value) else float(value))


def _markdown(table: pd.DataFrame) -> str:
    lines = []
    for experiment, (label, unit) in EXPERIMENTS.items():
        t = table[table.experiment == experiment]
        if t.empty:
            continue
        levels = sorted(t["level"].unique())
        head = " | ".join(f"{lv:g}{unit if unit == '%' else '°'}" for lv in levels)
        lines += [f"### {label}", "", f"| entry | metric | {head} |", "| --- | --- |" + " --- |" * len(levels)]
        for entry, g in t.groupby("entry"):
            g = g.set_index("level")
            for key in HALF_MAP_METRICS:
                unit_m = f" {metric(key).unit}" if metric(key).unit else ""
                cells = " | ".join(_cell(g[key].get(lv), key) for lv in levels)
                lines.append(f"| {entry} | {key}{unit_m} | {cells} |")
        lines.append("")
    missing = missing_values(table[table["experiment"].isin(list(EXPERIMENTS))])
    if missing:
        lines += ["Missing values (–):", "", *[f"- {line}" for line in dict.fromkeys(missing)], ""]
    return "\n".join(lines)
