import json
import os

import mrcfile
import numpy as np
import pytest
import torch
from scipy import ndimage

from cryopose import cli, simulate
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.geometry import euler_to_matrix
from cryopose.io import open_stack, read_images, write_map
from cryopose.metrics import pearson_correlation
from cryopose.simulate import (
    SUITES,
    SimulationSpec,
    map_from_model_file,
    map_from_mrc,
    pseudo_molecule,
    sample_poses,
    simulate_entry,
)
from cryopose.symmetry import symmetry_matrices

SMALL = dict(box_size=32, pixel_size=3.3, n_particles=40, snr=1.0)


def _rotate_map(vol: np.ndarray, g: np.ndarray) -> np.ndarray:
    """V'(r) = V(g·r) on the grid, r = (x, y, z) about voxel D//2 (arrays are [z, y, x])."""
    d = vol.shape[0]
    c = d // 2
    perm = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])  # xyz <-> zyx
    m = perm @ g @ perm
    return ndimage.affine_transform(vol, m, offset=np.full(3, c) - m @ np.full(3, c), order=1)


def test_pseudo_molecule_is_deterministic_and_seeded():
    a = pseudo_molecule(48, 2.5, "C1", seed=3)
    b = pseudo_molecule(48, 2.5, "C1", seed=3)
    c = pseudo_molecule(48, 2.5, "C1", seed=4)
    assert np.array_equal(a, b)
    assert pearson_correlation(a, c) < 0.5


@pytest.mark.parametrize("sym", ["C3", "D2", "T"])
def test_pseudo_molecule_has_the_requested_symmetry(sym):
    vol = pseudo_molecule(48, 2.5, sym, seed=1)
    for g in symmetry_matrices(sym).numpy()[1:]:
        assert pearson_correlation(_rotate_map(vol, g), vol) > 0.97
    # ... and not a higher one: a C1 map is not invariant under a 2-fold.
    asym = pseudo_molecule(48, 2.5, "C1", seed=1)
    two_fold = symmetry_matrices("C2").numpy()[1]
    assert pearson_correlation(_rotate_map(asym, two_fold), asym) < 0.6


def test_pseudo_molecule_is_compact_and_connected_like_a_protein():
    vol = pseudo_molecule(64, 2.13, "C1", seed=2)
    d = vol.shape[0]
    z, y, x = np.indices(vol.shape) - d // 2
    w = vol / vol.sum()
    rg = np.sqrt((w * (x**2 + y**2 + z**2)).sum()) * 2.13
    diameter = 0.6 * 64 * 2.13
    assert 0.2 * diameter < rg < 0.45 * diameter, rg  # a filled globule, neither a point nor a shell
    binary = vol > 0.15 * vol.max()
    labels, n = ndimage.label(ndimage.binary_dilation(binary, iterations=1))
    sizes = ndimage.sum(binary, labels, range(1, n + 1))
    assert sizes.max() > 0.8 * binary.sum()  # one chain: most density is one connected body
    # Secondary structure: the map is not a smooth blob; it has strong mid-resolution (5–15 Å) power.
    ft = np.abs(np.fft.fftn(vol)) ** 2
    k = np.sqrt(sum(np.fft.fftfreq(d)[g] ** 2 for g in np.ix_(range(d), range(d), range(d)))) / 2.13
    mid = ft[(k > 1 / 15) & (k < 1 / 5)].sum() / ft[k > 0].sum()
    assert mid > 0.02, mid


def test_sample_poses_preferred_orientation_concentrates_tilt():
    g = torch.Generator().manual_seed(0)
    uniform = sample_poses(4000, g)
    biased = sample_poses(4000, torch.Generator().manual_seed(0), preferred_fraction=0.6, preferred_sigma=10)
    top = lambda r: (r[:, 2, 2] > np.cos(np.deg2rad(20))).float().mean()  # beam within 20° of z
    assert float(top(uniform)) < 0.05
    assert float(top(biased)) > 0.55


