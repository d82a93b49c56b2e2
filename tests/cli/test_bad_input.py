"""Bad-input sweep: every case runs a ``cryopose`` command on a damaged input and asserts

* a non-zero exit with one error line that names the file, the row or field, and what was expected;
* that nothing already written changed: an earlier preprocessed copy, evaluation, model and
  predictions keep their bytes, no file appears, and no temporary file is left behind.

The outputs live in ``ws.out``; every case starts from a fresh copy of a good entry and of the
outputs a good run made from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryopose import io
from cryopose.cli import main
from cryopose.data import ParticlesDataset
from cryopose.errors import InputError
from cryopose.simulate import SimulationSpec, simulate_entry

NAME = "bad_c2"
N = 40


@dataclass
class Workspace:
    root: Path

    @property
    def bench(self) -> Path:
        return self.root / "bench"

    @property
    def entry(self) -> Path:
        return self.bench / NAME

    @property
    def out(self) -> Path:
        return self.root / "out"

    def star(self, h: int) -> Path:
        return self.entry / f"particles_{h}.star"

    def stack(self, h: int) -> Path:
        return self.entry / f"particles_{h}.mrcs"

    def pred(self, h: int) -> Path:
        return self.out / f"pred_{h}.star"


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """A good entry and the outputs of a good run on it: a preprocessed copy, ground-truth maps,
    models, predictions and an evaluation."""
    root = tmp_path_factory.mktemp("golden")
    spec = SimulationSpec(name=NAME, symmetry="C2", box_size=32, pixel_size=4.1, n_particles=N, snr=1.0, seed=5)
    simulate_entry(spec, root / "bench", progress=False)
    ws = Workspace(root)
    ok = [
        main(["preprocess", str(ws.entry), "--out", str(ws.out / "pre"), "--quiet"]),
        main(["ground-truth", str(ws.entry), "--out", str(root / "gt"), "--quiet"]),
    ]
    for h in (0, 1):
        ok.append(
            main(
                [
                    "train",
                    "--method",
                    "ground_truth",
                    "--entry",
                    str(ws.entry),
                    "--half",
                    str(1 - h),
                    "--out",
                    str(ws.out / f"model_{1 - h}"),
                ]
            )
        )
        ok.append(
            main(
                [
                    "predict",
                    "--method",
                    "ground_truth",
                    "--entry",
                    str(ws.entry),
                    "--half",
                    str(h),
                    "--model",
                    str(ws.out / f"model_{1 - h}"),
                    "--out",
                    str(ws.pred(h)),
                ]
            )
        )
    ok.append(main(_evaluate(ws)))
    assert ok == [0] * len(ok)
    return root


@pytest.fixture
def ws(golden, tmp_path) -> Workspace:
    shutil.copytree(golden, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def _evaluate(
    ws: Workspace, *extra: str, half0: Path | None = None, half1: Path | None = None, out: Path | None = None
) -> list[str]:
    return [
        "evaluate",
        str(ws.entry),
        "--half0",
        str(half0 or ws.pred(0)),
        "--half1",
        str(half1 or ws.pred(1)),
        "--out",
        str(out or ws.out / "eval"),
        "--ground-truth-dir",
        str(ws.root / "gt"),
        "--quiet",
        *extra,
    ]


def _preprocess(ws: Workspace) -> list[str]:
    return ["preprocess", str(ws.entry), "--out", str(ws.out / "pre"), "--quiet"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".part")]


def _fails(ws: Workspace, argv: list[str], needles: list[str], capsys) -> str:
    """Run ``cryopose argv``; assert it fails naming every needle and damages nothing in ws.out."""
    before = _snapshot(ws.out)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, f"cryopose {' '.join(argv)} succeeded on bad input"
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"cryopose {argv[0]}: error: "), err
    for needle in needles:
        assert needle in message, f"{needle!r} not in the error: {message}"
    assert _snapshot(ws.out) == before, "an earlier output changed"
    assert not _temporaries(ws.root), _temporaries(ws.root)
    return message


# --------------------------------------------------------------------------------------------
# Editing helpers: each rewrites one file of the workspace's entry or outputs.


def _edit_particles(path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    blocks = starfile.read(path, always_dict=True)
    blocks["particles"] = edit(blocks["particles"].copy())
    starfile.write(blocks, path, overwrite=True)


def _edit_star_text(path: Path, edit: Callable[[str], str]) -> None:
    path.write_text(edit(path.read_text()))


def _set_image(path: Path, index: int, value: float) -> None:
    with mrcfile.mmap(path, "r+") as mrc:
        mrc.data[index, 3, 4] = value


# --------------------------------------------------------------------------------------------
# The cases. Each: (id, how to damage the workspace, the command, what the error must name).


@dataclass(frozen=True)
class Case:
    id: str
    damage: Callable[[Workspace], None]
    command: Callable[[Workspace], list[str]]
    needles: Callable[[Workspace], list[str]]


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


CASES = [
    # Stacks
    Case(
        "stack-short-data",
        lambda ws: _truncate(ws.stack(0), 1024 + 32 * 32 * 4 * 10),
        _preprocess,
        lambda ws: ["particles_0.mrcs", "40"],
    ),
    Case(
        "stack-bad-header",
        lambda ws: ws.stack(1).write_bytes(b"\x00" * 1024 + ws.stack(1).read_bytes()[1024:]),
        _preprocess,
        lambda ws: ["particles_1.mrcs", "MRC"],
    ),
    Case("stack-missing", lambda ws: ws.stack(0).unlink(), _preprocess, lambda ws: ["particles_0.mrcs"]),
    Case(
        "stack-nan-image",
        lambda ws: _set_image(ws.stack(0), 6, np.nan),
        _preprocess,
        lambda ws: ["particles_0.mrcs", "image 7", "row 7", "NaN", "finite values expected"],
    ),
    Case(
        "stack-inf-image-in-evaluation",
        lambda ws: _set_image(ws.stack(1), 2, np.inf),
        _evaluate,
        lambda ws: ["particles_1.star", "image 3 of particles_1.mrcs", "finite values expected"],
    ),
    Case(
        "stack-index-beyond-stack",
        lambda ws: _edit_particles(
            ws.star(0),
            lambda p: p.assign(rlnImageName=p["rlnImageName"].where(p.index != 4, f"{N + 9:06d}@particles_0.mrcs")),
        ),
        _preprocess,
        lambda ws: ["particles_0.star", f"image {N + 9}", f"the stack holds {N}"],
    ),
    # STAR files
    Case(
        "star-missing-column",
        lambda ws: _edit_particles(ws.star(0), lambda p: p.drop(columns="rlnAngleTilt")),
        _evaluate,
        lambda ws: ["particles_0.star", "rlnAngleTilt"],
    ),
    Case(
        "star-renamed-column",
        lambda ws: _edit_particles(ws.star(1), lambda p: p.rename(columns={"rlnDefocusU": "rlnDefocusUU"})),
        _preprocess,
        lambda ws: ["particles_1.star", "rlnDefocusU"],
    ),
    Case(
        "star-duplicated-column",
        lambda ws: _edit_star_text(ws.star(0), lambda t: t.replace("_rlnAnglePsi #5", "_rlnAngleRot #5")),
        _preprocess,
        lambda ws: ["particles_0.star", "data_particles", "rlnAngleRot", "more than once"],
    ),
    Case(
        "star-non-numeric-value",
        lambda ws: _edit_particles(
            ws.star(0), lambda p: p.assign(rlnDefocusV=p["rlnDefocusV"].astype(object).where(p.index != 9, "abc"))
        ),
        _preprocess,
        lambda ws: ["particles_0.star", "rlnDefocusV", "row 9 (0-based)", "'abc'", "a finite number"],
    ),
    Case(
        "star-empty-particle-table",
        lambda ws: _edit_particles(ws.star(1), lambda p: p.iloc[:0]),
        _preprocess,
        lambda ws: ["particles_1.star", "no particles"],
    ),
    Case(
        "star-mixed-3.0-and-3.1",  # an optics table, but particles without rlnOpticsGroup (3.0 style)
        lambda ws: _edit_particles(
            ws.star(0),
            lambda p: p.drop(columns="rlnOpticsGroup").assign(rlnDetectorPixelSize=5.0, rlnMagnification=10000.0),
        ),
        _preprocess,
        lambda ws: ["particles_0.star", "rlnOpticsGroup"],
    ),
    Case(
        "star-two-pixel-sizes",
        lambda ws: _two_optics_groups(ws.star(0)),
        _preprocess,
        lambda ws: ["particles_0.star", "pixel size", "4.1", "4.5"],
    ),
    Case(
        "star-unknown-optics-group",
        lambda ws: _edit_particles(
            ws.star(1), lambda p: p.assign(rlnOpticsGroup=np.where(p.index == 2, 7, p["rlnOpticsGroup"]))
        ),
        _preprocess,
        lambda ws: ["particles_1.star", "7"],
    ),
    Case(
        "star-nan-defocus",
        lambda ws: _edit_particles(
            ws.star(1), lambda p: p.assign(rlnDefocusU=np.where(p.index == 11, np.nan, p["rlnDefocusU"]))
        ),
        _evaluate,
        lambda ws: ["particles_1.star", "rlnDefocusU", "row 11 (0-based)", "value nan", "a finite number"],
    ),
    Case(
        "star-duplicate-particle",
        lambda ws: _edit_particles(
            ws.star(0),
            lambda p: p.assign(rlnImageName=p["rlnImageName"].where(p.index != 1, p["rlnImageName"].iloc[0])),
        ),
        _preprocess,
        lambda ws: ["particles_0.star", "duplicate rlnImageName"],
    ),
    # Entries
    Case(
        "entry-empty-folder",
        lambda ws: [p.unlink() for p in ws.entry.iterdir()],
        _preprocess,
        lambda ws: [NAME, "particles_0.star"],
    ),
    Case(
        "entry-wrong-symmetry",
        lambda ws: (ws.entry / "info_0.json").write_text('{"symmetry": "C0"}'),
        _evaluate,
        lambda ws: ["info_0.json", "C0"],
    ),
    Case(
        "entry-unknown-symmetry",
        lambda ws: [(ws.entry / f"info_{h}.json").write_text('{"symmetry": "Q3"}') for h in (0, 1)],
        _evaluate,
        lambda ws: ["info_0.json", "Q3"],
    ),
    Case(
        "entry-mask-of-another-box",
        lambda ws: io.write_map(ws.entry / f"{NAME}_mask.mrc", np.ones((24,) * 3, np.float32), 4.1),
        _evaluate,
        lambda ws: [f"{NAME}_mask.mrc", "24", "32"],
    ),
    # Predictions
    Case(
        "pred-missing-particle",
        lambda ws: _edit_particles(ws.pred(0), lambda p: p.iloc[1:]),
        _evaluate,
        lambda ws: ["pred_0.star", "1 of the 40 particles of half 0 have no prediction"],
    ),
    Case(
        "pred-duplicate-id",
        lambda ws: _edit_particles(
            ws.pred(1),
            lambda p: p.assign(rlnImageName=p["rlnImageName"].where(p.index != 3, p["rlnImageName"].iloc[4])),
        ),
        _evaluate,
        lambda ws: ["pred_1.star", "more than once"],
    ),
    Case(
        "pred-foreign-id",
        lambda ws: _edit_particles(
            ws.pred(0), lambda p: p.assign(rlnImageName=p["rlnImageName"].str.replace("particles_0", "elsewhere"))
        ),
        _evaluate,
        lambda ws: ["pred_0.star", "not in half 0"],
    ),
    Case(
        "pred-wrong-half",
        lambda ws: None,
        lambda ws: _evaluate(ws, half0=ws.pred(1), half1=ws.pred(0)),
        lambda ws: ["pred_1.star", "half 1"],
    ),
    Case(
        "pred-nan-angle",
        lambda ws: _edit_particles(
            ws.pred(1), lambda p: p.assign(rlnAnglePsi=np.where(p.index == 5, np.inf, p["rlnAnglePsi"]))
        ),
        _evaluate,
        lambda ws: ["pred_1.star", "rlnAnglePsi"],
    ),
    Case("pred-missing-file", lambda ws: ws.pred(0).unlink(), _evaluate, lambda ws: ["pred_0.star"]),
    # Methods and programs
    Case(
        "method-unknown",
        lambda ws: None,
        lambda ws: [
            "train",
            "--method",
            "image2spheer",
            "--entry",
            str(ws.entry),
            "--half",
            "0",
            "--out",
            str(ws.out / "model_x"),
        ],
        lambda ws: ["image2spheer", "image2sphere"],
    ),
    Case(
        "method-parameter-typo",
        lambda ws: None,
        lambda ws: [
            "train",
            "--method",
            "image2sphere",
            "--entry",
            str(ws.entry),
            "--half",
            "0",
            "--param",
            "max_epoch=3",
            "--out",
            str(ws.out / "model_x"),
        ],
        lambda ws: ["max_epoch", "max_epochs"],
    ),
    Case(
        "method-impossible-value",
        lambda ws: None,
        lambda ws: [
            "train",
            "--method",
            "image2sphere",
            "--entry",
            str(ws.entry),
            "--half",
            "0",
            "--param",
            "max_epochs=0",
            "--out",
            str(ws.out / "model_x"),
        ],
        lambda ws: ["max_epochs", ">= 1"],
    ),
    Case(
        "refine-reference-of-another-box",
        lambda ws: io.write_map(ws.out / "ref.mrc", np.zeros((16,) * 3, np.float32), 4.1),
        lambda ws: [
            "refine",
            "--entry",
            str(ws.entry),
            "--half",
            "0",
            "--predictions",
            str(ws.pred(0)),
            "--reference",
            str(ws.out / "ref.mrc"),
            "--out",
            str(ws.out / "refined.star"),
            "--quiet",
        ],
        lambda ws: ["ref.mrc", "16", "32"],
    ),
    Case(
        "leaderboard-corrupt-metrics",
        lambda ws: (ws.out / "eval" / "metrics.json").write_text('{"entry": '),
        lambda ws: ["leaderboard", str(ws.out / "eval" / "metrics.json"), "--out", str(ws.out / "lb.csv")],
        lambda ws: ["metrics.json"],
    ),
    Case(
        "download-unknown-entry",
        lambda ws: None,
        lambda ws: ["download", "10999", "--out", str(ws.out / "downloads")],
        lambda ws: ["10999", "10166"],
    ),
]


def _two_optics_groups(path: Path) -> None:
    blocks = starfile.read(path, always_dict=True)
    optics = blocks["optics"]
    second = optics.iloc[[0]].assign(rlnOpticsGroup=2, rlnOpticsGroupName="opticsGroup2", rlnImagePixelSize=4.5)
    blocks["optics"] = pd.concat([optics, second], ignore_index=True)
    parts = blocks["particles"]
    blocks["particles"] = parts.assign(rlnOpticsGroup=np.where(parts.index % 2 == 0, 1, 2))
    starfile.write(blocks, path, overwrite=True)


def test_the_sweep_has_at_least_25_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids) >= 25


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_named_and_damages_nothing(case, ws, capsys):
    case.damage(ws)
    _fails(ws, case.command(ws), case.needles(ws), capsys)


def test_missing_relion_reconstruct_is_named(ws, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(ws.root))  # no relion_reconstruct, whether or not RELION is installed
    message = _fails(ws, _evaluate(ws, "--backend", "relion"), ["relion_reconstruct"], capsys)
    assert "PATH" in message or "not found" in message


def test_non_rotation_matrices_are_refused(ws):
    ds = ParticlesDataset(ws.entry, 0)
    ids = ds.particle_ids[:3]
    matrices = torch.eye(3).repeat(3, 1, 1)
    matrices[1, 0, 0] = -1.0  # a reflection: determinant −1
    with pytest.raises(InputError, match=r"rotation") as err:
        ds.update_md(ids, matrices)
    assert ids[1] in str(err.value) or "1" in str(err.value)


# --------------------------------------------------------------------------------------------
# A full disk during a write: a real small tmpfs where the test may mount one (root), and a
# file-size limit (the same EFBIG/ENOSPC path through every writer) everywhere.


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True).returncode
        == 0
    )
    if ok:
        subprocess.run(["umount", str(where)], check=True)
    return ok


def _run_with_file_size_limit(argv: list[str], limit: int) -> subprocess.CompletedProcess:
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "from cryopose.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)


def _used_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["tmpfs", "file-size-limit"])
@pytest.mark.parametrize("step", ["preprocess", "evaluate"])
def test_full_disk_keeps_the_earlier_output(ws, tmp_path, how, step):
    earlier = ws.out / ("pre" if step == "preprocess" else "eval")
    if how == "tmpfs":
        disk = tmp_path / "disk"
        if not _can_mount_tmpfs(disk):
            pytest.skip("mounting a tmpfs needs root")
        # Room for the earlier output and a part of the new one, not for both whole.
        size = _used_bytes(earlier) + _used_bytes(earlier) // 2
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        if how == "tmpfs":
            shutil.copytree(earlier, disk / earlier.name)
            earlier = disk / earlier.name
        before = _snapshot(earlier)
        if step == "preprocess":
            argv = ["preprocess", str(ws.entry), "--out", str(earlier), "--quiet"]
            target = earlier / NAME / "particles_0.mrcs"
        else:
            argv = _evaluate(ws, out=earlier)
            target = earlier / "V_half0.mrc"
        if how == "tmpfs":
            proc = subprocess.run([sys.executable, "-m", "cryopose", *argv], capture_output=True, text=True)
        else:
            # Each file may be written up to half its earlier size: every new output is cut short.
            proc = _run_with_file_size_limit(argv, target.stat().st_size // 2)
        assert proc.returncode > 0, f"exit {proc.returncode} (a negative one is a signal: SIGBUS on a full tmpfs)"
        message = proc.stderr.strip().splitlines()[-1]
        assert message.startswith(f"cryopose {step}: error: could not write"), proc.stderr
        assert str(earlier) in message
        assert "unchanged" in message or "no file there was changed" in message
        assert _snapshot(earlier) == before
        assert not _temporaries(earlier.parent), _temporaries(earlier.parent)
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(disk)], check=True)


def test_a_failed_preprocess_keeps_the_earlier_copy_usable(ws, capsys):
    """The staged folder: a NaN image in half 1 is found after half 0 was written, yet the earlier
    copy is left whole (not a new half 0 beside an old half 1)."""
    _set_image(ws.stack(1), N - 1, np.nan)
    _fails(ws, _preprocess(ws), ["particles_1.mrcs", f"image {N}"], capsys)
    copy = ParticlesDataset(ws.out / "pre" / NAME, 1)
    assert torch.isfinite(copy.get_batch([N - 1])[1]).all()


def test_a_model_of_another_method_is_refused(ws, capsys):
    """A model record of another method is refused by predict, and the predictions stay."""
    record = ws.out / "model_1" / "model.json"
    data = json.loads(record.read_text())
    data["method"] = "random"
    record.write_text(json.dumps(data))
    _fails(
        ws,
        [
            "predict",
            "--method",
            "ground_truth",
            "--entry",
            str(ws.entry),
            "--half",
            "0",
            "--model",
            str(ws.out / "model_1"),
            "--out",
            str(ws.pred(0)),
        ],
        ["model.json", "random"],
        capsys,
    )
