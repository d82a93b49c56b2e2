"""Degenerate maps and weights never become numbers (issue 17, class 2).

Two outcomes, one per kind of degeneracy:

* bad input that can be seen before any reconstruction (complex-valued stacks, an all-zero mask,
  confidences that are all zero, negative or NaN while they weight the reconstruction) stops with
  an :class:`InputError` naming the file, the field and what was expected;
* a map that is degenerate only once reconstructed (zero, constant, NaN) makes every metric that
  depends on it ``null`` in ``metrics.json``, with the reason in ``null_reasons``; the metric
  functions themselves return NaN, never the box size; the leaderboard, sensitivity and
  generalisation tables show such values as missing.

Reuses the module-scoped good entry and outputs of ``test_bad_input`` (40 particles of 32 px).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from test_bad_input import NAME, Workspace, _edit_particles, _evaluate, _fails, _preprocess, golden, ws  # noqa: F401

from cryopose import io, sensitivity
from cryopose.cli import main
from cryopose.data import ParticlesDataset
from cryopose.errors import InputError
from cryopose.leaderboard import leaderboard_table, summary_table, to_markdown
from cryopose.metrics import compare_maps, fsc_curve, fsc_resolution, pearson_correlation
from cryopose.reconstruct import reconstruct
from cryopose.sensitivity import METRICS, _markdown, monotone_violations, sensitivity_table, write_sensitivity

BOX_ANGSTROM = 32 * 4.1  # the golden entry's box: the value a degenerate FSC used to report
FSC_KEYS = [
    f"{prefix}FSCR{t}{pair}"
    for prefix in ("", "masked_")
    for t in ("0.143", "0.5")
    for pair in ("(GT,V)", "(V0,V1)", "(GT0,GT1)")
]


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _assert_no_number_without_meaning(m: dict) -> None:
    """Every map metric is a finite number or null with a recorded reason."""
    reasons = m["null_reasons"]
    for key, value in m.items():
        if key in ("null_reasons", "method", "trained_on", "provenance") or isinstance(value, (str, bool)):
            continue
        if value is None:
            assert reasons.get(key), f"{key} is null without a reason"
        else:
            assert math.isfinite(value), key


# --------------------------------------------------------------------------------------------
# Confidences (rlnParticleFigureOfMerit) weighting the reconstruction


def test_all_zero_confidences_are_refused(ws, capsys):
    _edit_particles(ws.pred(1), lambda p: p.assign(rlnParticleFigureOfMerit=0.0))
    _fails(ws, _evaluate(ws), ["pred_1.star", "rlnParticleFigureOfMerit", "all 0", "--no-pred-confidence"], capsys)
    # The suggested way out works: unweighted, the same predictions are scored.
    assert main(_evaluate(ws, "--no-pred-confidence", out=ws.root / "unweighted")) == 0
    _assert_no_number_without_meaning(_metrics(ws.root / "unweighted"))


def test_negative_confidence_is_refused_unless_unused(ws, capsys):
    _edit_particles(
        ws.pred(0),
        lambda p: p.assign(rlnParticleFigureOfMerit=np.where(p.index == 3, -0.5, p["rlnParticleFigureOfMerit"])),
    )
    _fails(
        ws, _evaluate(ws), ["pred_0.star", "rlnParticleFigureOfMerit", "-0.5", ">= 0", "--no-pred-confidence"], capsys
    )
    # Unused, the column is not read: the evaluation goes through.
    assert main(_evaluate(ws, "--no-pred-confidence", out=ws.root / "unweighted")) == 0


def test_nan_confidence_is_refused(ws, capsys):
    """A NaN is refused by the STAR reader as in any numeric column, used or not: the file is corrupt."""
    _edit_particles(
        ws.pred(1),
        lambda p: p.assign(rlnParticleFigureOfMerit=np.where(p.index == 7, np.nan, p["rlnParticleFigureOfMerit"])),
    )
    _fails(ws, _evaluate(ws), ["pred_1.star", "rlnParticleFigureOfMerit", "row 7", "finite"], capsys)
    _fails(ws, _evaluate(ws, "--no-pred-confidence"), ["pred_1.star", "rlnParticleFigureOfMerit", "finite"], capsys)


def test_a_handful_of_non_zero_confidences_is_scored(ws):
    """Three weighted particles per half make thin but real maps: scored, not refused, and every
    map metric is a number or null with a reason."""
    for h in (0, 1):
        _edit_particles(ws.pred(h), lambda p: p.assign(rlnParticleFigureOfMerit=np.where(p.index < 3, 1.0, 0.0)))
    assert main(_evaluate(ws, out=ws.root / "few")) == 0
    m = _metrics(ws.root / "few")
    _assert_no_number_without_meaning(m)
    assert m["PCC(V0,V1)"] is not None and m["use_pred_confidence"] is True


# --------------------------------------------------------------------------------------------
# Masks


def test_all_zero_mask_is_refused(ws, capsys):
    io.write_map(ws.entry / f"{NAME}_mask.mrc", np.zeros((32,) * 3, np.float32), 4.1)
    _fails(ws, _evaluate(ws), [f"{NAME}_mask.mrc", "zero everywhere"], capsys)


def test_all_ones_mask_gives_the_unmasked_values(ws):
    io.write_map(ws.entry / f"{NAME}_mask.mrc", np.ones((32,) * 3, np.float32), 4.1)
    assert main(_evaluate(ws, out=ws.root / "ones")) == 0
    m = _metrics(ws.root / "ones")
    assert m["mask_source"] == "entry" and m["null_reasons"] == {}
    for key in ("PCC(GT,V)", "FSCR0.5(V0,V1)", "delta_FSCR0.143", "delta_PCC"):
        assert m[f"masked_{key}"] == pytest.approx(m[key], rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------------------------
# Complex-valued stacks (MRC modes 3 and 4)


def _make_complex(path: Path, mode: int) -> None:
    with mrcfile.open(path) as mrc:
        data, voxel = np.array(mrc.data), mrc.voxel_size.copy()
    if mode == 4:  # complex64: twice the bytes of the float32 stack
        with mrcfile.new(path, data=data.astype(np.complex64), overwrite=True) as mrc:
            mrc.voxel_size = voxel
    else:  # complex int16 has float32's size per value: relabel the header's mode word
        raw = bytearray(path.read_bytes())
        raw[12:16] = np.int32(mode).tobytes()
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("step", ["evaluate", "preprocess"])
@pytest.mark.parametrize("mode", [3, 4])
def test_complex_stack_is_refused(ws, capsys, mode, step):
    _make_complex(ws.stack(0), mode)
    command = _evaluate(ws) if step == "evaluate" else _preprocess(ws)
    _fails(ws, command, ["particles_0.mrcs", f"mode {mode}", "complex", "real"], capsys)


def test_complex_stack_is_refused_by_the_dataset_and_the_reconstruction(ws):
    _make_complex(ws.stack(1), 4)
    with pytest.raises(InputError, match=r"particles_1\.mrcs.*mode 4.*complex"):
        ParticlesDataset(ws.entry, 1)
    with pytest.raises(InputError, match=r"particles_1\.mrcs.*mode 4.*complex"):
        reconstruct(ws.star(1), symmetry="C2", progress=False)


# --------------------------------------------------------------------------------------------
# Maps that are degenerate once reconstructed


def test_zero_half_map_after_reconstruction_is_null_with_a_reason(ws, capsys):
    """Half 1's images all zero: GT1 and V1 are zero maps. Everything that compares them is null
    with the reason; GT = GT0/2 and V = V0/2 are still real maps and keep their numbers."""
    with mrcfile.mmap(ws.stack(1), "r+") as mrc:
        mrc.data[:] = 0
    capsys.readouterr()
    assert main(_evaluate(ws, out=ws.root / "zero")) == 0
    printed = capsys.readouterr().out
    m = _metrics(ws.root / "zero")
    _assert_no_number_without_meaning(m)
    for pair, zero in (("(V0,V1)", "V1"), ("(GT0,GT1)", "GT1")):
        for key in (f"PCC{pair}", f"FSCR0.143{pair}", f"FSCR0.5{pair}", f"masked_FSCR0.5{pair}"):
            assert m[key] is None, key
            assert zero in m["null_reasons"][key] and "zero" in m["null_reasons"][key]
    for key in ("delta_PCC", "delta_FSCR0.5", "masked_delta_FSCR0.143"):
        assert m[key] is None and "GT1" in m["null_reasons"][key]
    assert m["PCC(GT,V)"] is not None and m["FSCR0.143(GT,V)"] is not None
    assert "n/a" in printed and "GT1 is zero" in printed
    # Cross-half agreement: both halves compare a zero map (V1 against GT0, V0 against GT1), so
    # the mean over the halves is null, with both reasons; so is every Δ.
    for key in (
        "cross_PCC",
        "cross_FSCR0.5",
        "masked_cross_FSCR0.143",
        "delta_cross_PCC",
        "masked_delta_cross_PCC",
        "delta_cross_FSCR0.143",
    ):
        assert m[key] is None, key
        assert "V1 is zero" in m["null_reasons"][key] and "GT1 is zero" in m["null_reasons"][key], key
    assert BOX_ANGSTROM not in [m[k] for k in FSC_KEYS]


def test_zero_ground_truth_without_an_entry_mask_gives_nulls_not_a_crash(ws):
    """Every image zero and no mask shipped: GT is zero, so no mask can be built from it. All map
    metrics are null with reasons (the masked ones: no mask); the pose metrics remain."""
    (ws.entry / f"{NAME}_mask.mrc").unlink()
    for h in (0, 1):
        with mrcfile.mmap(ws.stack(h), "r+") as mrc:
            mrc.data[:] = 0
    assert main(_evaluate(ws, out=ws.root / "zero")) == 0
    m = _metrics(ws.root / "zero")
    _assert_no_number_without_meaning(m)
    assert m["mask_source"] == "none" and m["MAnE"] is not None
    for key in FSC_KEYS:
        assert m[key] is None
    assert "no mask: GT is zero" in m["null_reasons"]["masked_PCC(V0,V1)"]
    assert "GT0 is zero" in m["null_reasons"]["FSCR0.5(GT0,GT1)"]
    assert m["masked_cross_PCC"] is None and "no mask: GT is zero" in m["null_reasons"]["masked_cross_PCC"]
    assert m["delta_cross_FSCR0.5"] is None and "V0 is zero" in m["null_reasons"]["delta_cross_FSCR0.5"]


def test_zero_map_metric_functions_give_nan_not_the_box_size():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24,) * 3).astype(np.float32)
    zero = np.zeros_like(x)
    for a, b in ((zero, x), (x, zero), (zero, zero)):  # (0, 0): 0/0 in every shell
        freqs, fsc = fsc_curve(a, b, 2.0)
        assert np.isnan(fsc[1:]).all()
        for t in (0.143, 0.5):
            assert math.isnan(fsc_resolution(freqs, fsc, t))
        cmp = compare_maps(a, b, 2.0, mask=np.ones_like(x), names=("A", "B"))
        flat = cmp.as_dict("(A,B)")
        assert all(math.isnan(v) for v in flat.values()), flat
        assert set(cmp.null_reasons("(A,B)")) == set(flat)
        assert all("zero" in r for r in cmp.null_reasons("(A,B)").values())
    assert math.isnan(pearson_correlation(zero, x))


@pytest.mark.parametrize("d", [24, 25])  # 25: an FFT of a constant that is not exactly zero off-centre
def test_constant_map_metrics_are_nan(d):
    x = np.random.default_rng(1).normal(size=(d,) * 3).astype(np.float32)
    const = np.full_like(x, 3.7)
    cmp = compare_maps(x, const, 1.5, names=("V0", "V1"))
    assert math.isnan(cmp.pcc) and all(math.isnan(r) for r in cmp.resolution.values())
    assert "V1 is constant" in cmp.null_reasons("(V0,V1)")["FSCR0.5(V0,V1)"]
    assert math.isnan(pearson_correlation(const, x))
    _, fsc = fsc_curve(const, x, 1.5)
    assert np.isnan(fsc[1:]).all()


def test_non_finite_map_metrics_are_nan():
    x = np.random.default_rng(2).normal(size=(16,) * 3).astype(np.float32)
    bad = x.copy()
    bad[3, 4, 5] = np.nan
    cmp = compare_maps(x, bad, 1.0, mask=np.ones_like(x), names=("GT", "V"))
    assert all(math.isnan(v) for v in cmp.as_dict().values())
    assert "NaN or infinite" in cmp.null_reasons()["masked_PCC"]
    bad[3, 4, 5] = np.inf
    freqs, fsc = fsc_curve(x, bad, 1.0)
    assert math.isnan(fsc_resolution(freqs, fsc, 0.143))


def test_a_mask_that_misses_the_density_gives_null_masked_metrics():
    x = np.zeros((16,) * 3, np.float32)
    x[:8] = np.random.default_rng(3).normal(size=(8, 16, 16))
    mask = np.zeros_like(x)
    mask[10:] = 1  # only where x is zero
    cmp = compare_maps(x, x, 1.0, mask=mask, names=("GT", "V"))
    assert cmp.pcc == pytest.approx(1.0) and math.isnan(cmp.masked_pcc)
    assert all(math.isnan(r) for r in cmp.masked_resolution.values())
    assert "GT is zero inside the mask" in cmp.null_reasons()["masked_FSCR0.5"]
    assert "PCC" not in cmp.null_reasons()


def test_fsc_resolution_on_undefined_shells():
    freqs = np.arange(17) / (32 * 4.0)  # shells 1-4 (128 to 32 Å) are the low-frequency region
    nan = float("nan")
    # Undefined at low resolution: nothing to measure, not the box size.
    assert math.isnan(fsc_resolution(freqs, np.r_[1.0, nan, np.ones(15)], 0.143))
    # Undefined before the curve crosses: where it would cross is unknown.
    assert math.isnan(fsc_resolution(freqs, np.r_[1.0, 1.0, 1.0, 0.9, nan, np.full(12, 0.0)], 0.5))
    # A crossing before the undefined shells is measured.
    res = fsc_resolution(freqs, np.r_[1.0, 1.0, 0.9, 0.8, 0.7, 0.2, np.full(11, nan)], 0.5)
    assert 1 / freqs[5] < res < 1 / freqs[4]
    with pytest.raises(ValueError):
        fsc_resolution(freqs, np.r_[1.0, 1.0, np.inf, np.ones(14)], 0.5)


# --------------------------------------------------------------------------------------------
# Tables that gather metrics.json files


def _write(path: Path, record: dict) -> Path:
    path.write_text(json.dumps(record))
    return path


def test_leaderboard_shows_a_null_as_missing_and_its_summary_says_so(tmp_path, capsys):
    good = {
        "method": "m",
        "entry": "a",
        "MAnE": 10.0,
        "wMAnE": 9.0,
        "delta_PCC": 0.1,
        "delta_FSCR0.5": 2.0,
        "delta_FSCR0.143": 1.0,
        "null_reasons": {},
    }
    bad = {
        **good,
        "entry": "b",
        "delta_FSCR0.5": None,
        "delta_FSCR0.143": None,
        "null_reasons": {"delta_FSCR0.5": "GT1 is zero", "delta_FSCR0.143": "GT1 is zero"},
    }
    files = [_write(tmp_path / "a.json", good), _write(tmp_path / "b.json", bad)]
    table = leaderboard_table(files)
    row = table[table.entry == "b"].iloc[0]
    assert math.isnan(row["delta_FSCR0.5"]) and "delta_FSCR0.5: GT1 is zero" in row["null_reasons"]
    summary = summary_table(table)
    s = summary.iloc[0]
    assert s["delta_FSCR0.5_mean"] == pytest.approx(2.0) and s["delta_FSCR0.5_missing"] == 1
    assert s["delta_PCC_mean"] == pytest.approx(0.1) and s["delta_PCC_missing"] == 0
    md = to_markdown(table, summary)
    b_line = next(line for line in md.splitlines() if line.startswith("| m | b |"))
    assert "–" in b_line and "nan" not in md.lower()
    assert "1 missing" in md and "GT1 is zero" in md
    assert main(["leaderboard", *map(str, files), "--out", str(tmp_path / "lb.csv")]) == 0
    assert "1 missing" in capsys.readouterr().out


def _perturbation(tmp_path: Path, name: str, fsc05: float | None, reasons: dict) -> Path:
    record = {
        "method": f"perturbation:{name}",
        "entry": "e",
        "null_reasons": reasons,
        **{k: (0.9 if "PCC" in k else 10.0) for k in METRICS},
        "MAnE": 0.0 if name == "exact" else 1.0,
        "FSCR0.5(V0,V1)": fsc05,
    }
    return _write(tmp_path / f"{name}.json", record)


def test_sensitivity_table_with_a_null_shows_missing(tmp_path, capsys):
    files = [
        _perturbation(tmp_path, "exact", 8.0, {}),
        _perturbation(tmp_path, "noise1", None, {"FSCR0.5(V0,V1)": "V1 is zero"}),
        _perturbation(tmp_path, "noise3", 9.0, {}),
    ]
    table = sensitivity_table(files)
    assert table["FSCR0.5(V0,V1)"].isna().sum() == 1
    md = _markdown(table)
    assert "nan" not in md.lower() and "–" in md and "V1 is zero" in md
    assert sensitivity.missing_values(table) == ["e, noise: FSCR0.5(V0,V1) is missing at 1 (V1 is zero)"]
    # The trend is checked across the gap: 8 Å at 0 and 9 Å at 3 is monotone.
    assert monotone_violations(table) == []
    write_sensitivity(table, tmp_path / "s.csv")
    assert (tmp_path / "s.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["sensitivity", *map(str, files), "--out", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "missing: e, noise: FSCR0.5(V0,V1) is missing at 1 (V1 is zero)" in out


def test_generalisation_table_with_a_null_shows_missing(tmp_path, capsys):
    base = {"method": "m", "MAnE": 10.0, "wMAnE": 9.0, "delta_PCC": 0.1, "delta_FSCR0.143": 1.0}
    files = [
        _write(tmp_path / "in.json", {**base, "entry": "a", "trained_on": "a", "delta_FSCR0.5": 2.0}),
        _write(
            tmp_path / "out.json",
            {
                **base,
                "entry": "b",
                "trained_on": "a",
                "delta_FSCR0.5": None,
                "null_reasons": {"delta_FSCR0.5": "V1 is zero"},
            },
        ),
    ]
    capsys.readouterr()
    assert main(["generalisation", *map(str, files), "--out", str(tmp_path / "g.csv")]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "–" in out
    assert (tmp_path / "g.png").stat().st_size > 0


def test_a_reason_with_several_causes_is_kept_whole(tmp_path):
    """One null can have several causes joined by '; ': the table keeps them all."""
    files = [
        _perturbation(tmp_path, "exact", 8.0, {}),
        _perturbation(tmp_path, "noise1", None, {"FSCR0.5(V0,V1)": "V0 is zero; V1 is zero"}),
    ]
    assert sensitivity.missing_values(sensitivity_table(files)) == [
        "e, noise: FSCR0.5(V0,V1) is missing at 1 (V0 is zero; V1 is zero)"
    ]
    write_sensitivity(sensitivity_table(files), tmp_path / "s.csv")
    assert sensitivity.missing_values(pd.read_csv(tmp_path / "s.csv")) == [
        "e, noise: FSCR0.5(V0,V1) is missing at 1 (V0 is zero; V1 is zero)"
    ]
