"""An input is never an output: every ``cryopose`` command that writes refuses, before it writes
anything, an output path that is, holds, or lies inside one of its inputs or an entry folder,
compared after resolving symlinks, ``.``, ``..`` and trailing ``/`` (and hard links for files).

Each case asserts a non-zero exit with one error line naming the output and what it would damage,
that the entry folder (files *and* folders) and the earlier outputs in ``ws.out`` are unchanged,
and that no temporary file is left. The workspace is ``tests/cli/test_bad_input.py``'s: a 40-particle
entry ``bench/bad_c2`` and a good run's outputs in ``out/`` (preprocessed copy, models,
predictions, evaluation) and ``gt/`` (ground-truth maps).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from test_bad_input import NAME, Workspace, _fails, golden, ws  # noqa: F401  (fixtures)

from cryopose.cli import main
from cryopose.data import ParticlesDataset
from cryopose.entry import Entry
from cryopose.errors import InputError


def _tree(folder: Path) -> dict[str, str]:
    """Every file (by content) and folder under ``folder``: an added empty folder counts too."""
    return {
        str(p.relative_to(folder)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
    }


def _refused(ws: Workspace, argv: list[str], needles: list[str], capsys, *keep: Path) -> str:
    """``_fails`` (non-zero exit, the needles in the one error line, ``ws.out`` unchanged), and
    the entry and every folder in ``keep`` unchanged too."""
    folders = [ws.entry, ws.root / "gt", *keep]
    before = [_tree(f) for f in folders]
    message = _fails(ws, argv, needles, capsys)
    assert [_tree(f) for f in folders] == before, "an input changed"
    return message


def _named_metrics(ws: Workspace, method: str) -> Path:
    """The good evaluation's metrics.json, recorded as made by ``method`` (the golden run has no
    method name, which the leaderboard, sensitivity and generalisation tables need)."""
    path = ws.out / "eval" / "metrics.json"
    record = json.loads(path.read_text())
    record["method"] = method
    path.write_text(json.dumps(record))
    return path


def _other_entry(ws: Workspace) -> Path:
    """A second entry, not named on the command line: a 'known entry' the guard finds on disk."""
    other = ws.root / "elsewhere" / "other"
    shutil.copytree(ws.entry, other)
    for suffix in ("mask", "source_map"):
        (other / f"{NAME}_{suffix}.mrc").rename(other / f"other_{suffix}.mrc")
    return other


# --------------------------------------------------------------------------------------------
# preprocess: the two examples, and their symlinked variants


def test_preprocess_out_dot_from_the_entry_parent_is_refused(ws, capsys, monkeypatch):
    """``cryopose preprocess g --out .`` run from g's parent would replace g by its copy."""
    monkeypatch.chdir(ws.bench)
    message = _refused(
        ws, ["preprocess", NAME, "--out", ".", "--quiet"], [NAME, "--out", str(ws.entry.resolve())], capsys
    )
    assert (ws.entry / "simulation.json").is_file()
    assert "entry" in message


def test_preprocess_out_the_entry_itself_is_refused(ws, capsys):
    _refused(
        ws,
        ["preprocess", str(ws.entry), "--out", str(ws.entry), "--quiet"],
        [str(ws.entry / NAME), "inside", str(ws.entry.resolve())],
        capsys,
    )


def test_preprocess_out_a_symlink_to_the_entry_parent_is_refused(ws, capsys):
    link = ws.root / "bench-link"
    link.symlink_to(ws.bench, target_is_directory=True)
    _refused(
        ws,
        ["preprocess", str(ws.entry), "--out", str(link), "--quiet"],
        [str(link / NAME), str(ws.entry.resolve())],
        capsys,
    )


