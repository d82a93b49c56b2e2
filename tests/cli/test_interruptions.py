"""Interrupted work leaves nothing behind.

Each case starts ``cryopose <step>`` as a separate process and stops it at a known point while its
temporaries exist: the child wraps ``os.replace`` (the call every writer publishes with) so that
the n-th publication of a file whose name matches a pattern first writes a marker file and then
waits. The wait makes the interruption land in the same place on every run instead of depending
on how fast the machine is. Then it sends SIGTERM (what Slurm and Snakemake send on cancel) or
SIGKILL and checks:

* SIGTERM: a non-zero exit, no temporary anywhere (the destination folders, and the system temp
  folder, pointed at a private ``TMPDIR``), earlier outputs byte for byte unchanged;
* SIGKILL: the temporaries stay, and the next run removes them;
* the ground-truth cache is published as one unit: a pair of maps that do not belong together is
  never accepted; output folders get the umask's permissions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_bad_input import NAME, N, _edit_particles, _evaluate, golden, ws  # noqa: F401 (fixtures)

from cryopose import io
from cryopose.cli import main
from cryopose.entry import Entry

# The child: cryopose's own main() with os.replace wrapped to pause at one publication.
CHILD = r"""
import os, re, sys, time
from pathlib import Path
pattern, nth, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if re.search(pattern, Path(dst).name):
        seen[0] += 1
        if seen[0] == nth:
            marker.write_text(str(os.getpid()))
            time.sleep(120)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from cryopose.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _tmpdir(root: Path) -> Path:
    folder = root / "systmp"
    folder.mkdir(exist_ok=True)
    return folder


def _env(root: Path) -> dict:
    return {**os.environ, "TMPDIR": str(_tmpdir(root)), "OMP_NUM_THREADS": "1"}


def _temporaries(*folders: Path) -> list[Path]:
    """Temporaries of cryopose's writers (and of the tempfile module) under ``folders``."""
    found = []
    for folder in folders:
        for p in folder.rglob("*"):
            if (
                ".tmp-" in p.name
                or ".old-" in p.name
                or p.name.startswith(("cryopose-", "tmp"))
                or p.name.startswith(".reconstruct-")
            ):
                found.append(p)
    return found


def _snapshot(folder: Path, temporaries: bool = True) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (temporaries or ".tmp-" not in p.name)
    }


