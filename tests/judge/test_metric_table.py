"""The one metric table (issue 18): every view is derived from it, the views existing users read
are unchanged, the captions are what it renders, and the layers import downwards only."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from cryopose import leaderboard, metric_table, sensitivity
from cryopose.metric_table import METRICS, VIEWS, caption_block, columns, is_worse, metric, sync_captions

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "cryopose"

# The lists as they were written out by hand before the table (recorded at commit 52710eb).
OLD_COLUMNS = [
    "MAnE",
    "wMAnE",
    "median_angular_error",
    "acc_10deg",
    "PCC(V0,V1)",
    "PCC(GT,V)",
    "PCC(GT0,GT1)",
    "FSCR0.143(V0,V1)",
    "FSCR0.5(V0,V1)",
    "FSCR0.143(GT,V)",
    "FSCR0.5(GT,V)",
    "FSCR0.143(GT0,GT1)",
    "FSCR0.5(GT0,GT1)",
    "delta_PCC",
    "delta_FSCR0.5",
    "delta_FSCR0.143",
    "masked_delta_PCC",
    "masked_delta_FSCR0.5",
    "masked_delta_FSCR0.143",
    "shift_error_mean_A",
]
OLD_SUMMARY = [
    "MAnE",
    "wMAnE",
    "delta_PCC",
    "delta_FSCR0.5",
    "delta_FSCR0.143",
    "masked_delta_PCC",
    "shift_error_mean_A",
    "train_seconds",
    "predict_seconds",
]
OLD_MARKDOWN = [
    "MAnE",
    "wMAnE",
    "PCC(GT,V)",
    "FSCR0.143(GT,V)",
    "delta_PCC",
    "delta_FSCR0.5",
    "delta_FSCR0.143",
    "shift_error_mean_A",
    "train_seconds",
    "predict_seconds",
]
OLD_MARKDOWN_SUMMARY = ["MAnE", "wMAnE", "delta_PCC", "delta_FSCR0.5", "delta_FSCR0.143"]
OLD_GENERALISATION = [
    "MAnE",
    "wMAnE",
    "median_angular_error",
    "acc_10deg",
    "delta_PCC",
    "delta_FSCR0.5",
    "delta_FSCR0.143",
    "shift_error_mean_A",
]
OLD_SENSITIVITY = ["MAnE"] + [
    f"{m}({pair})"
    for pair in ("V0,V1", "GT,V")
    for m in ("PCC", "masked_PCC", "FSCR0.143", "FSCR0.5", "masked_FSCR0.143", "masked_FSCR0.5")
]
OLD_HALF_MAP = ["PCC(V0,V1)", "masked_PCC(V0,V1)", "FSCR0.5(V0,V1)", "FSCR0.143(V0,V1)"]
OLD_TIMING = ["train_seconds", "predict_seconds", "refine_seconds", "predict_particles_per_s"]

# The first new metric: cross-half agreement.
CROSS_LEADERBOARD = [
    "cross_PCC",
    "cross_FSCR0.143",
    "cross_FSCR0.5",
    "delta_cross_PCC",
    "delta_cross_FSCR0.5",
    "delta_cross_FSCR0.143",
    "masked_delta_cross_PCC",
    "masked_delta_cross_FSCR0.5",
    "masked_delta_cross_FSCR0.143",
]
CROSS_SENSITIVITY = [
    "cross_PCC",
    "masked_cross_PCC",
    "cross_FSCR0.143",
    "masked_cross_FSCR0.143",
    "cross_FSCR0.5",
    "masked_cross_FSCR0.5",
]


def _insert_before(columns: list[str], before: str, new: list[str]) -> list[str]:
    i = columns.index(before)
    return columns[:i] + new + columns[i:]


def test_the_views_existing_users_read_are_unchanged_but_for_the_new_metric():
    # The leaderboard: the old columns in the old order, the cross-half block after the paper's
    # (and our masked) deltas, before the shift error.
    assert leaderboard.COLUMNS == _insert_before(OLD_COLUMNS, "shift_error_mean_A", CROSS_LEADERBOARD)
    assert leaderboard.TIMING_COLUMNS == OLD_TIMING
    assert leaderboard.SUMMARY_COLUMNS == _insert_before(
        OLD_SUMMARY, "shift_error_mean_A", ["delta_cross_PCC", "masked_delta_cross_PCC"]
    )
    assert columns("markdown") == _insert_before(OLD_MARKDOWN, "shift_error_mean_A", ["delta_cross_PCC"])
    assert columns("markdown_summary") == OLD_MARKDOWN_SUMMARY + ["delta_cross_PCC"]
    assert leaderboard.GENERALISATION_COLUMNS == _insert_before(
        OLD_GENERALISATION, "shift_error_mean_A", ["delta_cross_PCC"]
    )
    # The sensitivity table keeps the same metrics plus the cross-half ones (in table order).
    assert sensitivity.METRICS == [k for k in sensitivity.METRICS if k in OLD_SENSITIVITY] + CROSS_SENSITIVITY
    assert sorted(k for k in sensitivity.METRICS if k in OLD_SENSITIVITY) == sorted(OLD_SENSITIVITY)
    assert sorted(sensitivity.HALF_MAP_METRICS) == sorted(OLD_HALF_MAP)


def test_the_leaderboard_csv_keeps_its_columns(tmp_path):
    record = {
        "method": "m",
        "entry": "e",
        "symmetry": "C1",
        "backend": "torch",
        "n_particles": 10.0,
        **{k: 1.0 for k in leaderboard.COLUMNS},
        "null_reasons": {},
    }
    (tmp_path / "m.json").write_text(json.dumps(record))
    table = leaderboard.leaderboard_table([tmp_path / "m.json"], {("m", "e"): {"predict_seconds": 2.0}})
    old = ["method", "entry", "symmetry", "backend", "n_particles", *OLD_COLUMNS, "null_reasons", *OLD_TIMING]
    assert [c for c in table.columns if c in old] == old
    # Since issue 20: where a submission's poses came from, after the row's identity.
    expected = _insert_before(old, "shift_error_mean_A", CROSS_LEADERBOARD)
    expected.insert(expected.index("n_particles") + 1, "submitted_from")
    # Since issue 20, item 5: where the row comes from, last (cryopose.provenance).
    expected += [
        "method_version",
        "params_hash",
        "entry_fingerprint",
        "judge_version",
        "train_machine",
        "evaluate_machine",
        "cryopose_version",
    ]
    assert list(table.columns) == expected
    assert table["predict_particles_per_s"].iloc[0] == 5.0
    summary = leaderboard.summary_table(table)
    assert list(summary.columns) == ["method", "entries"] + [
        f"{c}_{s}" for c in leaderboard.SUMMARY_COLUMNS for s in ("mean", "std", "missing")
    ]
    md = leaderboard.to_markdown(table, summary)
    assert "| method | entry | MAnE | wMAnE | PCC(GT,V) |" in md and "delta_cross_PCC" in md


def test_the_table_is_consistent():
    keys = [m.key for m in METRICS]
    assert len(keys) == len(set(keys))
    for m in METRICS:
        assert m.better in ("lower", "higher") and m.label and "\n" not in m.description, m.key
        assert not (m.timing and (m.sensitivity or m.generalisation or m.printed)), m.key
    # A view shown from a table has to be in the table it is shown from.
    assert set(columns("markdown_summary")) <= set(columns("summary"))
    assert set(columns("markdown")) <= set(columns("leaderboard"))
    assert set(columns("sensitivity_headline")) <= set(columns("sensitivity"))
    assert set(columns("summary")) <= set(columns("leaderboard"))
    with pytest.raises(KeyError, match="metric_table"):
        metric("PCC(V,W)")
    with pytest.raises(ValueError, match="unknown view"):
        columns("paper")
    assert set(VIEWS) <= set(metric_table.Metric.__dataclass_fields__)


def test_directions_come_from_the_table():
    assert metric("delta_PCC").better == "lower" and metric("delta_cross_PCC").better == "lower"
    assert metric("cross_FSCR0.5").unit == "Å" and metric("cross_PCC").unit == "" and metric("MAnE").unit == "°"
    assert is_worse("cross_PCC", 0.5, 0.6) and not is_worse("cross_PCC", 0.6, 0.5)
    assert is_worse("FSCR0.5(V0,V1)", 8.0, 7.0) and not is_worse("FSCR0.5(V0,V1)", 7.0, 8.0)
    assert is_worse("delta_cross_FSCR0.5", 2.0, 0.0) and is_worse("delta_cross_PCC", 0.1, 0.0)
    assert not is_worse("PCC(V0,V1)", 0.5, 0.5004, tolerance=1e-3)
    assert not is_worse("FSCR0.5(V0,V1)", 8.05, 8.0, tolerance=0.01, relative=True)
    assert is_worse("FSCR0.5(V0,V1)", 8.1, 8.0, tolerance=0.01, relative=True)
    assert not is_worse("MAnE", math.nan, 1.0)
    assert metric_table.format_value("cross_PCC", 0.12345) == "0.123"
    assert metric_table.format_value("cross_FSCR0.5", 8.126) == "8.13"
    assert metric_table.format_value("cross_FSCR0.5", None) == "–"
    assert metric_table.heading("cross_FSCR0.5") == "cross-half FSCR0.5 (Å)"


def test_the_shipped_captions_are_what_the_table_renders(tmp_path):
    report = ROOT / "workflow" / "report"
    for name, view in metric_table.CAPTIONS.items():
        text = (report / name).read_text()
        assert caption_block(view) in text, f"{name} is out of date: run python -m cryopose.metric_table"
        for key in columns(view):
            assert f"``{key}``" in text
    assert sync_captions(report, check=True) == []
    # Out of date: rewritten in place, once.
    for name in metric_table.CAPTIONS:
        stale = (report / name).read_text().replace("mean symmetry-aware", "old words")
        (tmp_path / name).write_text(stale)
    assert sorted(p.name for p in sync_captions(tmp_path)) == sorted(metric_table.CAPTIONS)
    assert sync_captions(tmp_path, check=True) == []
    assert (tmp_path / "leaderboard.rst").read_text() == (report / "leaderboard.rst").read_text()


def _imports(module: str) -> set[str]:
    tree = ast.parse((SRC / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            out.add(node.module or "")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cryopose"):
            out.add(node.module.removeprefix("cryopose").lstrip("."))
    return out


def test_layers_import_downwards_only():
    assert _imports("metric_table") == set()  # the bottom: nothing of the package
    assert _imports("plots").isdisjoint({"sensitivity", "leaderboard", "evaluate"})
    assert "plots" not in _imports("metric_table") | _imports("metrics")


def test_no_metric_is_recognised_by_its_name():
    """Directions and units come from the table, not from spelling ("PCC" in a key → higher)."""
    for module in ("sensitivity", "leaderboard", "cli", "plots"):
        source = (SRC / f"{module}.py").read_text()
        for guess in ('"PCC" in', '"FSCR" in', "'PCC' in", "'FSCR' in"):
            assert guess not in source, (module, guess)