def test_map_from_model_file_places_atoms(tmp_path):
    pdb = tmp_path / "two_atoms.pdb"
    pdb.write_text(
        "ATOM      1  CA  ALA A   1      10.000   0.000   0.000  1.00 20.00           C\n"
        "ATOM      2  SG  CYS A   2     -10.000   0.000   0.000  1.00 20.00           S\n"
        "END\n"
    )
    vol = map_from_model_file(pdb, 32, 2.0)
    d = 32
    # Atoms are centred: C at x=+10 Å -> +5 px, S (heavier, Z=16) at x=-5 px from the box centre.
    assert vol[d // 2, d // 2, d // 2 - 5] == pytest.approx(1.0)
    assert vol[d // 2, d // 2, d // 2 + 5] == pytest.approx(6 / 16, rel=0.05)


def test_map_from_model_file_errors(tmp_path):
    bad = tmp_path / "junk.cif"
    bad.write_text("this is not a model\n")
    with pytest.raises(InputError, match="junk.cif"):
        map_from_model_file(bad, 32, 2.0)


def test_map_from_mrc_resamples_to_pixel_size(tmp_path):
    d = 64
    z, y, x = np.indices((d, d, d)) - d // 2
    blob = np.exp(-((x - 8) ** 2 + y**2 + z**2) / (2 * 3.0**2)).astype(np.float32)  # 1 Å px
    write_map(tmp_path / "blob.mrc", blob, 1.0)
    out = map_from_mrc(tmp_path / "blob.mrc", 32, 2.0)
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert peak == (16, 16, 16 + 4)  # 8 Å -> 4 pixels of 2 Å
    # Width in Å is kept: sigma 3 Å -> 1.5 px, so the value one pixel away is exp(-1/(2*1.5²)).
    assert out[16, 16, 21] / out[16, 16, 20] == pytest.approx(np.exp(-1 / (2 * 1.5**2)), rel=0.05)


def test_simulate_entry_writes_the_cesped_layout(tmp_path):
    spec = SimulationSpec(name="e1", symmetry="C2", seed=1, **SMALL)
    folder = simulate_entry(spec, tmp_path, progress=False)
    for h in (0, 1):
        for name in (f"particles_{h}.star", f"particles_{h}.mrcs", f"info_{h}.json"):
            assert (folder / name).exists()
        assert json.loads((folder / f"info_{h}.json").read_text()) == {"symmetry": "C2"}
    assert (folder / "e1_mask.mrc").exists() and (folder / "e1_source_map.mrc").exists()
    entry = Entry(folder)
    entry.validate()
    assert entry.n_particles(0) == entry.n_particles(1) == 40
    star0, star1 = entry.read_star(0), entry.read_star(1)
    assert star0.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(3.3)
    conf = star0.particles["rlnMaxValueProbDistribution"]
    assert conf.between(0, 1).all() and conf.std() > 0.01
    # The halves are different particles.
    assert not np.allclose(star0.particles["rlnAngleRot"], star1.particles["rlnAngleRot"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_simulated_images_carry_the_signal_at_their_pose(tmp_path):
    spec = SimulationSpec(
        name="hi",
        symmetry="C1",
        seed=2,
        box_size=32,
        pixel_size=3.3,
        n_particles=30,
        snr=1000.0,
        shift_sigma=0.0,
        contrast_sigma=0.0,
    )
    folder = simulate_entry(spec, tmp_path, progress=False)
    entry = Entry(folder)
    parts = entry.read_star(0).particles
    images = read_images(open_stack(entry.stack_path(0)), np.arange(30))
    from torch_fourier_slice import project_3d_to_2d

    vol = torch.from_numpy(mrcfile.read(folder / "hi_source_map.mrc").copy())
    poses = euler_to_matrix(torch.tensor(parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()))
    proj = project_3d_to_2d(vol, poses.float()).numpy()
    from cryopose.ctf import ctf_from_star_columns, phase_flip
    from cryopose.io import particles_with_optics

    ctf = ctf_from_star_columns(particles_with_optics(entry.read_star(0)), 32)
    flipped = phase_flip(torch.from_numpy(images).double(), ctf).numpy()
    detail = lambda im: im - ndimage.gaussian_filter(im, 3)  # drop the shared low-resolution envelope
    own = np.array([pearson_correlation(detail(a), detail(b)) for a, b in zip(flipped, proj)])
    other = np.array([pearson_correlation(detail(a), detail(b)) for a, b in zip(flipped, np.roll(proj, 1, 0))])
    # Phase-flipped images correlate with their own projection, not with another particle's.
    assert np.median(own) > 0.7 and np.median(own) > np.median(other) + 0.3, (np.median(own), np.median(other))


def test_simulate_entry_is_idempotent_and_guards_other_specs(tmp_path):
    spec = SimulationSpec(name="e2", seed=1, **SMALL)
    folder = simulate_entry(spec, tmp_path, progress=False)
    stamp = os.stat(folder / "particles_0.mrcs").st_mtime_ns
    simulate_entry(spec, tmp_path, progress=False)
    assert os.stat(folder / "particles_0.mrcs").st_mtime_ns == stamp
    other = SimulationSpec(name="e2", seed=2, **SMALL)
    with pytest.raises(InputError, match="different parameters"):
        simulate_entry(other, tmp_path, progress=False)
    simulate_entry(other, tmp_path, overwrite=True, progress=False)
    assert json.loads((folder / "simulation.json").read_text())["seed"] == 2


def test_interrupted_simulation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = simulate.simulate_images

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(simulate, "simulate_images", failing)
    spec = SimulationSpec(name="e3", seed=1, box_size=32, pixel_size=3.3, n_particles=40, snr=1.0)
    with pytest.raises(KeyboardInterrupt):
        simulate_entry(spec, tmp_path, batch_size=16, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(symmetry="X7"), "X7"),
        (dict(box_size=31), "box_size"),
        (dict(pixel_size=0.0), "pixel_size"),
        (dict(snr=-1.0), "snr"),
        (dict(defocus_range=(2.0, 1.0)), "defocus_range"),
        (dict(name="a/b"), "name"),
    ],
)
def test_bad_specs_are_rejected_with_the_field(change, message, tmp_path):
    spec = SimulationSpec(**{**dict(name="bad", **SMALL), **change})
    with pytest.raises(InputError, match=message):
        simulate_entry(spec, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_spec_from_dict_rejects_unknown_keys():
    with pytest.raises(InputError, match="snrr"):
        SimulationSpec.from_dict({"name": "x", "snrr": 0.1})


def test_suites_cover_c1_cn_dn():
    for suite in ("default", "tiny"):
        syms = [s.symmetry for s in SUITES[suite]]
        assert "C1" in syms
        assert any(s.startswith("C") and s != "C1" for s in syms)
        assert any(s.startswith("D") for s in syms)
        for s in SUITES[suite]:
            s.validate()


def test_cli_simulate_and_info(tmp_path, capsys):
    assert (
        cli.main(
            [
                "simulate",
                "--name",
                "cli1",
                "--symmetry",
                "C3",
                "--box-size",
                "32",
                "--pixel-size",
                "3",
                "--n-particles",
                "20",
                "--snr",
                "0.5",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    assert cli.main(["info", str(tmp_path / "cli1")]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{") :])
    assert info["symmetry"] == "C3" and info["particles"] == {"0": 20, "1": 20} and info["box_size"] == 32


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert cli.main(["simulate", "--name", "x", "--symmetry", "Q2", "--out", str(tmp_path), "--quiet"]) == 2
    assert "Q2" in capsys.readouterr().err


def test_molecule_seed_keeps_the_molecule_and_changes_the_particles(tmp_path):
    base = SimulationSpec(name="a", symmetry="C2", box_size=24, pixel_size=4.0, n_particles=8, snr=1.0, seed=5)
    other = SimulationSpec(
        name="b",
        symmetry="C2",
        box_size=24,
        pixel_size=4.0,
        n_particles=8,
        snr=0.5,
        seed=6,
        molecule_seed=5,
        defocus_range=(2.0, 3.0),
    )
    a, b = (
        simulate.simulate_entry(base, tmp_path, progress=False),
        simulate.simulate_entry(other, tmp_path, progress=False),
    )
    map_a, map_b = (mrcfile.read(p / f"{p.name}_source_map.mrc") for p in (a, b))
    assert np.array_equal(map_a, map_b)
    assert not np.array_equal(
        read_images(open_stack(a / "particles_0.mrcs"), [0]), read_images(open_stack(b / "particles_0.mrcs"), [0])
    )
    # Without the key a spec is written as before, so existing entries stay valid.
    assert "molecule_seed" not in base.to_json() and other.to_json()["molecule_seed"] == 5
    assert SimulationSpec.from_dict(other.to_json()) == other
