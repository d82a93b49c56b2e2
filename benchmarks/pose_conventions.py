#!/usr/bin/env python
"""The pose conventions of `cryopose import-poses` for cryoSPARC and cryoDRGN, proven against cryoDRGN.

    .venv/bin/python benchmarks/pose_conventions.py [--cryodrgn-python /tmp/cryodrgn-venv/bin/python] \
        [--n-particles 200] [--box-size 32] [--check] [--json rows.json] [--quick]

Simulates a C1 entry (cryopose.simulate) and takes half 0's ground truth (R = the scipy-ZYZ matrix
of its RELION angles, origins in Å). cryoDRGN (in its own virtual environment) then makes the
files cryopose reads, from the truth:

* ``cryodrgn parse_pose_star`` converts the half's RELION STAR into a pose pickle;
* a cryoSPARC ``.cs`` file is written from the truth with cryosparc-tools in the convention under
  test (``alignments3D/pose`` = rotation vector of R, ``alignments3D/shift`` = origin / psize, in
  px) and ``cryodrgn parse_pose_csparc`` reads it into a second pickle, which must equal the
  first (cryoDRGN says both files hold the same poses) and cryopose's own reading of the ``.cs``
  (matrices and shifts in Å to 1e-5);
* the ``.cs`` and both pickles are imported by ``cryopose import-poses`` and scored with the
  judge's functions (``cryopose.metrics.angular_errors``, ``shift_errors``): MAnE ≤ 1e-3° and
  shift error ≤ 1e-3 Å. The wrong conventions (the transposed matrix, the opposite shift sign)
  are scored too and must be off by more than 30° and 1 Å.

Also probes a zero rotation vector (the identity), which cryopose reads as the identity and
cryoDRGN's parse_pose_csparc as NaN (so cryopose refuses such a cryoDRGN pickle by name).
``--check`` exits 1 unless every figure is within its bound. ``--json`` writes one row per figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from cryopose import cli
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.geometry import euler_to_matrix
from cryopose.metrics import angular_errors, shift_errors
from cryopose.pose_import import read_cryodrgn_poses, read_cryosparc_poses
from cryopose.predictions import EULER, ORIGIN, load_predictions
from cryopose.simulate import SimulationSpec, simulate_entry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, write_rows  # noqa: E402

AGREE_TOL = 1e-5  # cryoDRGN's and cryopose's reading of one .cs: matrix entries, Å
MANE_TOL, SHIFT_TOL = 1e-3, 1e-3  # the truth imported: degrees, Å
WRONG_MANE, WRONG_SHIFT = 30.0, 1.0  # a wrong convention must be at least this far off

CS_STACK = ">J12/imported/012345678901234567890_particles_0.mrcs"  # cryoSPARC's name of the entry's stack


def cryodrgn(python: str, *args: str, cwd: Path) -> None:
    exe = Path(python).parent / "cryodrgn"
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"cryodrgn {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")


def cryodrgn_version(python: str) -> str:
    proc = subprocess.run(
        [python, "-c", "import cryodrgn; print(cryodrgn.__version__)"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{python} cannot import cryodrgn:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def write_cs(path: Path, rot: np.ndarray, origins: np.ndarray, psize: float, box: int, stack: str = CS_STACK):
    """A cryoSPARC refinement's particle file holding ``rot``/``origins`` in the convention under test."""
    from cryosparc.dataset import Dataset

    n = len(rot)
    ds = Dataset.allocate(
        n,
        [
            ("blob/path", "O"),
            ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)),
            ("blob/psize_A", "<f4"),
            ("alignments3D/split", "<u4"),
            ("alignments3D/shift", "<f4", (2,)),
            ("alignments3D/pose", "<f4", (3,)),
            ("alignments3D/psize_A", "<f4"),
        ],
    )
    ds["blob/path"] = [stack] * n
    ds["blob/idx"] = np.arange(n)
    ds["blob/shape"] = np.tile([box, box], (n, 1))
    ds["blob/psize_A"] = psize
    ds["alignments3D/pose"] = Rotation.from_matrix(rot).as_rotvec()
    ds["alignments3D/shift"] = origins / psize
    ds["alignments3D/psize_A"] = psize
    ds.save(str(path))  # numpy format: cryoDRGN reads it with np.load
    return path


