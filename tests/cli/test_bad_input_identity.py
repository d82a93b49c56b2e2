"""Particle identity and late shape errors, through the command line.

RELION treats ``000007@stack.mrcs``, ``7@stack.mrcs``, ``7@./stack.mrcs``, ``7@dir/../stack.mrcs``
and an absolute path to the same file as one image. Two rows naming one image in two spellings,
or a half whose rows point into the other half's stack, would make the halves dependent and the
benchmark's cross-prediction void: they must be refused, naming the STAR file and the row, by
every command that reads the entry. A ground-truth cache of another box must be named too,
instead of surfacing as a numpy broadcasting error (or being silently rebuilt over).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_bad_input import NAME, N, _edit_particles, _evaluate, _fails, golden, ws  # noqa: F401 (fixtures)

from cryopose import io
from cryopose.cli import main
from cryopose.simulate import SimulationSpec, simulate_entry


def _spellings(ws) -> dict[str, str]:
    """Other spellings of image 1 of particles_0.mrcs (the first row's ``000001@particles_0.mrcs``)."""
    (ws.entry / "sub").mkdir(exist_ok=True)  # the OS resolves sub/.. only when sub exists, as RELION's open does
    return {
        "short-index": "1@particles_0.mrcs",
        "dot-slash": "000001@./particles_0.mrcs",
        "dot-dot": "1@sub/../particles_0.mrcs",
        "absolute": f"1@{ws.stack(0)}",
    }


SPELLINGS = ["short-index", "dot-slash", "dot-dot", "absolute"]


def _name_image_1_twice(ws, spelling: str) -> str:
    other = _spellings(ws)[spelling]
    first = io.read_particles_star(ws.star(0)).particles["rlnImageName"].iloc[0]
    assert first == "000001@particles_0.mrcs"
    _edit_particles(ws.star(0), lambda p: p.assign(rlnImageName=p["rlnImageName"].where(p.index != 5, other)))
    return other


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_info_refuses_one_image_named_twice(ws, capsys, spelling):
    other = _name_image_1_twice(ws, spelling)
    message = _fails(
        ws,
        ["info", str(ws.entry)],
        ["particles_0.star", "row 5 (0-based)", "rlnImageName", "same image", "row 0"],
        capsys,
    )
    assert other in message


@pytest.mark.parametrize("spelling", ["short-index", "dot-dot"])
def test_preprocess_refuses_one_image_named_twice(ws, capsys, spelling):
    _name_image_1_twice(ws, spelling)
    _fails(
        ws,
        ["preprocess", str(ws.entry), "--out", str(ws.out / "pre"), "--quiet"],
        ["particles_0.star", "row 5 (0-based)", "same image"],
        capsys,
    )


def test_evaluate_refuses_one_image_named_twice(ws, capsys):
    _name_image_1_twice(ws, "absolute")
    _fails(ws, _evaluate(ws), ["particles_0.star", "row 5 (0-based)", "same image"], capsys)


def _point_half_1_into_stack_0(ws, rows) -> None:
    _edit_particles(
        ws.star(1),
        lambda p: p.assign(
            rlnImageName=[
                f"{N - i:06d}@particles_0.mrcs" if i in rows else name for i, name in enumerate(p["rlnImageName"])
            ]
        ),
    )


@pytest.mark.parametrize("command", ["info", "preprocess", "evaluate"])
def test_half_1_rows_in_the_stack_of_half_0_are_refused(ws, capsys, command):
    _point_half_1_into_stack_0(ws, rows={3})
    argv = {
        "info": ["info", str(ws.entry)],
        "preprocess": ["preprocess", str(ws.entry), "--out", str(ws.out / "pre"), "--quiet"],
        "evaluate": _evaluate(ws),
    }[command]
    _fails(ws, argv, ["particles_1.star", "row 3 (0-based)", "particles_0.mrcs", "half 0", "independent"], capsys)


def test_a_stack_shared_by_both_halves_under_another_name_is_refused(ws, capsys):
    """Half 1 reaching half 0's images through a second name of the same file (a symbolic link)."""
    (ws.entry / "alias.mrcs").symlink_to("particles_0.mrcs")
    _edit_particles(
        ws.star(1), lambda p: p.assign(rlnImageName=p["rlnImageName"].where(p.index != 2, "000004@alias.mrcs"))
    )
    _fails(ws, ["info", str(ws.entry)], ["particles_1.star", "row 2 (0-based)", "alias.mrcs", "half 0"], capsys)


def test_predictions_in_another_spelling_are_the_same_particles(ws, capsys):
    """The identity is one definition: predictions that spell the entry's names differently are
    matched to the same particles (and evaluate as the ground truth does)."""
    for h in (0, 1):
        _edit_particles(
            ws.pred(h),
            lambda p: p.assign(rlnImageName=[f"{int(n.split('@')[0])}@./{n.split('@')[1]}" for n in p["rlnImageName"]]),
        )
    capsys.readouterr()
    assert main(_evaluate(ws, "--no-plots", out=ws.out / "eval_spelling")) == 0, capsys.readouterr().err
    metrics = json.loads((ws.out / "eval_spelling" / "metrics.json").read_text())
    assert metrics["n_particles"] == 2 * N and metrics["MAnE"] < 0.01


def _other_box_cache(ws, tmp_path, box: int, pixel_size: float) -> None:
    """Replace the workspace's ground-truth cache with the cache of an entry of the same name but
    another box or pixel size (another benchmark folder)."""
    spec = SimulationSpec(name=NAME, symmetry="C2", box_size=box, pixel_size=pixel_size, n_particles=N, snr=1.0, seed=5)
    other = simulate_entry(spec, tmp_path / "other_bench", progress=False)
    shutil.rmtree(ws.root / "gt")
    assert main(["ground-truth", str(other), "--out", str(ws.root / "gt"), "--quiet"]) == 0


@pytest.mark.parametrize("box, pixel_size, needle", [(24, 4.1, "24"), (32, 3.0, "3")])
def test_evaluate_names_a_ground_truth_cache_of_another_box(ws, tmp_path, capsys, box, pixel_size, needle):
    _other_box_cache(ws, tmp_path, box, pixel_size)
    before = {p.name: p.read_bytes() for p in (ws.root / "gt").iterdir()}
    message = _fails(ws, _evaluate(ws), ["GT_half0.mrc", "ground-truth", needle], capsys)
    assert "broadcast" not in message
    assert {p.name: p.read_bytes() for p in (ws.root / "gt").iterdir()} == before, "another entry's cache was changed"


def test_evaluate_names_a_ground_truth_map_of_another_box_under_a_matching_record(ws, capsys):
    """A map replaced by one of another box while the record still matches (a cache written by an
    older version, or edited): named with the file, not a numpy broadcasting error."""
    io.write_map(ws.root / "gt" / "GT_half1.mrc", np.zeros((24,) * 3, np.float32), 4.1)
    message = _fails(ws, _evaluate(ws), ["GT_half1.mrc", "24", "32"], capsys)
    assert "broadcast" not in message
