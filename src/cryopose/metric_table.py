"""The one table of the benchmark's metrics: every metric declared once, every view derived.

Each :class:`Metric` row says what a metric is (its key in ``metrics.json``, a label and unit for
people, whether lower or higher is better, a one-line description) and where it is shown (the
leaderboard CSV, the per-method summary, the Markdown tables, the generalisation and sensitivity
tables, the ``cryopose evaluate`` print-out). The leaderboard, the sensitivity table and its
monotonicity check, the command line and the report captions all read their metric lists from
:data:`METRICS`, in its order; none of them repeats a metric's name.

Adding a metric: compute it (a function in :mod:`cryopose.metrics` if it is new, its key in
:func:`cryopose.evaluate.evaluate`), add one row here, add a test. ``tests/judge/test_metric_table.py``
fails if ``evaluate`` writes a number without a row, or if a caption is out of date
(``python -m cryopose.metric_table`` rewrites the captions).

This module imports nothing from the package: everything else may import it.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Metric",
    "METRICS",
    "VIEWS",
    "metric",
    "rows",
    "columns",
    "is_worse",
    "format_value",
    "heading",
    "render_rst",
    "caption_block",
    "sync_captions",
    "CAPTIONS",
]

#: The views a metric can be shown in (the boolean fields of :class:`Metric`).
VIEWS = (
    "leaderboard",
    "summary",
    "markdown",
    "markdown_summary",
    "generalisation",
    "sensitivity",
    "sensitivity_headline",
    "printed",
)


@dataclass(frozen=True)
class Metric:
    """One metric.

    Attributes:
        key: its name in ``metrics.json`` and the column name in every table.
        label: for people (axes, print-outs, captions).
        unit: ``"°"``, ``"Å"``, ``""`` (a correlation or a fraction), ``"s"``, ...
        better: ``"lower"`` or ``"higher"``.
        description: one line, used in the report captions and the docs.
        leaderboard: a column of the full leaderboard (``results/leaderboard.csv``).
        summary: in the per-method summary (mean, std, missing; the paper's Table 1).
        markdown: shown in the Markdown leaderboard (``results/leaderboard.md``).
        markdown_summary: shown in the Markdown per-method summary.
        generalisation: a column of the generalisation table.
        sensitivity: kept in the sensitivity table (and checked for monotonicity).
        sensitivity_headline: shown in the sensitivity Markdown and figure (the paper's Tables 4–5).
        printed: printed by ``cryopose evaluate``.
        timing: measured by the workflow (Snakemake ``benchmark:`` files), not in ``metrics.json``;
            the leaderboard places these columns after ``null_reasons``.
    """

    key: str
    label: str
    unit: str
    better: str
    description: str
    leaderboard: bool = False
    summary: bool = False
    markdown: bool = False
    markdown_summary: bool = False
    generalisation: bool = False
    sensitivity: bool = False
    sensitivity_headline: bool = False
    printed: bool = False
    timing: bool = False

    def __post_init__(self):
        if self.better not in ("lower", "higher"):
            raise ValueError(f"metric {self.key}: better must be 'lower' or 'higher', not {self.better!r}")


def _m(key, label, unit, better, description, views="", timing=False) -> Metric:
    """A row; ``views``: the names of :data:`VIEWS` it is shown in, space-separated."""
    names = views.split()
    unknown = set(names) - set(VIEWS)
    if unknown:
        raise ValueError(f"metric {key}: unknown view(s) {sorted(unknown)}")
    return Metric(key, label, unit, better, description, timing=timing, **{v: True for v in names})


_PAIRS = {
    "(V0,V1)": "the two predicted half-maps V0, V1 (the gold-standard agreement)",
    "(GT,V)": "the predicted map V against the ground-truth map GT (they share the particles' noise)",
    "(GT0,GT1)": "the two ground-truth half-maps (the data's own limit; the same for every method)",
}

#: Every metric, in table order (the order of every view). Keys are those of ``metrics.json``.
METRICS: tuple[Metric, ...] = (
    # Poses
    _m(
        "MAnE",
        "MAnE",
        "°",
        "lower",
        "mean symmetry-aware angular error of the predicted poses",
        "leaderboard summary markdown markdown_summary generalisation sensitivity printed",
    ),
    _m(
        "wMAnE",
        "wMAnE",
        "°",
        "lower",
        "MAnE weighted by the ground truth's confidence (rlnMaxValueProbDistribution)",
        "leaderboard summary markdown markdown_summary generalisation printed",
    ),
    _m(
        "median_angular_error",
        "median angular error",
        "°",
        "lower",
        "median symmetry-aware angular error",
        "leaderboard generalisation printed",
    ),
    _m("acc_5deg", "accuracy ≤ 5°", "", "higher", "fraction of particles within 5° of the truth"),
    _m(
        "acc_10deg",
        "accuracy ≤ 10°",
        "",
        "higher",
        "fraction of particles within 10° of the truth",
        "leaderboard generalisation",
    ),
    _m("acc_15deg", "accuracy ≤ 15°", "", "higher", "fraction of particles within 15° of the truth"),
    _m("acc_30deg", "accuracy ≤ 30°", "", "higher", "fraction of particles within 30° of the truth"),
    _m("MAnE_half0", "MAnE, half 0", "°", "lower", "MAnE of half 0's predictions"),
    _m("MAnE_half1", "MAnE, half 1", "°", "lower", "MAnE of half 1's predictions"),
    _m("wMAnE_half0", "wMAnE, half 0", "°", "lower", "wMAnE of half 0's predictions"),
    _m("wMAnE_half1", "wMAnE, half 1", "°", "lower", "wMAnE of half 1's predictions"),
    # The paper's map metrics: PCC, then FSC resolutions, of each pair; masked twins beside them.
    _m(
        "PCC(V0,V1)",
        "PCC(V0,V1)",
        "",
        "higher",
        f"real-space correlation of {_PAIRS['(V0,V1)']}",
        "leaderboard sensitivity sensitivity_headline printed",
    ),
    _m(
        "masked_PCC(V0,V1)",
        "masked PCC(V0,V1)",
        "",
        "higher",
        "PCC(V0,V1) inside the mask",
        "sensitivity sensitivity_headline printed",
    ),
    _m(
        "PCC(GT,V)",
        "PCC(GT,V)",
        "",
        "higher",
        f"real-space correlation of {_PAIRS['(GT,V)']}",
        "leaderboard markdown sensitivity printed",
    ),
    _m("masked_PCC(GT,V)", "masked PCC(GT,V)", "", "higher", "PCC(GT,V) inside the mask", "sensitivity printed"),
    _m(
        "PCC(GT0,GT1)",
        "PCC(GT0,GT1)",
        "",
        "higher",
        f"real-space correlation of {_PAIRS['(GT0,GT1)']}",
        "leaderboard printed",
    ),
    _m("masked_PCC(GT0,GT1)", "masked PCC(GT0,GT1)", "", "higher", "PCC(GT0,GT1) inside the mask", "printed"),
    _m(
        "FSCR0.143(V0,V1)",
        "FSCR0.143(V0,V1)",
        "Å",
        "lower",
        f"FSC = 0.143 resolution of {_PAIRS['(V0,V1)']}",
        "leaderboard sensitivity sensitivity_headline printed",
    ),
    _m(
        "masked_FSCR0.143(V0,V1)",
        "masked FSCR0.143(V0,V1)",
        "Å",
        "lower",
        "FSCR0.143(V0,V1) inside the mask",
        "sensitivity printed",
    ),
    _m(
        "FSCR0.5(V0,V1)",
        "FSCR0.5(V0,V1)",
        "Å",
        "lower",
        f"FSC = 0.5 resolution of {_PAIRS['(V0,V1)']}",
        "leaderboard sensitivity sensitivity_headline",
    ),
    _m("masked_FSCR0.5(V0,V1)", "masked FSCR0.5(V0,V1)", "Å", "lower", "FSCR0.5(V0,V1) inside the mask", "sensitivity"),
    _m(
        "FSCR0.143(GT,V)",
        "FSCR0.143(GT,V)",
        "Å",
        "lower",
        f"FSC = 0.143 resolution of {_PAIRS['(GT,V)']}",
        "leaderboard markdown sensitivity printed",
    ),
    _m(
        "masked_FSCR0.143(GT,V)",
        "masked FSCR0.143(GT,V)",
        "Å",
        "lower",
        "FSCR0.143(GT,V) inside the mask",
        "sensitivity printed",
    ),
    _m(
        "FSCR0.5(GT,V)",
        "FSCR0.5(GT,V)",
        "Å",
        "lower",
        f"FSC = 0.5 resolution of {_PAIRS['(GT,V)']}",
        "leaderboard sensitivity printed",
    ),
    _m(
        "masked_FSCR0.5(GT,V)",
        "masked FSCR0.5(GT,V)",
        "Å",
        "lower",
        "FSCR0.5(GT,V) inside the mask",
        "sensitivity printed",
    ),
    _m(
        "FSCR0.143(GT0,GT1)",
        "FSCR0.143(GT0,GT1)",
        "Å",
        "lower",
        f"FSC = 0.143 resolution of {_PAIRS['(GT0,GT1)']}",
        "leaderboard printed",
    ),
    _m(
        "masked_FSCR0.143(GT0,GT1)",
        "masked FSCR0.143(GT0,GT1)",
        "Å",
        "lower",
        "FSCR0.143(GT0,GT1) inside the mask",
        "printed",
    ),
    _m(
        "FSCR0.5(GT0,GT1)",
        "FSCR0.5(GT0,GT1)",
        "Å",
        "lower",
        f"FSC = 0.5 resolution of {_PAIRS['(GT0,GT1)']}",
        "leaderboard",
    ),
    _m("masked_FSCR0.5(GT0,GT1)", "masked FSCR0.5(GT0,GT1)", "Å", "lower", "FSCR0.5(GT0,GT1) inside the mask"),
    # The paper's losses (eq. 9, 10), positive = worse.
    _m(
        "delta_PCC",
        "ΔPCC",
        "",
        "lower",
        "PCC(GT0,GT1) − PCC(GT,V) (paper eq. 9); positive = worse",
        "leaderboard summary markdown markdown_summary generalisation printed",
    ),
    _m(
        "delta_FSCR0.5",
        "ΔFSCR0.5",
        "Å",
        "lower",
        "FSCR0.5(GT,V) − FSCR0.5(GT0,GT1); positive = worse",
        "leaderboard summary markdown markdown_summary generalisation printed",
    ),
    _m(
        "delta_FSCR0.143",
        "ΔFSCR0.143",
        "Å",
        "lower",
        "FSCR0.143(GT,V) − FSCR0.143(GT0,GT1); positive = worse",
        "leaderboard summary markdown markdown_summary generalisation printed",
    ),
    _m("masked_delta_PCC", "masked ΔPCC", "", "lower", "ΔPCC of the masked maps", "leaderboard summary printed"),
    _m("masked_delta_FSCR0.5", "masked ΔFSCR0.5", "Å", "lower", "ΔFSCR0.5 of the masked maps", "leaderboard printed"),
    _m(
        "masked_delta_FSCR0.143",
        "masked ΔFSCR0.143",
        "Å",
        "lower",
        "ΔFSCR0.143 of the masked maps",
        "leaderboard printed",
    ),
    # Cross-half agreement: V_h against the other half's ground truth GT_(1−h), which shares no
    # particle with it; averaged over h. Its Δ replaces V_h by GT_h, i.e. is against (GT0,GT1).
    _m(
        "cross_PCC",
        "cross-half PCC",
        "",
        "higher",
        "PCC(V_h, GT_1−h), mean over h: the predicted half-map against the other half's ground truth (no shared noise)",
        "leaderboard sensitivity printed",
    ),
    _m("masked_cross_PCC", "masked cross-half PCC", "", "higher", "cross_PCC inside the mask", "sensitivity printed"),
    _m(
        "cross_FSCR0.143",
        "cross-half FSCR0.143",
        "Å",
        "lower",
        "FSC = 0.143 resolution of (V_h, GT_1−h), mean over h",
        "leaderboard sensitivity printed",
    ),
    _m(
        "masked_cross_FSCR0.143",
        "masked cross-half FSCR0.143",
        "Å",
        "lower",
        "cross_FSCR0.143 inside the mask",
        "sensitivity printed",
    ),
    _m(
        "cross_FSCR0.5",
        "cross-half FSCR0.5",
        "Å",
        "lower",
        "FSC = 0.5 resolution of (V_h, GT_1−h), mean over h",
        "leaderboard sensitivity",
    ),
    _m(
        "masked_cross_FSCR0.5",
        "masked cross-half FSCR0.5",
        "Å",
        "lower",
        "cross_FSCR0.5 inside the mask",
        "sensitivity",
    ),
    _m(
        "delta_cross_PCC",
        "Δ cross-half PCC",
        "",
        "lower",
        "PCC(GT0,GT1) − cross_PCC; 0 for the true poses by construction, positive = worse, below 0 "
        "flags reference bias",
        "leaderboard summary markdown markdown_summary generalisation printed",
    ),
    _m(
        "delta_cross_FSCR0.5",
        "Δ cross-half FSCR0.5",
        "Å",
        "lower",
        "cross_FSCR0.5 − FSCR0.5(GT0,GT1); 0 for the true poses, positive = worse",
        "leaderboard",
    ),
    _m(
        "delta_cross_FSCR0.143",
        "Δ cross-half FSCR0.143",
        "Å",
        "lower",
        "cross_FSCR0.143 − FSCR0.143(GT0,GT1); 0 for the true poses, positive = worse",
        "leaderboard printed",
    ),
    _m(
        "masked_delta_cross_PCC",
        "masked Δ cross-half PCC",
        "",
        "lower",
        "delta_cross_PCC of the masked maps",
        "leaderboard summary printed",
    ),
    _m(
        "masked_delta_cross_FSCR0.5",
        "masked Δ cross-half FSCR0.5",
        "Å",
        "lower",
        "delta_cross_FSCR0.5 of the masked maps",
        "leaderboard",
    ),
    _m(
        "masked_delta_cross_FSCR0.143",
        "masked Δ cross-half FSCR0.143",
        "Å",
        "lower",
        "delta_cross_FSCR0.143 of the masked maps",
        "leaderboard printed",
    ),
    # Shifts (SO3xR2 predictions only; absent otherwise, which is not a failure).
    _m(
        "shift_error_mean_A",
        "mean shift error",
        "Å",
        "lower",
        "mean distance between predicted and true in-plane origins (methods that predict shifts)",
        "leaderboard summary markdown generalisation printed",
    ),
    _m("shift_error_median_A", "median shift error", "Å", "lower", "median shift error"),
    _m("shift_RMSE_A", "RMS shift error", "Å", "lower", "root-mean-square shift error"),
    # Costs, from the workflow's benchmark files (both halves summed).
    _m(
        "train_seconds",
        "train time",
        "s",
        "lower",
        "wall time of training both halves' models",
        "leaderboard summary markdown",
        timing=True,
    ),
    _m(
        "predict_seconds",
        "predict time",
        "s",
        "lower",
        "wall time of predicting both halves (a refined variant: its base's prediction plus the refinement)",
        "leaderboard summary markdown",
        timing=True,
    ),
    _m(
        "refine_seconds",
        "refine time",
        "s",
        "lower",
        "wall time of the local refinement of a +refine variant",
        "leaderboard",
        timing=True,
    ),
    _m(
        "predict_particles_per_s",
        "prediction speed",
        "particles/s",
        "higher",
        "particles predicted per second of predict time",
        "leaderboard",
        timing=True,
    ),
)

_BY_KEY = {m.key: m for m in METRICS}
if len(_BY_KEY) != len(METRICS):
    raise ValueError("metric_table: a key is declared twice")


def metric(key: str) -> Metric:
    """The row of ``key``; ``KeyError`` naming the known keys' table when there is none."""
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"{key!r} is not in cryopose.metric_table.METRICS") from None


def rows(where: str, timing: bool | None = None) -> list[Metric]:
    """The rows shown in view ``where`` (one of :data:`VIEWS`), in table order; ``timing`` True or
    False keeps only the rows measured by the workflow, or only those of ``metrics.json``."""
    if where not in VIEWS:
        raise ValueError(f"unknown view {where!r}; expected one of {VIEWS}")
    return [m for m in METRICS if getattr(m, where) and (timing is None or m.timing == timing)]


def columns(where: str, timing: bool | None = None) -> list[str]:
    """The keys of :func:`rows` ``(where, timing)``."""
    return [m.key for m in rows(where, timing)]


def is_worse(key: str, a: float, b: float, tolerance: float = 0.0, relative: bool = False) -> bool:
    """Whether value ``a`` of metric ``key`` is worse than ``b`` by more than ``tolerance``
    (absolute, or a fraction of ``|a|`` when ``relative``), in the metric's direction
    (:attr:`Metric.better`). NaN compares as neither."""
    if math.isnan(a) or math.isnan(b):
        return False
    margin = tolerance * abs(a) if relative else tolerance
    gap = (a - b) if metric(key).better == "lower" else (b - a)
    return gap > margin


def heading(key: str) -> str:
    """``"label (unit)"``, or the label alone for a unitless metric: for axes and print-outs."""
    m = metric(key)
    return f"{m.label} ({m.unit})" if m.unit else m.label


def format_value(key: str, value, decimals: int | None = None) -> str:
    """``value`` for a table: ``–`` when missing (None/NaN, never a number); unitless metrics
    (correlations, fractions) with 3 decimals, the others with 2, unless ``decimals``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    places = decimals if decimals is not None else (3 if metric(key).unit == "" else 2)
    return f"{float(value):.{places}f}"


# ---------------------------------------------------------------------------------------------
# Report captions: the metric lists of workflow/report/*.rst are rendered from the table
# ---------------------------------------------------------------------------------------------

#: caption file (in ``workflow/report``) → the view whose metrics it lists.
CAPTIONS = {"leaderboard.rst": "leaderboard", "sensitivity.rst": "sensitivity"}
_BEGIN = ".. metric list ({view}), rendered from cryopose.metric_table: python -m cryopose.metric_table"
_END = ".. end of the metric list"


def render_rst(where: str, timing: bool | None = None) -> str:
    """The metrics of view ``where`` as an RST bullet list: label, key, unit, direction, description."""
    lines = []
    for m in rows(where, timing):
        unit = f"{m.unit}, " if m.unit else ""
        name = f"``{m.key}``" if m.label == m.key else f"``{m.key}``, {m.label}"
        lines.append(f"- {name} ({unit}{m.better} is better): {m.description}")
    return "\n".join(lines) + "\n"


def caption_block(where: str) -> str:
    """:func:`render_rst` between the two comment lines that mark it in a caption file."""
    return f"{_BEGIN.format(view=where)}\n\n{render_rst(where)}\n{_END}\n"


def sync_captions(report_dir: str | Path, check: bool = False) -> list[Path]:
    """Make the marked metric list of each caption of :data:`CAPTIONS` equal :func:`caption_block`
    (append it when a file has none). Returns the files that were (``check``: would be) changed."""
    changed = []
    for name, view in CAPTIONS.items():
        path = Path(report_dir) / name
        text = path.read_text()
        begin = re.escape(_BEGIN.format(view=view))
        pattern = re.compile(rf"^{begin}\n.*?^{re.escape(_END)}\n", re.S | re.M)
        block = caption_block(view)
        if pattern.search(text):
            new = pattern.sub(lambda _, block=block: block, text, count=1)
        else:
            new = text.rstrip("\n") + "\n\n" + block
        if new != text:
            changed.append(path)
            if not check:
                path.write_text(new)
    return changed


if __name__ == "__main__":  # python -m cryopose.metric_table [--check] [REPORT_DIR]
    args = sys.argv[1:]
    check = "--check" in args
    folder = next((a for a in args if a != "--check"), "workflow/report")
    changed = sync_captions(folder, check=check)
    for p in changed:
        print(f"{'out of date' if check else 'rewritten'}: {p}")
    sys.exit(1 if check and changed else 0)