def load_pkl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        rot, trans = pickle.load(f)
    return np.asarray(rot, dtype=np.float64), np.asarray(trans, dtype=np.float64)


def score(rot_true, org_true, rot, org) -> tuple[float, float]:
    """MAnE (°) and mean shift error (Å), the judge's definitions."""
    mane = float(angular_errors(torch.as_tensor(rot_true), torch.as_tensor(rot)).mean())
    return mane, float(shift_errors(org_true, org).mean())


def run(args, work: Path) -> tuple[list[dict], list[str]]:
    rows, failures = [], []

    def figure(name: str, value: float, bound: float, below: bool = True, unit: str = "") -> None:
        ok = value <= bound if below else value > bound
        rows.append({"figure": name, "value": value, "bound": bound, "below": below, "unit": unit, "ok": ok})
        print(f"{name:<86} {value:>12.3g} {unit:<3} ({'≤' if below else '>'} {bound:g}: {'ok' if ok else 'FAIL'})")
        if not ok:
            failures.append(f"{name}: {value:.3g} {unit}")

    spec = SimulationSpec(
        name="pose_conventions", symmetry="C1", box_size=args.box_size, pixel_size=args.pixel_size,
        n_particles=args.n_particles, seed=20, snr=1.0,
    )  # fmt: skip
    entry = Entry(simulate_entry(spec, work / "bench", progress=False))
    D, apix = entry.box_size, entry.pixel_size
    parts = entry.read_star(0).particles
    rot_true = euler_to_matrix(torch.tensor(parts[EULER].to_numpy(np.float64))).numpy()
    org_true = parts[ORIGIN].to_numpy(np.float64)
    n = len(parts)
    print(
        f"cryoDRGN {cryodrgn_version(args.cryodrgn_python)} against cryopose, half 0 of a simulated C1 entry: "
        f"{n} particles of {D} px, {apix} Å/px, mean |origin| {np.linalg.norm(org_true, axis=1).mean():.2f} Å\n"
    )

    # cryoDRGN's own files: the STAR's poses, and the .cs written in the convention under test.
    cryodrgn(args.cryodrgn_python, "parse_pose_star", str(entry.star_path(0)), "-o", "pose_star.pkl", cwd=work)
    cs = write_cs(work / "J12_particles.cs", rot_true, org_true, apix, D)
    cryodrgn(args.cryodrgn_python, "parse_pose_csparc", cs.name, "-o", "pose_cs.pkl", cwd=work)
    rot_s, trans_s = load_pkl(work / "pose_star.pkl")
    rot_c, trans_c = load_pkl(work / "pose_cs.pkl")

    print("cryoDRGN's reading of the .cs against its reading of the RELION STAR (the same poses?):")
    figure("max |rot(parse_pose_csparc) − rot(parse_pose_star)|", np.abs(rot_c - rot_s).max(), 1e-5)
    figure(
        "max |trans(parse_pose_csparc) − trans(parse_pose_star)| · D · apix",
        np.abs(trans_c - trans_s).max() * D * apix,
        1e-4,
        unit="Å",
    )

    print("\ncryopose's reading of the .cs against cryoDRGN's reading of the same file:")
    _, _, rot_o, org_o, _ = read_cryosparc_poses(cs)
    figure("max |R(cryopose) − rot(cryoDRGN)ᵀ|", np.abs(rot_o - rot_c.transpose(0, 2, 1)).max(), AGREE_TOL)
    figure(
        "max |origin(cryopose) − trans(cryoDRGN) · D · apix|",
        np.abs(org_o - trans_c * D * apix).max(),
        AGREE_TOL,
        unit="Å",
    )

    print("\nimported by `cryopose import-poses` and scored against the truth (judge's MAnE, mean shift error):")
    sources = {"cryoSPARC .cs": cs, "cryoDRGN parse_pose_star pickle": work / "pose_star.pkl"}
    sources["cryoDRGN parse_pose_csparc pickle"] = work / "pose_cs.pkl"
    for label, path in sources.items():
        out = work / f"pred_{path.stem}.star"
        argv = ["import-poses", "--entry", str(entry.root), "--half", "0", "--from", str(path), "--out", str(out)]
        with contextlib.redirect_stdout(io.StringIO()):  # the command prints the file it wrote
            code = cli.main(argv)
        if code != 0:
            failures.append(f"import-poses refused {path.name}")
            continue
        pred = load_predictions(entry, 0, out, "SO3xR2")
        mane, shift = score(rot_true, org_true, pred.rotmats, pred.shifts)
        figure(f"{label}: MAnE", mane, MANE_TOL, unit="°")
        figure(f"{label}: shift error", shift, SHIFT_TOL, unit="Å")

    print("\nthe wrong conventions, on the same files:")
    rot_o_t = rot_o.transpose(0, 2, 1)
    figure(".cs, R = from_rotvec(pose)ᵀ: MAnE", score(rot_true, org_true, rot_o_t, org_o)[0], WRONG_MANE, False, "°")
    figure(
        ".cs, origin = −shift · psize: shift error",
        score(rot_true, org_true, rot_o, -org_o)[1],
        WRONG_SHIFT,
        False,
        "Å",
    )
    figure("pickle, R = rot (no transpose): MAnE", score(rot_true, org_true, rot_s, org_o)[0], WRONG_MANE, False, "°")
    figure(
        "pickle, origin = −trans · D · apix: shift error",
        score(rot_true, org_true, rot_o, -trans_s * D * apix)[1],
        WRONG_SHIFT,
        False,
        "Å",
    )

    print("\na zero rotation vector (the identity) in a .cs:")
    probe_rot = np.stack([np.eye(3), Rotation.from_rotvec([0, 0, np.deg2rad(10)]).as_matrix()])
    probe = write_cs(work / "zero.cs", probe_rot, np.zeros((2, 2)), apix, D)
    cryodrgn(args.cryodrgn_python, "parse_pose_csparc", probe.name, "-o", "zero.pkl", cwd=work)
    rot_z = load_pkl(work / "zero.pkl")[0]
    figure(
        "cryopose: max |R − true R| (identity, 10° about z)",
        np.abs(read_cryosparc_poses(probe)[2] - probe_rot).max(),
        1e-7,
    )
    nan = np.isnan(rot_z).any(axis=(1, 2))
    try:
        read_cryodrgn_poses(work / "zero.pkl", box_size=D, pixel_size=apix)
        refusal = "read"
    except InputError as err:
        refusal = f"refused: {err.problem}"
    print(f"  cryoDRGN parse_pose_csparc: NaN matrices at rows {np.flatnonzero(nan).tolist()} of 2; cryopose {refusal}")
    return rows, failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-particles", type=int, default=None, help="per half (default 200; --quick: 60)")
    p.add_argument("--box-size", type=int, default=None, help="default 32 (--quick: 16)")
    p.add_argument("--pixel-size", type=float, default=3.0)
    p.add_argument("--cryodrgn-python", default="/tmp/cryodrgn-venv/bin/python")
    p.add_argument("--check", action="store_true", help="exit 1 unless every figure is within its bound")
    add_output_args(p, "60 particles per half of 16 px")
    args = p.parse_args()
    args.n_particles = args.n_particles or (60 if args.quick else 200)
    args.box_size = args.box_size or (16 if args.quick else 32)
    if not Path(args.cryodrgn_python).is_file():
        raise SystemExit(f"{args.cryodrgn_python} not found; see benchmarks/README.md to install cryodrgn")
    with tempfile.TemporaryDirectory() as tmp:
        rows, failures = run(args, Path(tmp))
    write_rows(args.json, rows)
    if failures:
        print("\nFAIL:\n  " + "\n  ".join(failures))
        if args.check:
            raise SystemExit(1)
    else:
        print("\nevery convention holds")


if __name__ == "__main__":
    main()
