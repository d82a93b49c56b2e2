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
PCC starts at 1 and its FSC stays at Nyquist until the misalignment is large.
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
from .errors import InputError
from .geometry import matrix_to_euler, random_rotations

__all__ = ["parse_perturbation", "perturbation_name", "perturb_angles", "write_perturbed_predictions",
           "sensitivity_table", "monotone_violations", "missing_values", "write_sensitivity", "EXPERIMENTS"]

EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
#: experiment → (label, unit of the level)
EXPERIMENTS = {"noise": ("uniform angular noise", "±°"), "random": ("particles with random poses", "%")}
_NAME = re.compile(r"^(?:(exact)|(noise)(\d+(?:\.\d+)?)|(random)(\d+(?:\.\d+)?))$")
#: the metrics the table keeps, each worse when lower (PCC) or higher (resolution in Å)
METRICS = ["MAnE"] + [f"{m}({pair})" for pair in ("V0,V1", "GT,V") for m in
                      ("PCC", "masked_PCC", "FSCR0.143", "FSCR0.5", "masked_FSCR0.143", "masked_FSCR0.5")]
#: the paper's quantities, shown in the Markdown table and the figures
HALF_MAP_METRICS = ["PCC(V0,V1)", "masked_PCC(V0,V1)", "FSCR0.5(V0,V1)", "FSCR0.143(V0,V1)"]


def parse_perturbation(name: str) -> tuple[str, float]:
    """``"noise3"`` → ``("noise", 3.0)`` (degrees); ``"random20"`` → ``("random", 20.0)`` (percent);
    ``"exact"`` → ``("exact", 0.0)``."""
    m = _NAME.match(str(name))
    if m is None:
        raise InputError(f"unknown perturbation {name!r}; expected 'exact', 'noise<degrees>' (e.g. noise3) or "
                         f"'random<percent>' (e.g. random10)", where="perturbation")
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
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + half * 7919 + stream * 104_729
                                         + sum(map(ord, entry_name)))


def perturb_angles(angles_deg: torch.Tensor, kind: str, level: float, generator_noise: torch.Generator,
                   generator_random: torch.Generator) -> torch.Tensor:
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
        chosen = order[:int(round(level * n / 100))]
        angles[chosen] = matrix_to_euler(replacement[chosen])
        return angles
    if kind == "exact":
        return angles
    raise InputError(f"unknown perturbation kind {kind!r}", where="perturbation")


def write_perturbed_predictions(entry: io.Entry, half: int, perturbation: str, out_star: str | Path,
                                seed: int = 0) -> Path:
    """The ground-truth predictions STAR of ``half`` with the angles perturbed as ``perturbation``
    names (:func:`parse_perturbation`); true shifts, confidence 1."""
    kind, level = parse_perturbation(perturbation)
    star = entry.read_star(half)
    parts = star.particles.copy()
    missing = [c for c in EULER if c not in parts.columns]
    if missing:
        raise InputError(f"missing ground-truth angle column(s) {missing}", path=star.path)
    angles = torch.tensor(parts[EULER].to_numpy(dtype=np.float64))
    perturbed = perturb_angles(angles, kind, level, _generator(seed, entry.name, half, 1),
                               _generator(seed, entry.name, half, 2))
    parts[EULER] = perturbed.numpy()
    parts["rlnParticleFigureOfMerit"] = 1.0
    io.write_particles_star(out_star, io.ParticleStar(star.optics.copy(), parts))
    return Path(out_star)


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
            raise InputError(f"method {method!r} is not a perturbation (expected 'perturbation:<name>')",
                             path=path, where="method")
        kind, level = parse_perturbation(method.split(":", 1)[1])
        values = {k: (math.nan if m.get(k) is None else float(m[k])) for k in METRICS}
        reasons = m.get("null_reasons") or {}
        # JSON, not "k: reason; ...": a reason may itself hold "; " (several causes of one null).
        why = {k: reasons[k] for k in METRICS if m.get(k) is None and k in reasons}
        why = json.dumps(why) if why else ""
        for experiment in (EXPERIMENTS if kind == "exact" else [kind]):
            rows.append({"entry": m["entry"], "experiment": experiment, "level": level,
                         "unit": EXPERIMENTS[experiment][1], **values, "null_reasons": why})
    if not rows:
        raise InputError("no evaluations given", where="metrics")
    table = pd.DataFrame(rows).sort_values(["entry", "experiment", "level"], ignore_index=True)
    repeated = table.duplicated(["entry", "experiment", "level"])
    if repeated.any():
        r = table[repeated].iloc[0]
        raise InputError(f"two evaluations of {r['entry']} at {r['experiment']} level {r['level']:g}", where="metrics")
    return table


