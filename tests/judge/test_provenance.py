"""Provenance of every leaderboard row (issue 20, item 5), and merging the leaderboards of two runs."""

import dataclasses
import json
import os
import shutil
import socket
import time

import pandas as pd
import pytest

from cryopose import __version__, leaderboard, provenance
from cryopose.cli import main
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.methods import get_method, write_model_record
from cryopose.reconstruct import DEFAULT_SCHEME
from cryopose.simulate import SimulationSpec, simulate_entry

# ---------------------------------------------------------------------------------------------
# cryopose.provenance
# ---------------------------------------------------------------------------------------------


def test_the_params_hash_is_stable_and_sensitive():
    params = {"seed": 0, "lr": 1e-3, "layers": [64, 128], "nested": {"a": "x", "b": None}}
    h = provenance.params_hash(params)
    assert len(h) == provenance.HASH_DIGITS and int(h, 16) >= 0
    reordered = {"nested": {"b": None, "a": "x"}, "layers": [64, 128], "lr": 1e-3, "seed": 0}
    assert provenance.params_hash(reordered) == h  # keys' order does not matter
    assert provenance.params_hash(json.loads(json.dumps(params))) == h  # a JSON round trip neither
    # Its value across versions and machines: a change of encoding is a change of every hash.
    assert provenance.params_hash({"seed": 0}) == "bd0488843468e63c"
    for changed in (
        {**params, "seed": 1},
        {**params, "lr": 1e-4},
        {**params, "layers": [128, 64]},
        {**params, "nested": {"a": "y", "b": None}},
        {**params, "extra": False},
        {k: v for k, v in params.items() if k != "seed"},
    ):
        assert provenance.params_hash(changed) != h, changed
    assert provenance.params_hash(None) is None


def test_versions_machine_and_judge():
    assert provenance.cryopose_version().startswith(__version__)
    commit = provenance.git_commit()
    assert commit is None or provenance.cryopose_version() == f"{__version__}+git.{commit}"
    assert provenance.method_version("cryopose 0.1.0") == f"cryopose {provenance.cryopose_version()}"
    assert provenance.method_version("cryopose-svd-regressor 0.2.0") == "cryopose-svd-regressor 0.2.0"
    assert provenance.method_version(None) is None
    described = provenance.machine()
    assert "×" in described and "GPU: " in described and "torch " in described
    host = socket.gethostname().split(".")[0]
    assert len(host) < 4 or host not in described  # no host name
    judge = provenance.judge_version("torch", 2, True, False, "nearest")
    assert judge == f"judge {provenance.JUDGE_VERSION}; torch:nearest; pad 2; weighted"
    others = [
        provenance.judge_version("torch", 2, True, False, "trilinear"),
        provenance.judge_version("relion", 2, True, False),
        provenance.judge_version("torch", 1, True, False, "nearest"),
        provenance.judge_version("torch", 2, False, False, "nearest"),
        provenance.judge_version("relion", 2, True, True),
    ]
    assert len({judge, *others}) == 6


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    spec = SimulationSpec(name="pv", symmetry="C1", box_size=24, pixel_size=4.0, n_particles=20, snr=1.0, seed=3)
    return Entry(simulate_entry(spec, tmp_path_factory.mktemp("b"), progress=False))


def test_the_entry_fingerprint_follows_content_not_place_or_time(entry, tmp_path):
    fp = provenance.entry_fingerprint(entry)
    assert len(fp) == provenance.HASH_DIGITS
    # A copy on another machine: another folder, other modification times, the same entry.
    copy = tmp_path / "elsewhere" / entry.name
    shutil.copytree(entry.root, copy)
    for f in copy.iterdir():
        os.utime(f, (1_000_000, 1_000_000))
    assert provenance.entry_fingerprint(Entry(copy)) == fp
    # Another STAR file (one pose), another stack ending: another entry.
    star = copy / "particles_0.star"
    text = star.read_text()
    star.write_text(text.replace(" 0.000000 ", " 0.000001 ", 1) if " 0.000000 " in text else text + "\n")
    assert provenance.entry_fingerprint(Entry(copy)) != fp
    star.write_text(text)
    assert provenance.entry_fingerprint(Entry(copy)) == fp
    stack = next(copy.glob("*.mrcs"))
    data = bytearray(stack.read_bytes())
    data[-1] ^= 0xFF
    stack.write_bytes(bytes(data))
    assert provenance.entry_fingerprint(Entry(copy)) != fp


# ---------------------------------------------------------------------------------------------
# metrics.json and the model record carry it; the leaderboard shows it
# ---------------------------------------------------------------------------------------------


def test_the_model_record_says_what_trained_it(entry, tmp_path):
    params = dataclasses.asdict(get_method("random").settings({"seed": 4}))
    record = write_model_record(tmp_path / "m", "random", entry, 0, params)
    assert json.loads((tmp_path / "m" / "model.json").read_text()) == record
    assert record["provenance"] == {
        "method_version": f"cryopose {provenance.cryopose_version()}",
        "params_hash": provenance.params_hash(params),
        "train_machine": provenance.machine(),
    }