def _start_paused(root: Path, argv: list[str], pattern: str, nth: int = 1) -> tuple[subprocess.Popen, Path]:
    """Start ``cryopose argv`` and wait until it pauses before the ``nth`` publication of a file
    whose name matches ``pattern``."""
    marker = root / f"paused-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, pattern, str(nth), str(marker), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(root),
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(
                f"cryopose {argv[0]} ended (exit {proc.returncode}) before the pause at {pattern!r}:\n{out}\n{err}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"cryopose {argv[0]} never reached the pause at {pattern!r}")
        time.sleep(0.02)
    return proc, marker


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the process did not end within 60 s of signal {sig}")
    return proc.returncode, err


def _terminate_and_check(
    ws, argv: list[str], pattern: str, watched: list[Path], expect_temporary: list[Path], nth: int = 1
) -> None:
    """Pause ``cryopose argv`` at ``pattern``, check that a temporary exists in one of
    ``expect_temporary`` (and none in the system temp folder), SIGTERM it, and check that it failed
    and left ``watched`` as they were with no temporary anywhere."""
    before = {str(w): _snapshot(w) if w.is_dir() else None for w in watched}
    proc, _ = _start_paused(ws.root, argv, pattern, nth)
    present = _temporaries(*[f for f in expect_temporary if f.exists()])
    in_system_temp = _temporaries(_tmpdir(ws.root))
    code, err = _stop(proc, signal.SIGTERM)
    assert present, f"no temporary in {expect_temporary} while cryopose {argv[0]} was writing"
    assert not in_system_temp, f"temporaries in the system temp folder: {in_system_temp}"
    assert code != 0, f"cryopose {argv[0]} exited 0 after SIGTERM"
    left = _temporaries(ws.root)
    assert not left, f"SIGTERM left temporaries behind: {left}"
    for w in watched:
        assert (_snapshot(w) if w.is_dir() else None) == before[str(w)], f"{w} changed"


# --------------------------------------------------------------------------------------------
# SIGTERM in each step


def _simulate(ws, name: str = NAME, seed: int = 6, *extra: str) -> list[str]:
    return [
        "simulate",
        "--out",
        str(ws.bench),
        "--name",
        name,
        "--symmetry",
        "C2",
        "--box-size",
        "32",
        "--pixel-size",
        "4.1",
        "--n-particles",
        str(N),
        "--snr",
        "1",
        "--seed",
        str(seed),
        "--quiet",
        *extra,
    ]


def test_sigterm_during_simulate(ws):
    """Re-simulating the entry with other parameters is stopped while half 1's stack is written:
    the entry keeps its old bytes and the staging folder is gone."""
    _terminate_and_check(
        ws,
        _simulate(ws, NAME, 6, "--overwrite"),
        r"^particles_1\.mrcs$",
        watched=[ws.entry],
        expect_temporary=[ws.bench],
    )


def test_sigterm_during_preprocess(ws):
    _terminate_and_check(
        ws,
        ["preprocess", str(ws.entry), "--out", str(ws.out / "pre"), "--quiet"],
        r"^particles_1\.mrcs$",
        watched=[ws.out / "pre"],
        expect_temporary=[ws.out],
    )


def test_sigterm_during_evaluate_writing_its_outputs(ws):
    """Stopped while the new evaluation's maps are written: the earlier evaluation keeps its bytes,
    and the temporaries (which live next to the output, not in the system temp folder) are gone."""
    _terminate_and_check(
        ws, _evaluate(ws), "V_half0", watched=[ws.out / "eval", ws.root / "gt"], expect_temporary=[ws.out]
    )


def test_sigterm_during_evaluate_building_the_ground_truth(ws):
    """Stopped between the two ground-truth maps: neither the cache nor the evaluation changes."""
    _edit_particles(ws.star(1), lambda p: p.assign(rlnDefocusU=p["rlnDefocusU"] + 1.0))  # the cache is stale
    _terminate_and_check(
        ws, _evaluate(ws), "GT_half1", watched=[ws.out / "eval", ws.root / "gt"], expect_temporary=[ws.root, ws.out]
    )


def test_sigterm_during_ground_truth_keeps_the_earlier_pair(ws):
    """`cryopose ground-truth` stopped after GT_half0 was made and before GT_half1: the earlier
    cache is still the earlier pair, not a new half 0 beside an old half 1."""
    _edit_particles(ws.star(0), lambda p: p.assign(rlnDefocusU=p["rlnDefocusU"] + 1.0))
    _terminate_and_check(
        ws,
        ["ground-truth", str(ws.entry), "--out", str(ws.root / "gt"), "--quiet"],
        "GT_half1",
        watched=[ws.root / "gt"],
        expect_temporary=[ws.root],
    )


def test_sigterm_during_train(ws):
    """projection_matching's training writes its reference map; stopped there, the earlier model
    is unchanged and no temporary stays."""
    model = ws.out / "model_pm"
    argv = ["train", "--method", "projection_matching", "--entry", str(ws.entry), "--half", "0", "--out", str(model)]
    assert main(argv) == 0
    _terminate_and_check(ws, argv, "reference", watched=[model], expect_temporary=[model])


# --------------------------------------------------------------------------------------------
# SIGKILL: the temporaries stay, and the next run removes them


def test_sigkill_during_simulate_then_a_rerun_cleans_up(ws):
    argv = _simulate(ws, "second", 7)
    proc, _ = _start_paused(ws.root, argv, r"^particles_1\.mrcs$")
    code, _ = _stop(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert _temporaries(ws.bench), "SIGKILL should have left the staging folder (nothing runs on SIGKILL)"
    assert not (ws.bench / "second").exists()
    done = subprocess.run([sys.executable, "-m", "cryopose", *argv], capture_output=True, text=True, env=_env(ws.root))
    assert done.returncode == 0, done.stderr
    assert Entry(ws.bench / "second").validate() is None
    assert not _temporaries(ws.root), _temporaries(ws.root)


def test_sigkill_during_evaluate_then_a_rerun_cleans_up(ws):
    argv = _evaluate(ws)
    before = _snapshot(ws.out / "eval")
    proc, _ = _start_paused(ws.root, argv, "V_half0")
    code, _ = _stop(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert _temporaries(ws.out), "SIGKILL should have left the evaluation's temporaries"
    assert _snapshot(ws.out / "eval", temporaries=False) == before
    done = subprocess.run([sys.executable, "-m", "cryopose", *argv], capture_output=True, text=True, env=_env(ws.root))
    assert done.returncode == 0, done.stderr
    assert not _temporaries(ws.root), _temporaries(ws.root)


def test_sigkill_in_the_middle_of_a_folder_swap_loses_nothing(ws):
    """Killed after the old entry was moved aside and before the new one took its place: the next
    writer of that folder puts the old one back before it starts (here it then fails, so what
    remains is the old entry, whole)."""
    before = _snapshot(ws.entry)
    proc, _ = _start_paused(ws.root, _simulate(ws, NAME, 6, "--overwrite"), rf"^{NAME}$", nth=2)
    code, _ = _stop(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL and not ws.entry.exists()
    with pytest.raises(RuntimeError, match="stop"):
        with io.staged_folder(ws.entry):
            raise RuntimeError("stop")
    assert _snapshot(ws.entry) == before
    assert not _temporaries(ws.bench), _temporaries(ws.bench)


def test_a_running_writers_temporary_is_not_taken_for_a_stale_one(tmp_path):
    """Stale temporaries are those of dead processes: a writer that is still running (this test
    process) keeps its temporary while another process writes the same destination."""
    dest = tmp_path / "out" / "table.csv"
    with io.atomic_write(dest) as mine:
        mine.write_text("mine\n")
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from cryopose import io\n"
                "with io.atomic_write(sys.argv[1]) as t: t.write_text('theirs\\n')",
                str(dest),
            ],
            capture_output=True,
            text=True,
        )
        assert other.returncode == 0, other.stderr
        assert mine.is_file(), "a live writer's temporary was removed"
        assert dest.read_text() == "theirs\n"
    assert dest.read_text() == "mine\n"
    assert [p.name for p in dest.parent.iterdir()] == ["table.csv"]


# --------------------------------------------------------------------------------------------
# The ground-truth cache is one unit


def _gt_command(ws) -> list[str]:
    return ["ground-truth", str(ws.entry), "--out", str(ws.root / "gt"), "--quiet"]


def test_a_mixed_ground_truth_pair_is_not_accepted(ws):
    """GT_half1 replaced by a map of the same box that is not its pair (what a kill between the two
    maps of an older writer left): the cache is rebuilt, not used."""
    gt = ws.root / "gt"
    original = [io.read_map(gt / f"GT_half{h}.mrc")[0] for h in (0, 1)]
    shutil.copyfile(gt / "GT_half0.mrc", gt / "GT_half1.mrc")
    assert main(_gt_command(ws)) == 0
    rebuilt = [io.read_map(gt / f"GT_half{h}.mrc")[0] for h in (0, 1)]
    assert not np.array_equal(rebuilt[0], rebuilt[1]), "the mixed pair was accepted"
    np.testing.assert_allclose(rebuilt[1], original[1], rtol=1e-5, atol=1e-6 * float(np.abs(original[1]).max()))


def test_a_ground_truth_cache_with_one_map_missing_is_rebuilt(ws):
    gt = ws.root / "gt"
    (gt / "GT_half1.mrc").unlink()
    assert main(_gt_command(ws)) == 0
    assert sorted(p.name for p in gt.iterdir()) == ["GT_half0.mrc", "GT_half1.mrc", "ground_truth.json"]
    record = json.loads((gt / "ground_truth.json").read_text())
    assert record["box_size"] == 32 and record["pixel_size"] == pytest.approx(4.1)


def test_a_folder_with_other_files_is_not_replaced_by_the_cache(ws, capsys):
    """The cache is published by replacing its folder: a folder that holds anything else is refused
    rather than swept away."""
    folder = ws.root / "shared"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me\n")
    capsys.readouterr()
    assert main(["ground-truth", str(ws.entry), "--out", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "notes.txt" in err
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------------------------
# Permissions


def test_output_folders_follow_the_umask(ws):
    """Staged folders are created like any folder (0777 less the umask), not with mkdtemp's 0700."""

    def run(argv):
        done = subprocess.run(
            [sys.executable, "-m", "cryopose", *argv],
            capture_output=True,
            text=True,
            env=_env(ws.root),
            preexec_fn=lambda: os.umask(0o022),
        )
        assert done.returncode == 0, done.stderr

    run(_simulate(ws, "perm", 3))
    run(["preprocess", str(ws.bench / "perm"), "--out", str(ws.root / "perm_pre"), "--quiet"])
    run(["ground-truth", str(ws.bench / "perm"), "--out", str(ws.root / "perm_gt"), "--quiet"])
    for folder in (ws.bench / "perm", ws.root / "perm_pre" / "perm", ws.root / "perm_gt"):
        assert oct(folder.stat().st_mode & 0o777) == oct(0o755), folder
    assert oct((ws.bench / "perm" / "particles_0.mrcs").stat().st_mode & 0o777) == oct(0o644)