def monotone_violations(table: pd.DataFrame, pcc_tolerance: float = 1e-3,
                        resolution_tolerance: float = 0.01) -> list[str]:
    """Where a metric gets better as the level rises: a PCC up by more than ``pcc_tolerance``
    (the tables' precision), a resolution in Å finer by more than ``resolution_tolerance`` of its
    value, or MAnE down at all (beyond float rounding). The tolerances are for the half-maps'
    noise: ±1° moves the density of a 130 Å particle by about 1 Å, invisible in an 8–13 Å map,
    where the (V0, V1) metrics then wander by a few 10⁻⁴. Empty when monotone. Missing values
    (NaN) are skipped: each value is compared with the previous level that has one
    (:func:`missing_values` lists them)."""
    out = []
    for (entry, experiment), g in table.groupby(["entry", "experiment"]):
        g = g.sort_values("level")
        for metric in METRICS:
            present = g[metric].notna().to_numpy()
            levels = g["level"].to_numpy()[present]
            v = g[metric].to_numpy(dtype=float)[present]
            if "PCC" in metric:
                better = np.diff(v) > pcc_tolerance
            elif metric == "MAnE":
                better = -np.diff(v) > 1e-6 * np.abs(v[:-1])
            else:
                better = -np.diff(v) > resolution_tolerance * np.abs(v[:-1])
            for i in np.flatnonzero(better):
                out.append(f"{entry}, {experiment}: {metric} goes from {v[i]:.4g} at {levels[i]:g} "
                           f"to {v[i + 1]:.4g} at {levels[i + 1]:g}")
    return out


def missing_values(table: pd.DataFrame) -> list[str]:
    """``"<entry>, <experiment>: <metric> is missing at <level> (<reason>)"`` for every NaN of
    :data:`METRICS` in ``table``; empty when every value is there."""
    out = []
    for _, r in table.sort_values(["entry", "experiment", "level"]).iterrows():
        raw = r.get("null_reasons")
        reasons = json.loads(raw) if isinstance(raw, str) and raw else {}  # NaN when read back from a CSV
        for metric in METRICS:
            if pd.isna(r[metric]):
                out.append(f"{r['entry']}, {r['experiment']}: {metric} is missing at {r['level']:g} "
                           f"({reasons.get(metric, 'null in metrics.json')})")
    return out


def write_sensitivity(table: pd.DataFrame, out_csv: str | Path, fsc_files: dict | None = None) -> list[Path]:
    """``out_csv``, a Markdown table beside it (``.md``) and the figure (``.png``): PCC and FSC
    resolution against the level, per entry (the paper's Tables 4–5). ``fsc_files``:
    ``{(entry, perturbation name): fsc.csv}`` adds ``<stem>_fsc.png`` with the FSC(V0,V1) curves per
    level (the paper's Figures 4–5)."""
    from .plots import plot_sensitivity, plot_sensitivity_fsc

    out_csv, md, png, *fsc_png = sensitivity_paths(out_csv, bool(fsc_files))
    written = []
    with io.atomic_write(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    written.append(out_csv)
    with io.atomic_write(md) as tmp:
        tmp.write_text(_markdown(table))
    written.append(md)
    plot_sensitivity(table, png)
    written.append(png)
    if fsc_files:
        plot_sensitivity_fsc({k: pd.read_csv(v) for k, v in fsc_files.items()}, fsc_png[0])
        written.append(fsc_png[0])
    return written


def sensitivity_paths(out_csv: str | Path, fsc: bool = True) -> list[Path]:
    """The files :func:`write_sensitivity` writes: ``out_csv``, ``<stem>.md``, ``<stem>.png`` and,
    with FSC curves, ``<stem>_fsc.png``."""
    out_csv = Path(out_csv)
    paths = [out_csv, out_csv.with_suffix(".md"), out_csv.with_suffix(".png")]
    return paths + ([out_csv.with_name(out_csv.stem + "_fsc.png")] if fsc else [])


def _cell(value, metric: str) -> str:
    if value is None or pd.isna(value):
        return "–"  # undefined (null in metrics.json) or not evaluated: never a number
    return f"{value:.3f}" if "PCC" in metric else f"{value:.2f}"


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
            for metric in HALF_MAP_METRICS:
                unit_m = " Å" if "FSCR" in metric else ""
                cells = " | ".join(_cell(g[metric].get(lv), metric) for lv in levels)
                lines.append(f"| {entry} | {metric}{unit_m} | {cells} |")
        lines.append("")
    missing = missing_values(table[table["experiment"].isin(list(EXPERIMENTS))])
    if missing:
        lines += ["Missing values (–):", "", *[f"- {line}" for line in dict.fromkeys(missing)], ""]
    return "\n".join(lines)
