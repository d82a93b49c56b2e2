"""Poses people already have, scored (issue 20, item 4): `cryopose import-poses` takes each particle
of a half from a RELION particle STAR file, a cryoSPARC .cs file or a cryoDRGN pose pickle, however
its images are named and whatever its row order, and the ground truth imported this way scores MAnE 0
and shift error 0; sources that lack particles, fields or rotations are refused, naming what."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from cryosparc.dataset import Dataset
from scipy.spatial.transform import Rotation

from cryopose import cli, io
from cryopose.entry import Entry
from cryopose.evaluate import evaluate
from cryopose.geometry import euler_to_matrix, geodesic_angle
from cryopose.pose_import import read_cryosparc_poses
from cryopose.predictions import EULER, ORIGIN, load_predictions
from cryopose.simulate import SimulationSpec, simulate_entry
from relion_project import make_relion_project

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore::cryopose.io.mrc.IrregularMRCHeader")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    spec = SimulationSpec(name="pi_c4", symmetry="C4", box_size=32, pixel_size=3.0, n_particles=80, seed=5, snr=1.0)
    source = simulate_entry(spec, tmp_path_factory.mktemp("bench"), progress=False)
    return make_relion_project(source, tmp_path_factory.mktemp("project"))


def test_a_refinements_poses_in_any_spelling_are_scored_as_the_truth(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert cli.main(["import-star", "Refine3D/job020/run_data.star", "--out", str(tmp_path / "bench")]) == 0
    entry = Entry(tmp_path / "bench" / "job020_run_data")  # absolute image names
    table = starfile.read("Refine3D/job020/run_data.star")
    parts = table["particles"].iloc[::-1].reset_index(drop=True)  # another row order
    split = parts["rlnImageName"].str.split("@", n=1, expand=True)
    parts["rlnImageName"] = split[0].astype(int).astype(str) + "@./" + split[1]  # 7@./x.mrcs, not 000007@x.mrcs
    starfile.write({"optics": table["optics"], "particles": parts}, tmp_path / "respelled.star")
    preds = []
    for h in (0, 1):
        preds.append(tmp_path / f"half{h}.star")
        argv = ["import-poses", "--entry", str(entry.root), "--half", str(h)]
        argv += ["--from", str(tmp_path / "respelled.star")]
        assert cli.main(argv + ["--out", str(preds[-1])]) == 0, capsys.readouterr().err
    m = evaluate(entry, *preds, prediction_type="SO3xR2", backend="torch", plots=False, progress=False).metrics
    assert m["MAnE"] == pytest.approx(0, abs=1e-4)  # the STAR holds 6 decimals
    assert m["shift_error_mean_A"] == pytest.approx(0, abs=1e-4)
    # The confidence is the source's rlnMaxValueProbDistribution, particle by particle.
    written = starfile.read(preds[0])["particles"].set_index("rlnImageName")["rlnParticleFigureOfMerit"]
    truth = entry.read_star(0).particles.set_index("rlnImageName")["rlnMaxValueProbDistribution"]
    assert written.to_dict() == pytest.approx(truth.to_dict())

    capsys.readouterr()
    starfile.write({"optics": table["optics"], "particles": parts.iloc[1:]}, tmp_path / "short.star")
    argv = ["import-poses", "--entry", str(entry.root), "--half", "1", "--from", str(tmp_path / "short.star")]
    assert cli.main(argv + ["--out", str(tmp_path / "x.star")]) == 2
    err = capsys.readouterr().err
    assert "short.star" in err and "1 of the 80 particles of half 1" in err and not (tmp_path / "x.star").exists()


# ---------------------------------------------------------------------------------------------
# cryoSPARC .cs files and cryoDRGN pose pickles. The conventions written here are the ones
# benchmarks/pose_conventions.py proves against cryoDRGN's own parsers (opt-in test at the end).
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Entry:
    spec = SimulationSpec(name="pi_tiny", symmetry="C1", box_size=16, pixel_size=3.0, n_particles=24, seed=7, snr=1.0)
    return Entry(simulate_entry(spec, tmp_path_factory.mktemp("tiny"), progress=False))


def _truth(entry: Entry, half: int) -> tuple[np.ndarray, np.ndarray]:
    """The half's true pose matrices R (cryopose's) and origins in Å."""
    parts = entry.read_star(half).particles
    rot = euler_to_matrix(torch.tensor(parts[EULER].to_numpy(np.float64))).numpy()
    return rot, parts[ORIGIN].to_numpy(np.float64)


def _write_cs(path: Path, blob_paths, idx, rot, origins, psize: float, drop: tuple = ()) -> Path:
    """A cryoSPARC particle file in the convention under test: pose = rotvec of R, shift = origin / psize."""
    fields = [("blob/path", "O"), ("blob/idx", "<u4"), ("alignments3D/pose", "<f4", (3,))]
    fields += [("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4")]
    ds = Dataset.allocate(len(idx), [f for f in fields if f[0] not in drop])
    ds["blob/path"] = list(blob_paths)
    ds["blob/idx"] = np.asarray(idx)
    if "alignments3D/pose" not in drop:
        ds["alignments3D/pose"] = Rotation.from_matrix(np.asarray(rot)).as_rotvec()
    ds["alignments3D/shift"] = np.asarray(origins) / psize
    ds["alignments3D/psize_A"] = psize
    ds.save(str(path))
    return path


def _import(entry: Entry, half: int, source: Path, out: Path, *extra: str) -> int:
    argv = ["import-poses", "--entry", str(entry.root), "--half", str(half), "--from", str(source)]
    return cli.main([*argv, *extra, "--out", str(out)])


def _assert_truth(entry: Entry, half: int, out: Path) -> None:
    pred = load_predictions(entry, half, out, "SO3xR2")
    rot, origins = _truth(entry, half)
    # float32 in the .cs, 6 decimals in the STAR: 1e-3° and 1e-4 Å
    assert geodesic_angle(pred.rotmats, torch.from_numpy(rot)).max() < 1e-3
    np.testing.assert_allclose(pred.shifts.numpy(), origins, atol=1e-4)


def test_cryosparc_file_of_both_halves_in_another_order_and_spelling(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the .cs paths lead nowhere from here: matched by file name
    # Half 1 first, each half's rows reversed; half 1's stack under cryoSPARC's import name
    # (<uid>_<name>, project-relative '>' mark), half 0's in another folder.
    stack = {0: "J7/imported/particles_0.mrcs", 1: ">J12/imported/012345678901234567890_particles_1.mrcs"}
    paths, idx, rots, origins = [], [], [], []
    for h in (1, 0):
        rot, org = _truth(tiny, h)
        n = len(org)
        paths += [stack[h]] * n
        idx.append(np.arange(n)[::-1])
        rots.append(rot[::-1])
        origins.append(org[::-1])
    cat = np.concatenate
    cs = _write_cs(tmp_path / "J12_particles.cs", paths, cat(idx), cat(rots), cat(origins), psize=1.5)
    for h in (0, 1):
        assert _import(tiny, h, cs, tmp_path / f"h{h}.star") == 0, capsys.readouterr().err
        _assert_truth(tiny, h, tmp_path / f"h{h}.star")
    # The convention is not a tautology: the transposed matrices are far from the truth.
    rot = torch.from_numpy(_truth(tiny, 0)[0])
    assert geodesic_angle(rot.mT, rot).mean() > 30


def test_cryosparc_paths_resolved_in_the_project_folder(tiny, tmp_path, monkeypatch, capsys):
    # The stack linked into a project folder under another name: found by the resolved path.
    (tmp_path / "J3" / "imported").mkdir(parents=True)
    (tmp_path / "J3" / "imported" / "renamed.mrcs").symlink_to(tiny.stack_path(0))
    monkeypatch.chdir(tmp_path)
    rot, origins = _truth(tiny, 0)
    n = len(origins)
    cs = _write_cs(tmp_path / "p.cs", [">J3/imported/renamed.mrcs"] * n, np.arange(n), rot, origins, 2.0)
    assert _import(tiny, 0, cs, tmp_path / "h0.star") == 0, capsys.readouterr().err
    _assert_truth(tiny, 0, tmp_path / "h0.star")


def test_cryosparc_refusals_name_the_file_and_the_field(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rot, org = _truth(tiny, 0)
    n = len(org)
    name = ["x/particles_0.mrcs"] * n

    def refused(cs: Path, *extra: str) -> str:
        assert _import(tiny, 0, cs, tmp_path / "o.star", *extra) == 2
        assert not (tmp_path / "o.star").exists()
        return capsys.readouterr().err

    err = refused(_write_cs(tmp_path / "short.cs", name[1:], np.arange(1, n), rot[1:], org[1:], 3.0))
    assert f"short.cs: blob/path, blob/idx: 1 of the {n} particles of half 0" in err
    assert "'000001@particles_0.mrcs'" in err
    err = refused(_write_cs(tmp_path / "nopose.cs", name, np.arange(n), rot, org, 3.0, drop=("alignments3D/pose",)))
    assert "nopose.cs: alignments3D/pose: missing field(s) alignments3D/pose" in err
    two = ["a/particles_0.mrcs", "b/particles_0.mrcs"]
    assert "both match" in refused(_write_cs(tmp_path / "two.cs", two, [0, 1], rot[:2], org[:2], 3.0))
    twice = _write_cs(tmp_path / "dup.cs", name + name[:1], [*range(n), 0], rot[[*range(n), 0]], org[[*range(n), 0]], 3)
    assert "each particle may appear once" in refused(twice)
    (tmp_path / "junk.cs").write_bytes(b"not a dataset")
    assert "junk.cs: not a cryoSPARC dataset" in refused(tmp_path / "junk.cs")
    assert "--box-size do(es) not apply to a cryosparc source" in refused(tmp_path / "short.cs", "--box-size", "16")
    assert "--format relion|cryosparc|cryodrgn" in refused(tmp_path / "poses.txt")


def test_a_zero_rotation_vector_is_the_identity(tmp_path):
    cs = _write_cs(tmp_path / "z.cs", ["s.mrcs"] * 2, [0, 1], np.stack([np.eye(3)] * 2), np.zeros((2, 2)), 1.0)
    _, _, rotmats, origins, _ = read_cryosparc_poses(cs)
    assert (rotmats == np.eye(3)).all() and (origins == 0).all()


def test_cryodrgn_pickles_in_the_stack_order_they_follow(tiny, tmp_path, capsys):
    rot, org = _truth(tiny, 1)
    D, apix = tiny.box_size, tiny.pixel_size
    pkl = tmp_path / "pose.pkl"
    # cryoDRGN's convention: rot = Rᵀ, trans = origin / (D · apix), in the half's row order.
    pkl.write_bytes(pickle.dumps((rot.transpose(0, 2, 1).astype(np.float32), (org / (D * apix)).astype(np.float32))))
    assert _import(tiny, 1, pkl, tmp_path / "h1.star") == 0, capsys.readouterr().err
    _assert_truth(tiny, 1, tmp_path / "h1.star")
    # Parsed from another stack (half the box, twice the pixel size): the same origins in Å, given its sizes.
    pkl.write_bytes(pickle.dumps((rot.transpose(0, 2, 1), org / (D // 2 * apix * 2))))
    assert _import(tiny, 1, pkl, tmp_path / "b.star", "--box-size", str(D // 2), "--pixel-size", str(2 * apix)) == 0
    _assert_truth(tiny, 1, tmp_path / "b.star")
    # Rows following another STAR (both halves, reversed, absolute names): matched by image.
    stars = [io.with_absolute_image_names(tiny.read_star(h), tiny.star_path(h)) for h in (0, 1)]
    both = pd.concat([s.particles for s in stars]).iloc[::-1].reset_index(drop=True)
    io.write_particles_star(tmp_path / "both.star", io.ParticleStar(stars[0].optics, both))
    rots = np.concatenate([_truth(tiny, h)[0] for h in (0, 1)])[::-1]
    pkl.write_bytes(pickle.dumps(rots.transpose(0, 2, 1)))  # rotations only: no shifts
    for h in (0, 1):
        assert _import(tiny, h, pkl, tmp_path / f"r{h}.star", "--particles", str(tmp_path / "both.star")) == 0
        pred = load_predictions(tiny, h, tmp_path / f"r{h}.star", "SO3xR2")
        assert geodesic_angle(pred.rotmats, torch.from_numpy(_truth(tiny, h)[0])).max() < 1e-3
        assert (pred.shifts == 0).all()


def test_cryodrgn_refusals(tiny, tmp_path, capsys):
    rot, org = _truth(tiny, 0)
    n = len(org)
    D, apix = tiny.box_size, tiny.pixel_size

    def refused(obj, *extra: str, raw: bytes | None = None) -> str:
        pkl = tmp_path / "p.pkl"
        pkl.write_bytes(raw if raw is not None else pickle.dumps(obj))
        assert _import(tiny, 0, pkl, tmp_path / "o.star", *extra) == 2
        assert not (tmp_path / "o.star").exists()
        return capsys.readouterr().err

    rt = rot.transpose(0, 2, 1)
    err = refused((rt[1:], org[1:] / (D * apix)))
    assert f"p.pkl: rot: holds {n - 1} poses but half 0 of entry pi_tiny has {n} particles" in err
    assert "--particles" in err
    err = refused((rt[1:],), "--particles", str(tiny.star_path(0)))
    assert f"holds {n - 1} poses but {tiny.star_path(0)} (--particles), whose rows they follow, has {n}" in err
    err = refused((rt,), "--particles", str(tiny.star_path(1)))  # the other half's STAR
    assert f"particles_1.star: rlnImageName: {n} of the {n} particles of half 0" in err
    assert "are not rotations" in refused((np.concatenate([rt[:-1], -rt[-1:]]), org / (D * apix)))
    nan = rt.copy()
    nan[3] = np.nan
    err = refused(nan)
    assert "p.pkl: rot: 1 rotation matrices are not finite" in err and "row 3" in err
    assert "p.pkl: trans: expected shifts of shape" in refused((rt, org[:, :1]))
    assert "refusing os.system" in refused(None, raw=b"cos\nsystem\n(S'true'\ntR.")


@pytest.mark.skipif(
    not os.environ.get("CRYODRGN_PYTHON"), reason="set CRYODRGN_PYTHON to a python with cryodrgn (4.3.1) installed"
)
def test_conventions_equal_cryodrgns():
    """benchmarks/pose_conventions.py --quick --check: cryoDRGN's parse_pose_star and parse_pose_csparc
    make the files from the truth; cryopose reads the .cs as cryoDRGN does (1e-5) and imports every
    file at MAnE ≤ 1e-3° and shift error ≤ 1e-3 Å, where the transposed / sign-flipped conventions are
    off by > 30° / > 1 Å."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pose_conventions.py"), "--quick", "--check"]
        + ["--cryodrgn-python", os.environ["CRYODRGN_PYTHON"]],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "every convention holds" in proc.stdout
