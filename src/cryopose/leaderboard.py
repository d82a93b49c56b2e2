"""The leaderboard: one row per (method, entry) from the evaluations and the workflow's run times.

Inputs are the ``metrics.json`` files written by :func:`cryopose.evaluate.evaluate` (each names
its method and entry) and, optionally, Snakemake ``benchmark:`` files of the train and predict
jobs (tab-separated, first column ``s``: wall seconds). Outputs are the full table, a per-method
summary (mean and standard deviation over entries, as the paper's Table 1) and a Markdown rendering.

Each row also says where it comes from (:data:`PROVENANCE_COLUMNS`, from ``metrics.json``'s
``provenance`` block: :mod:`cryopose.provenance`), and :func:`merge_leaderboards` joins the
leaderboards of several runs, refusing rows that are not comparable.

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
    "PROVENANCE_COLUMNS",
    "TABLE_COLUMNS",
    "read_leaderboard",
    "merge_leaderboards",
]

# Every list of metrics below is a view of cryopose.metric_table.METRICS, in its order.
#: Metric columns from metrics.json, in the paper's order (Table 1, Appendix D), then the masked
#: deltas, the cross-half agreement and the shift error.
COLUMNS = columns("leaderboard", timing=False)
#: Columns measured by the workflow (benchmark files), after ``null_reasons``.
TIMING_COLUMNS = columns("leaderboard", timing=True)
#: The columns of the per-method summary (Table 1).
SUMMARY_COLUMNS = columns("summary")
#: Where a row comes from, after the timings: the method's version (its origin; for a built-in
#: cryopose's version and commit), the hash of its parameters (of a submission: of its files), the
#: evaluated entry's content fingerprint, the judge's version (what makes metrics comparable), the
#: machines that trained and evaluated, and the cryopose version that evaluated
#: (:mod:`cryopose.provenance`; empty when ``metrics.json`` does not say).
PROVENANCE_COLUMNS = [
    "method_version",
    "params_hash",
    "entry_fingerprint",
    "judge_version",
    "train_machine",
    "evaluate_machine",
    "cryopose_version",
]
#: What a row is: its key and facts of the entry and the evaluation, before the metrics.
_IDENTITY_COLUMNS = ["method", "entry", "symmetry", "backend", "n_particles", "submitted_from"]
#: Every column of :func:`leaderboard_table`, in order.
TABLE_COLUMNS = [*_IDENTITY_COLUMNS, *COLUMNS, "null_reasons", *TIMING_COLUMNS, *PROVENANCE_COLUMNS]


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
        provenance = m.get("provenance") or {}
        row.update({c: provenance.get(c) for c in PROVENANCE_COLUMNS})
        rows.append(row)
    if not rows:
        raise InputError("no evaluations to rank", where="metrics files")
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values(["method", "entry"]).reset_index(drop=True)
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


# ---------------------------------------------------------------------------------------------
# Merging the leaderboards of several runs (cryopose merge-leaderboards)
# ---------------------------------------------------------------------------------------------

#: Columns read as text, never as numbers (an entry named 10028, a hash of digits only).
_TEXT_COLUMNS = ["method", "entry", "symmetry", "backend", "submitted_from", "null_reasons", *PROVENANCE_COLUMNS]
#: Where and how fast a row was run, not what it measured: two copies of one row that differ only
#: here are the same result (the first file's copy is kept, and the difference reported).
RUN_COLUMNS = [*TIMING_COLUMNS, "train_machine", "evaluate_machine", "cryopose_version"]
#: What makes two rows comparable at all: one judge version over the whole table, one entry
#: fingerprint per entry name.
_REQUIRED = ("judge_version", "entry_fingerprint")


def read_leaderboard(path: str | Path) -> pd.DataFrame:
    """A ``leaderboard.csv`` written by :func:`write_leaderboard`, its text columns as text and its
    empty cells missing; :class:`InputError` when it cannot be read or has other columns than
    :data:`TABLE_COLUMNS` (a leaderboard of another cryopose version: make it again)."""
    path = Path(path)
    try:
        table = pd.read_csv(
            path, dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=False, na_values=[""], encoding="utf-8"
        )
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"cannot read a leaderboard CSV ({err})", path=path) from err
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    extra = [c for c in table.columns if c not in TABLE_COLUMNS]
    if missing or extra:
        said = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"unknown {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "",
            )
            if part
        )
        raise InputError(
            f"not a leaderboard of this cryopose's columns ({said}): make it again with cryopose leaderboard "
            "from its metrics.json files",
            path=path,
            where="header",
        )
    return table[TABLE_COLUMNS]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(a, b) -> bool:
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def merge_leaderboards(paths: list[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """One leaderboard from those of several runs (e.g. a cluster's and a laptop's): every row of
    every file once, sorted by method then entry. Returns ``(table, notes)``, ``notes`` naming each
    row found in more than one file and what its copies differ in (:data:`RUN_COLUMNS` only).

    Rows are keyed by (method, entry). Two copies of a key are one row when they agree in every
    column but :data:`RUN_COLUMNS` (the first file's copy is kept); otherwise the merge is refused.

    Raises:
        InputError: naming the files, the rows (CSV line, method and entry) and the reason, when
            a row has no judge version or entry fingerprint (it cannot be checked); two rows have
            other judge versions (anywhere in the table: the means over entries would mix two
            definitions); two rows of one entry name have other entry fingerprints (not the same
            data); one (method, entry) has other parameters (``params_hash``: give one run's
            method another name), or the same parameters and other values (results, method
            version); one file holds a (method, entry) twice; or fewer than two files are given.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise InputError("merging needs two leaderboards or more", where="leaderboards")
    kept: dict[tuple[str, str], tuple[Path, int, dict]] = {}
    judge: tuple[Path, int, dict] | None = None
    fingerprints: dict[str, tuple[Path, int, dict]] = {}
    notes: list[str] = []

    def name(path: Path, line: int, row: dict) -> str:
        return f"{path} line {line} ({row['method']} on {row['entry']})"

    for path in paths:
        table = read_leaderboard(path)
        here: set[tuple[str, str]] = set()
        for i, row in enumerate(table.to_dict("records")):
            line = i + 2  # the header is line 1
            where = f"line {line} ({row['method']} on {row['entry']})"
            for col in ("method", "entry", *_REQUIRED):
                if _missing(row[col]):
                    raise InputError(
                        f"no {col}: this row cannot be checked for comparability (made before cryopose "
                        "recorded provenance, or from a metrics.json without it); evaluate it again",
                        path=path,
                        where=where,
                    )
            key = (row["method"], row["entry"])
            if key in here:
                raise InputError("a second row of this method and entry in one leaderboard", path=path, where=where)
            here.add(key)
            if judge is None:
                judge = (path, line, row)
            elif row["judge_version"] != judge[2]["judge_version"]:
                raise InputError(
                    f"not comparable with {name(*judge)}: judge version {row['judge_version']!r} here, "
                    f"{judge[2]['judge_version']!r} there (other metric definitions or reconstruction)",
                    path=path,
                    where=where,
                )
            first = fingerprints.setdefault(row["entry"], (path, line, row))
            if row["entry_fingerprint"] != first[2]["entry_fingerprint"]:
                raise InputError(
                    f"not comparable with {name(*first)}: entry {row['entry']!r} has fingerprint "
                    f"{row['entry_fingerprint']} here and {first[2]['entry_fingerprint']} there (other data "
                    "under the same name)",
                    path=path,
                    where=where,
                )
            if key not in kept:
                kept[key] = (path, line, row)
                continue
            other = kept[key]
            if not _same(row["params_hash"], other[2]["params_hash"]):
                raise InputError(
                    f"the same method and entry as {name(*other)} with other parameters (params_hash "
                    f"{row['params_hash']} here, {other[2]['params_hash']} there): neither row is dropped; "
                    "give the method another name in one run's config",
                    path=path,
                    where=where,
                )
            differ = [c for c in TABLE_COLUMNS if c not in RUN_COLUMNS and not _same(row[c], other[2][c])]
            if differ:
                shown = ", ".join(f"{c}: {row[c]!r} here, {other[2][c]!r} there" for c in differ[:3])
                raise InputError(
                    f"the same method, entry and parameters as {name(*other)} with other values ({shown}"
                    f"{' ...' if len(differ) > 3 else ''}): neither row is dropped; keep one run's row",
                    path=path,
                    where=where,
                )
            ran = [c for c in RUN_COLUMNS if not _same(row[c], other[2][c])]
            notes.append(
                f"{key[0]} on {key[1]}: in {other[0]} and {path}, the same result; kept {other[0]}'s row"
                + (f" (they differ in {', '.join(ran)})" if ran else "")
            )
    rows = [row for _, _, row in kept.values()]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values(["method", "entry"]).reset_index(drop=True)
    return table, notes


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