@pytest.mark.parametrize(
    "cwd, spelling",
    [("entry", "."), ("entry", "./"), ("bench", f"{NAME}/"), ("entry/sub", ".."), ("link", ".")],
    ids=["dot", "dot-slash", "trailing-slash", "dot-dot", "dot-in-a-symlinked-folder"],
)
def test_preprocess_of_a_dot_entry_names_it_and_keeps_the_other_entries(ws, capsys, monkeypatch, cwd, spelling):
    """``cd g; cryopose preprocess . --out ../pre`` writes ../pre/g and leaves ../pre's other entries."""
    (ws.entry / "sub").mkdir()
    (ws.root / "link").symlink_to(ws.entry, target_is_directory=True)
    pre = ws.bench / "pre"
    shutil.copytree(ws.out / "pre" / NAME, pre / "neighbour")  # another entry already in ../pre
    neighbour = _tree(pre / "neighbour")
    where = {"entry": ws.entry, "bench": ws.bench, "entry/sub": ws.entry / "sub", "link": ws.root / "link"}[cwd]
    monkeypatch.chdir(where)
    out = os.path.relpath(pre, where.resolve())  # relative to the real folder, as the shell's ".." is
    assert main(["preprocess", spelling, "--out", out, "--quiet"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in pre.iterdir()) == sorted([NAME, "neighbour"])
    assert _tree(pre / "neighbour") == neighbour
    copy = ParticlesDataset(pre / NAME, 0)
    assert len(copy) == 40 and (pre / NAME / f"{NAME}_mask.mrc").is_file()


def test_an_entry_given_as_dot_is_named_by_its_folder(ws, monkeypatch):
    monkeypatch.chdir(ws.entry)
    assert Entry(Path(".")).name == NAME
    assert Entry(Path("./")).name == NAME
    assert Entry(Path(f"../{NAME}/")).name == NAME
    assert Entry(Path(".")).mask_path.is_file()


# --------------------------------------------------------------------------------------------
# predict: the ground truth overwritten by predictions (a later evaluation reported MAnE 0)


def _predict(ws: Workspace, out) -> list[str]:
    return [
        "predict",
        "--method",
        "ground_truth",
        "--entry",
        str(ws.entry),
        "--half",
        "1",
        "--model",
        str(ws.out / "model_0"),
        "--out",
        str(out),
    ]


def test_predict_over_the_entry_star_is_refused(ws, capsys):
    before = ws.star(1).read_bytes()
    _refused(ws, _predict(ws, ws.star(1)), [str(ws.star(1)), "--out", str(ws.entry.resolve())], capsys)
    assert ws.star(1).read_bytes() == before


@pytest.mark.parametrize("how", ["folder-symlink", "file-symlink"])
def test_predict_over_the_entry_star_through_a_symlink_is_refused(ws, capsys, how):
    links = ws.root / "links"
    links.mkdir()
    if how == "folder-symlink":
        (links / "g").symlink_to(ws.entry, target_is_directory=True)
        out = links / "g" / "particles_1.star"
    else:
        out = links / "truth.star"
        out.symlink_to(ws.star(1))
    _refused(ws, _predict(ws, out), [str(out), str(ws.star(1).resolve())], capsys, links)


def test_predict_over_a_hard_link_to_the_entry_star_leaves_the_entry(ws, capsys):
    """Not refused, because not damaging: the predictions are renamed over the link's name, which
    unlinks it, and the entry's STAR keeps its bytes (a writer that wrote through would fail this)."""
    before = _tree(ws.entry)
    out = ws.root / "truth.star"
    os.link(ws.star(1), out)
    assert main(_predict(ws, out)) == 0, capsys.readouterr().err
    assert _tree(ws.entry) == before
    assert not os.path.samefile(out, ws.star(1)) and os.stat(ws.star(1)).st_nlink == 1


def test_predict_over_another_entrys_file_is_refused(ws, capsys):
    """Not an input of this command, yet an entry: its files are nobody's output."""
    other = _other_entry(ws)
    for target in (other / "particles_0.star", other / "other_mask.mrc", other / "notes" / "p.star"):
        _refused(ws, _predict(ws, target), [str(target), str(other.resolve()), "entry"], capsys, other)


def test_predict_into_the_model_folder_is_refused(ws, capsys):
    _refused(
        ws,
        _predict(ws, ws.out / "model_0" / "model.json"),
        ["model.json", "--model", str((ws.out / "model_0").resolve())],
        capsys,
    )


# --------------------------------------------------------------------------------------------
# Every other writing command


def test_evaluate_into_the_entry_is_refused(ws, capsys):
    for option in ("--out", "--ground-truth-dir"):
        argv = [
            "evaluate",
            str(ws.entry),
            "--half0",
            str(ws.pred(0)),
            "--half1",
            str(ws.pred(1)),
            "--out",
            str(ws.out / "eval"),
            "--ground-truth-dir",
            str(ws.root / "gt"),
            "--quiet",
        ]
        argv[argv.index(option) + 1] = str(ws.entry)
        _refused(ws, argv, [option, str(ws.entry.resolve())], capsys)


def test_evaluate_over_its_own_predictions_is_refused(ws, capsys):
    """Predictions may lie beside the evaluation (the workflow's sensitivity layout), but no file
    the evaluation writes may be one of them."""
    shutil.copy(ws.pred(1), ws.out / "eval" / "fsc.csv")
    _refused(
        ws,
        [
            "evaluate",
            str(ws.entry),
            "--half0",
            str(ws.pred(0)),
            "--half1",
            str(ws.out / "eval" / "fsc.csv"),
            "--out",
            str(ws.out / "eval"),
            "--ground-truth-dir",
            str(ws.root / "gt"),
            "--quiet",
        ],
        ["fsc.csv", "--half1"],
        capsys,
    )


def test_evaluate_beside_its_predictions_still_works(ws, capsys):
    """The workflow evaluates into the folder that holds the predictions (sensitivity, generalisation)."""
    folder = ws.root / "sens"
    folder.mkdir()
    for h in (0, 1):
        shutil.copy(ws.pred(h), folder / f"half{h}.star")
    assert (
        main(
            [
                "evaluate",
                str(ws.entry),
                "--half0",
                str(folder / "half0.star"),
                "--half1",
                str(folder / "half1.star"),
                "--out",
                str(folder),
                "--ground-truth-dir",
                str(ws.root / "gt"),
                "--no-plots",
                "--quiet",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert (folder / "metrics.json").is_file() and (folder / "half0.star").is_file()


@pytest.mark.parametrize("option", ["--out", "--work-dir"])
def test_train_into_the_entry_is_refused(ws, capsys, option):
    argv = [
        "train",
        "--method",
        "ground_truth",
        "--entry",
        str(ws.entry),
        "--half",
        "0",
        "--out",
        str(ws.out / "model_new"),
        option,
        str(ws.entry / "model"),
    ]
    _refused(ws, argv, [option, str(ws.entry.resolve()), "inside"], capsys)


def test_refine_over_its_predictions_is_refused(ws, capsys):
    _refused(
        ws,
        [
            "refine",
            "--entry",
            str(ws.entry),
            "--half",
            "0",
            "--predictions",
            str(ws.pred(0)),
            "--reference",
            str(ws.root / "gt" / "GT_half1.mrc"),
            "--out",
            str(ws.pred(0)),
            "--quiet",
        ],
        [str(ws.pred(0)), "--predictions"],
        capsys,
    )


def test_ground_truth_into_the_entry_is_refused(ws, capsys):
    link = ws.root / "entry-link"
    link.symlink_to(ws.entry, target_is_directory=True)
    _refused(
        ws, ["ground-truth", str(ws.entry), "--out", str(link), "--quiet"], [str(link), str(ws.entry.resolve())], capsys
    )


def test_leaderboard_over_a_metrics_file_is_refused(ws, capsys):
    metrics = _named_metrics(ws, "ground_truth")
    _refused(ws, ["leaderboard", str(metrics), "--out", str(metrics)], [str(metrics), "metrics"], capsys)


def test_generalisation_over_a_metrics_file_is_refused(ws, capsys):
    metrics = _named_metrics(ws, "ground_truth")
    _refused(ws, ["generalisation", str(metrics), "--out", str(metrics)], [str(metrics), "metrics"], capsys)


def test_sensitivity_over_the_fsc_table_it_reads_is_refused(ws, capsys):
    """The FSC curves are read from beside each metrics.json: an input the command line never names."""
    metrics = _named_metrics(ws, "perturbation:exact")
    fsc = ws.out / "eval" / "fsc.csv"
    _refused(ws, ["sensitivity", str(metrics), "--out", str(fsc)], [str(fsc), "fsc"], capsys)


def test_perturb_over_the_entry_star_is_refused(ws, capsys):
    _refused(
        ws,
        ["perturb", "--entry", str(ws.entry), "--half", "0", "--perturbation", "random50", "--out", str(ws.star(0))],
        [str(ws.star(0)), str(ws.entry.resolve())],
        capsys,
    )


def test_evaluate_perturbations_into_the_entry_is_refused(ws, capsys):
    """Each level's predictions and evaluation go under --out-root, the shared maps into
    --ground-truth-dir: neither may lie in the entry it perturbs."""
    for option in ("--out-root", "--ground-truth-dir"):
        argv = ["evaluate-perturbations", str(ws.entry), "--perturbation", "exact", "--perturbation", "noise1"]
        argv += ["--out-root", str(ws.out / "sens"), "--ground-truth-dir", str(ws.root / "gt"), "--quiet"]
        argv[argv.index(option) + 1] = str(ws.entry)
        _refused(ws, argv, [option, str(ws.entry.resolve())], capsys)


def test_download_into_an_entry_is_refused(ws, capsys):
    # An unreachable server: the old code got as far as making .download/ inside the entry.
    _refused(
        ws,
        ["download", "TEST", "--out", str(ws.entry), "--base-url", "http://127.0.0.1:9", "--retries", "0", "--quiet"],
        [str(ws.entry / "TEST"), str(ws.entry.resolve())],
        capsys,
    )


@pytest.mark.parametrize("case", ["into-an-entry", "over-a-benchmark-folder", "over-its-own-source"])
def test_simulate_over_inputs_or_entries_is_refused(ws, capsys, case):
    small = ["--box-size", "16", "--n-particles", "4", "--pixel-size", "4", "--quiet"]
    if case == "into-an-entry":
        argv, needles = ["simulate", "--name", "x", "--out", str(ws.entry), *small], [str(ws.entry.resolve())]
    elif case == "over-a-benchmark-folder":  # --overwrite would replace the whole benchmark
        argv = ["simulate", "--name", "bench", "--out", str(ws.root), "--overwrite", *small]
        needles = [str(ws.bench), str(ws.entry.resolve()), "holds"]
    else:  # re-simulating an entry from its own map: the map is replaced while being the source
        source = ws.entry / f"{NAME}_source_map.mrc"
        argv = ["simulate", "--name", NAME, "--out", str(ws.bench), "--overwrite", "--source", str(source), *small]
        needles = [str(ws.entry), "--source", str(source.resolve())]
    _refused(ws, argv, needles, capsys)


def test_simulate_and_preprocess_may_still_replace_their_own_earlier_output(ws, capsys):
    """The guard does not stop the ordinary reruns: an earlier preprocessed copy is replaced, an
    identical simulated entry is kept."""
    assert main(["preprocess", str(ws.entry), "--out", str(ws.out / "pre"), "--quiet"]) == 0, capsys.readouterr().err
    spec = json.loads((ws.entry / "simulation.json").read_text())
    spec_file = ws.root / "spec.json"
    spec_file.write_text(json.dumps(spec))
    assert main(["simulate", "--spec", str(spec_file), "--out", str(ws.bench), "--quiet"]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The guard itself


def test_the_guard_compares_resolved_paths(tmp_path, monkeypatch):
    from cryopose.guard import refuse_overwriting_inputs

    inp = tmp_path / "a" / "in.star"
    inp.parent.mkdir()
    inp.write_text("x")
    monkeypatch.chdir(tmp_path / "a")
    for out in (
        "in.star",
        "./in.star",
        "../a/in.star",
        str(tmp_path / "a" / "." / "in.star"),
        ".",
        "..",
        "in.star/sub.star",
    ):
        with pytest.raises(InputError, match="--out"):
            refuse_overwriting_inputs({"--out": out}, {"--in": inp})
    refuse_overwriting_inputs({"--out": "other.star"}, {"--in": inp})  # a sibling is fine
    refuse_overwriting_inputs({"--out": None}, {"--in": inp})  # an output not asked for


def test_the_guard_finds_entries_it_was_not_told_about(tmp_path):
    from cryopose.guard import refuse_overwriting_inputs

    entry = tmp_path / "bench" / "g"
    entry.mkdir(parents=True)
    (entry / "particles_0.star").write_text("")
    for out in (entry, entry / "x.star", tmp_path / "bench", tmp_path):
        with pytest.raises(InputError, match="entry"):
            refuse_overwriting_inputs({"--out": out}, {})
    # A command that builds entries may replace one (its earlier copy), never hold one.
    refuse_overwriting_inputs({"--out": entry}, {}, builds_entries=True)
    with pytest.raises(InputError, match="holds"):
        refuse_overwriting_inputs({"--out": tmp_path / "bench"}, {}, builds_entries=True)