def _predict_truth(entry, tmp_path):
    """The ground truth as predictions of both halves (the files of a submission)."""
    paths = []
    for h in entry.halves:
        paths.append(tmp_path / f"half{h}.star")
        entry.write_half_star(h, paths[-1])
    return paths


def _evaluate(entry, tmp_path, name, *extra):
    half0, half1 = _predict_truth(entry, tmp_path)
    out = tmp_path / name
    argv = [str(entry.root), "--half0", str(half0), "--half1", str(half1), "--out", str(out)]
    code = main(["evaluate", *argv, "--ground-truth-dir", str(tmp_path / "gt"), "--no-plots", "--quiet", *extra])
    return code, out / "metrics.json"


def test_evaluate_writes_the_provenance_of_models_and_judge(entry, tmp_path, capsys):
    params = dataclasses.asdict(get_method("random").settings({"seed": 4}))
    records = [
        write_model_record(tmp_path / f"model{h}", "random", entry, h, params)["provenance"] for h in entry.halves
    ]
    model_json = [str(tmp_path / f"model{h}" / "model.json") for h in entry.halves]
    code, path = _evaluate(entry, tmp_path, "random", "--method", "random", "--model-record", *model_json)
    assert code == 0, capsys.readouterr().err
    p = json.loads(path.read_text())["provenance"]
    assert p == {
        "cryopose_version": provenance.cryopose_version(),
        "judge_version": provenance.judge_version("torch", 2, True, False, DEFAULT_SCHEME),
        "entry_fingerprint": provenance.entry_fingerprint(entry),
        "evaluate_machine": provenance.machine(),
        "method_version": records[0]["method_version"],
        "params_hash": records[0]["params_hash"],
        "train_machine": records[0]["train_machine"],
    }
    row = leaderboard.leaderboard_table([path]).iloc[0]
    for col in leaderboard.PROVENANCE_COLUMNS:
        assert row[col] == p[col], col

    # A +refine of the same models: its refinement's parameters are part of its hash.
    code, path = _evaluate(
        entry,
        tmp_path,
        "refined",
        "--method",
        "random+refine",
        "--model-record",
        *model_json,
        "--param",
        "local_rounds=2",
    )
    assert code == 0, capsys.readouterr().err
    refined = json.loads(path.read_text())["provenance"]
    full = dataclasses.asdict(get_method("random+refine").settings({**params, "local_rounds": 2}))
    assert refined["params_hash"] == provenance.params_hash(full) != p["params_hash"]
    assert refined["method_version"] == records[0]["method_version"]  # refined by the same cryopose

    # Finished poses: the parameters are the poses, wherever and whenever their files were written.
    code, path = _evaluate(entry, tmp_path, "sub", "--method", "truth", "--submitted-from", "poses_{half}.star")
    assert code == 0, capsys.readouterr().err
    sub = json.loads(path.read_text())["provenance"]
    assert sub["method_version"] is None and len(sub["params_hash"]) == provenance.HASH_DIGITS
    time.sleep(1.1)  # the STAR writer's header holds the time
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, path = _evaluate(entry, elsewhere, "sub", "--method", "truth", "--submitted-from", "poses_{half}.star")
    assert code == 0 and json.loads(path.read_text())["provenance"]["params_hash"] == sub["params_hash"]

    # A name of the config's own (a workflow alias) that runs a registered method: its records.
    code, path = _evaluate(
        entry,
        tmp_path,
        "alias",
        "--method",
        "my_random",
        "--registered-method",
        "random",
        "--model-record",
        *model_json,
    )
    assert code == 0, capsys.readouterr().err
    assert json.loads(path.read_text())["provenance"]["params_hash"] == p["params_hash"]

    # Records of another method, or of two configurations, are refused by name.
    code, _ = _evaluate(entry, tmp_path, "x", "--method", "ground_truth", "--model-record", *model_json)
    assert code == 2 and "a model of method 'random', not of 'ground_truth'" in capsys.readouterr().err
    write_model_record(tmp_path / "model1", "random", entry, 1, {**params, "seed": 5})
    code, _ = _evaluate(entry, tmp_path, "x", "--method", "random", "--model-record", *model_json)
    assert code == 2 and "trained with other parameters" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Merging leaderboards
# ---------------------------------------------------------------------------------------------

JUDGE = provenance.judge_version("torch", 2, True, False, "nearest")


