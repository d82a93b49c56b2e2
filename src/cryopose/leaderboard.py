"""The leaderboard: one row per (method, entry) from the evaluations and the workflow's run times.

Inputs are the ``metrics.json`` files written by :func:`cryopose.evaluate.evaluate` (each names
its method and entry) and, optionally, Snakemake ``benchmark:`` files of the train and predict
jobs (tab-separated, first column ``s``: wall seconds). Outputs are the full table, a per-method
summary (mean and standard deviation over entries, as the paper's Table 1) and a Markdown rendering.

A metric that an evaluation could not define (``null`` in ``metrics.json``, e.g. the FSC of a zero
map; the reason is in its ``null_reasons``) stays missing here: shown as ``–``, left out of the
means, counted in ``<metric>_missing`` and named with its reason, never replaced by a number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from . import io
from .errors import InputError
from .methods import REFINE_SUFFIX
from .metric_table import columns

__all__ = [
    "timings_from_benchmarks",
    "COLUMNS",
    "TIMING_COLUMNS",
    "SUMMARY_COLUMNS",
    "leaderboard_table",
    "summary_table",
    "to_markdown",
    "write_leaderboard",
    "benchmark_seconds",
    "generalisation_table",
    "write_generalisation",
    "GENERALISATION_COLUMNS",
]

# Every list of metrics below is a view of cryopose.metric_table.METRICS, in its order.
#: Metric columns from metrics.json, in the paper's order (Table 1, Appendix D), then the masked
#: deltas, the cross-half agreement and the shift error.
COLUMNS = columns("leaderboard", timing=False)
#: Columns measured by the workflow (benchmark files), after ``null_reasons``.
TIMING_COLUMNS = columns("leaderboard", timing=True)
#: The columns of the per-method summary (Table 1).
SUMMARY_COLUMNS = columns("summary")


def benchmark_seconds(path: str | Path) -> float:
    """Wall seconds recorded in a Snakemake benchmark file (first data row, column ``s``)."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"cannot read a Snakemake benchmark table ({err})", path=path) from err
    if "s" not in table.columns or table.empty:
        raise InputError(
            "expected a tab-separated benchmark table with an 's' column and one row", path=path, where="s"
        )
    return float(table["s"].iloc[0])


def timings_from_benchmarks(files: dict[str, list]) -> dict[tuple[str, str], dict]:
    """``{(method, entry): {"<kind>_seconds": s}}`` from the workflow's benchmark files
    ``results/benchmarks/<kind>/<method>/<entry>/half<h>.tsv`` (``files``: kind → paths; the
    halves summed). A ``<method>+refine`` row costs its base's training, and its base's
    prediction plus the refinement (its refine files), as running it from scratch would."""
    timings: dict[tuple[str, str], dict] = {}
    for kind, paths in files.items():
        for path in map(Path, paths):
            key = (path.parent.parent.name, path.parent.name)
            timings.setdefault(key, {}).setdefault(f"{kind}_seconds", 0.0)
            timings[key][f"{kind}_seconds"] += benchmark_seconds(path)
    for (method, entry_name), t in timings.items():
        base = timings.get((method.removesuffix(REFINE_SUFFIX), entry_name), {})
        if method.endswith(REFINE_SUFFIX) and "refine_seconds" in t:
            t["train_seconds"] = base.get("train_seconds")
            if base.get("predict_seconds") is not None:
                t["predict_seconds"] = base["predict_seconds"] + t["refine_seconds"]
    return timings


def _read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read evaluation metrics ({err})", path=path) from err
    for key in ("method", "entry", "MAnE"):
        if metrics.get(key) is None:
            raise InputError("not an evaluation's metrics.json (evaluate with a method name)", path=path, where=key)
    return metrics


def _null_reasons(metrics: dict, columns: list[str]) -> str | None:
    """``"metric: reason; ..."`` for the ``columns`` that are null in ``metrics``, or ``None``."""
    reasons = metrics.get("null_reasons") or {}
    # Only nulls with a reason: a metric absent because it does not apply (shifts of SO3
    # predictions) is not a failure to report.
    missing = [f"{c}: {reasons[c]}" for c in columns if metrics.get(c) is None and c in reasons]
    return "; ".join(missing) or None


def leaderboard_table(
    metrics_files: list[str | Path], timings: dict[tuple[str, str], dict] | None = None
) -> pd.DataFrame:
    """One row per (method, entry), sorted by method then entry.

    Args:
        metrics_files: ``metrics.json`` paths.
        timings: optional ``{(method, entry): {"train_seconds": s, "predict_seconds": s}}`` (both
            halves summed); ``predict_particles_per_s`` is derived from the entry's particles.
    """
    rows = []
    seen = set()
    for path in map(Path, metrics_files):
        m = _read_metrics(path)
        key = (m["method"], m["entry"])
        if key in seen:
            raise InputError(f"a second evaluation of method {key[0]!r} on entry {key[1]!r}", path=path)
        seen.add(key)
        row = {
            "method": m["method"],
            "entry": m["entry"],
            "symmetry": m.get("symmetry"),
            "backend": m.get("backend"),
            "n_particles": m.get("n_particles"),
            # Finished poses scored as they are (config `submissions`): where they came from.
            "submitted_from": m.get("submitted_from"),
        }
        row.update({c: m.get(c) for c in COLUMNS})
        row["null_reasons"] = _null_reasons(m, COLUMNS)
        t = dict((timings or {}).get(key, {}))
        n = row["n_particles"]
        t["predict_particles_per_s"] = n / t["predict_seconds"] if n and t.get("predict_seconds") else None
        row.update({c: t.get(c) for c in TIMING_COLUMNS})
        rows.append(row)
    if not rows:
        raise InputError("no evaluations to rank", where="metrics files")
    table = pd.DataFrame(rows).sort_values(["method", "entry"]).reset_index(drop=True)
    return table


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: the number of entries and, for each of :data:`SUMMARY_COLUMNS`, the mean and
    standard deviation over the entries that have a value (std is NaN with fewer than two) and
    ``<col>_missing``, the number of entries left out because theirs is missing."""
    out = []
    for method, group in table.groupby("method", sort=True):
        row = {"method": method, "entries": len(group)}
        for col in SUMMARY_COLUMNS:
            values = pd.to_numeric(group[col], errors="coerce")
            row[f"{col}_mean"] = values.mean()
            row[f"{col}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else math.nan
            row[f"{col}_missing"] = int(values.isna().sum())
        out.append(row)
    return pd.DataFrame(out)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def to_markdown(table: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The leaderboard and the per-method summary as Markdown tables (the metrics of the views
    ``markdown`` and ``markdown_summary`` of :mod:`cryopose.metric_table`)."""
    shown = ["method", "entry", *columns("markdown")]
    lines = ["| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in shown) + " |")
    notes = [
        f"- {r['method']} on {r['entry']}: {r['null_reasons']}"
        for _, r in table.iterrows()
        if isinstance(r.get("null_reasons"), str)
    ]
    if notes:
        lines += ["", "Missing values (–), undefined for these reasons:", "", *notes]
    lines += [
        "",
        "Per method, mean ± std over the entries with a value (entries without one are left out "
        "and counted as missing):",
        "",
    ]
    cols = columns("markdown_summary")
    lines += ["| method | entries | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    for _, r in summary.iterrows():
        cells = [
            f"{_fmt(r[f'{c}_mean'])} ± {_fmt(r[f'{c}_std'])}"
            + (f" ({r[f'{c}_missing']} missing)" if r.get(f"{c}_missing") else "")
            for c in cols
        ]
        lines.append(f"| {r['method']} | {r['entries']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_paths(out_csv: str | Path) -> tuple[Path, Path, Path]:
    """The files :func:`write_leaderboard` writes: ``out_csv``, ``<stem>_summary.csv``, ``<stem>.md``."""
    out_csv = Path(out_csv)
    return out_csv, out_csv.with_name(f"{out_csv.stem}_summary.csv"), out_csv.with_suffix(".md")


def write_leaderboard(table: pd.DataFrame, out_csv: str | Path) -> tuple[Path, Path, Path]:
    """Write ``out_csv``, ``<stem>_summary.csv`` and ``<stem>.md`` beside it, each atomically."""
    summary = summary_table(table)
    paths = leaderboard_paths(out_csv)
    with io.atomic_write(paths[1]) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    with io.atomic_write(paths[2]) as tmp:
        tmp.write_text(to_markdown(table, summary))
    with io.atomic_write(paths[0]) as tmp:  # the rule's declared output last
        table.to_csv(tmp, index=False, float_format="%.6g")
    return paths


#: The columns of the generalisation table.
GENERALISATION_COLUMNS = columns("generalisation")


def generalisation_table(metrics_files: list[str | Path]) -> pd.DataFrame:
    """The generalisation experiment (paper section 3.3): one row per evaluation, ``setting``
    ``in-distribution`` when the models were trained on the evaluated entry (``trained_on`` in
    ``metrics.json``) and ``transfer`` when on another one; sorted by method, source entry, setting.
    Null metrics are NaN, with their reasons in ``null_reasons``."""
    rows = []
    for path in map(Path, metrics_files):
        m = _read_metrics(path)
        trained_on = m.get("trained_on") or m["entry"]
        rows.append(
            {
                "method": m["method"],
                "trained_on": trained_on,
                "entry": m["entry"],
                "setting": "in-distribution" if trained_on == m["entry"] else "transfer",
                **{c: m.get(c) for c in GENERALISATION_COLUMNS},
                "null_reasons": _null_reasons(m, GENERALISATION_COLUMNS),
            }
        )
    if not rows:
        raise InputError("no evaluations to compare", where="metrics files")
    table = pd.DataFrame(rows).sort_values(["method", "trained_on", "setting"]).reset_index(drop=True)
    # Nulls become NaN in float columns (a column of nulls would otherwise hold None objects).
    table[GENERALISATION_COLUMNS] = table[GENERALISATION_COLUMNS].apply(pd.to_numeric, errors="coerce")
    return table


def generalisation_paths(out_csv: str | Path) -> tuple[Path, Path]:
    """The files :func:`write_generalisation` writes: ``out_csv`` and ``<stem>.png``."""
    return Path(out_csv), Path(out_csv).with_suffix(".png")


def write_generalisation(table: pd.DataFrame, out_csv: str | Path) -> Path:
    """``out_csv`` and a bar chart ``<stem>.png`` beside it, each atomically."""
    from .plots import plot_generalisation

    out_csv, png = generalisation_paths(out_csv)
    plot_generalisation(table, png)
    with io.atomic_write(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return out_csv