def _metrics(folder, method, entry, mane=10.0, fingerprint="f" * 16, judge=JUDGE, params="a" * 16, machine="laptop"):
    record = {
        "method": method,
        "entry": entry,
        "symmetry": "C1",
        "backend": "torch",
        "n_particles": 100.0,
        **{k: 0.5 for k in leaderboard.COLUMNS},
        "MAnE": mane,
        "null_reasons": {},
        "provenance": {
            "cryopose_version": "0.1.0",
            "judge_version": judge,
            "entry_fingerprint": fingerprint,
            "evaluate_machine": machine,
            "method_version": "cryopose 0.1.0",
            "params_hash": params,
            "train_machine": machine,
        },
    }
    path = folder / method / entry / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return path


def _board(folder, specs, seconds=1.0):
    """A leaderboard CSV of ``specs`` (``(method, entry, overrides)``) as ``cryopose leaderboard`` writes it."""
    files = [_metrics(folder, m, e, **kw) for m, e, kw in specs]
    timings = {(m, e): {"train_seconds": seconds, "predict_seconds": seconds} for m, e, _ in specs}
    out = folder / "leaderboard.csv"
    leaderboard.write_leaderboard(leaderboard.leaderboard_table(files, timings), out)
    return out


def test_two_runs_merge_without_losing_or_repeating_a_row(tmp_path, capsys):
    cluster = _board(tmp_path / "cluster", [("m1", "10028", {}), ("m2", "10028", {"mane": 20.0})], seconds=5.0)
    # The laptop ran m2 on 10028 again (the same result, slower, elsewhere) and m1 on another entry.
    laptop = _board(
        tmp_path / "laptop",
        [("m2", "10028", {"mane": 20.0}), ("m1", "sim_c4", {"fingerprint": "e" * 16, "params": "0123456789"})],
        seconds=50.0,
    )
    merged, notes = leaderboard.merge_leaderboards([cluster, laptop])
    assert list(merged.columns) == leaderboard.TABLE_COLUMNS
    assert list(zip(merged["method"], merged["entry"])) == [("m1", "10028"), ("m1", "sim_c4"), ("m2", "10028")]
    assert merged.loc[2, "MAnE"] == 20.0 and merged.loc[2, "train_seconds"] == 5.0  # the first file's copy
    assert merged.loc[1, "params_hash"] == "0123456789"  # text, not the number 123456789
    assert len(notes) == 1 and "m2 on 10028" in notes[0] and "train_seconds" in notes[0]

    out = tmp_path / "merged" / "leaderboard.csv"
    out.parent.mkdir()
    assert main(["merge-leaderboards", str(cluster), str(laptop), "--out", str(out)]) == 0
    assert "kept" in capsys.readouterr().err
    assert len(leaderboard.read_leaderboard(out)) == 3
    summary = pd.read_csv(out.with_name("leaderboard_summary.csv")).set_index("method")
    assert summary.loc["m1", "entries"] == 2 and summary.loc["m2", "entries"] == 1
    assert "| m1 | sim_c4 |" in out.with_suffix(".md").read_text()
    # A merged board merges again, with itself too (every row the same result).
    table, notes = leaderboard.merge_leaderboards([out, cluster])
    assert len(table) == 3 and len(notes) == 2
    # Never over an input.
    assert main(["merge-leaderboards", str(cluster), str(laptop), "--out", str(cluster)]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "laptop, reason",
    [
        ([("m2", "10028", {"fingerprint": "0" * 16})], "entry '10028' has fingerprint 0000000000000000 here"),
        ([("m2", "other", {"judge": JUDGE + "; cesped"})], "judge version"),
        ([("m1", "10028", {"params": "b" * 16})], "other parameters (params_hash bbbbbbbbbbbbbbbb here"),
        ([("m1", "10028", {"mane": 11.0})], "other values (MAnE: 11 here, 10 there)"),
    ],
)
def test_rows_that_are_not_comparable_are_refused_by_name(tmp_path, laptop, reason):
    cluster = _board(tmp_path / "cluster", [("m1", "10028", {})])
    other = _board(tmp_path / "laptop", laptop)
    with pytest.raises(InputError, match="not comparable|the same method") as err:
        leaderboard.merge_leaderboards([cluster, other])
    message = str(err.value)
    assert reason in message, message
    assert str(other) in message and f"{cluster} line 2 (m1 on 10028)" in message  # both files, both rows
    assert "line 2" in message


def test_a_board_without_provenance_is_refused(tmp_path):
    cluster = _board(tmp_path / "cluster", [("m1", "10028", {})])
    old = tmp_path / "old.csv"
    pd.read_csv(cluster).assign(judge_version=None).to_csv(old, index=False)
    with pytest.raises(InputError, match="line 2 .m1 on 10028.: no judge_version"):
        leaderboard.merge_leaderboards([cluster, old])
    pd.read_csv(cluster).drop(columns=leaderboard.PROVENANCE_COLUMNS).to_csv(old, index=False)
    with pytest.raises(
        InputError, match="header: not a leaderboard of this cryopose's columns .missing method_version"
    ):
        leaderboard.merge_leaderboards([cluster, old])
    with pytest.raises(InputError, match="two leaderboards or more"):
        leaderboard.merge_leaderboards([cluster])
