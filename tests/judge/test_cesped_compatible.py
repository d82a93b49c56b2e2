"""The CESPED-compatible mode: CESPED 25.12.0's resolution rule, shell binning, label reduction and
metric names, each pinned by values worked out by hand or recorded from the CESPED package; and,
opt-in (CESPED_PYTHON=/path/to/cesped-venv/bin/python), the whole evaluation against CESPED's own."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryopose.data import ParticlesDataset
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.evaluate import CESPED_METRICS, cesped_metrics, evaluate
from cryopose.geometry import euler_to_matrix
from cryopose.metrics import cesped_fsc_resolution, compare_maps, fsc_curve, fsc_resolution
from cryopose.simulate import SimulationSpec, simulate_entry
from cryopose.symmetry import (
    canonical_mate,
    cesped_canonical_mate,
    cesped_symmetry_matrices,
    symmetry_mates,
    symmetry_matrices,
)

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# The resolution rule
# ---------------------------------------------------------------------------------------------

FREQS = np.arange(11) / 20.0  # D = 20, 1 Å/px: f_k = k/20 1/Å
#               0    1    2    3    4    5    6    7    8     9    10
DIP = np.array([1.0, 0.9, 0.1, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0, 0.0])


def test_first_crossing_versus_cryopose_rule_on_a_dip():
    # CESPED: the first shell below 0.143 is 2; between f1 = 0.05 (0.9) and f2 = 0.1 (0.1) the curve
    # meets 0.143 at 0.05 + 0.05·(0.143 − 0.9)/(0.1 − 0.9) = 0.0973125 1/Å.
    assert cesped_fsc_resolution(FREQS, DIP, 0.143) == pytest.approx(1 / 0.0973125, rel=1e-12)
    # cryopose: the dip at shell 2 lies in the low-frequency region (coarser than 6 Å: shells 1-3) and
    # the curve is back above at shell 3, so the search starts there; the crossing is between
    # f6 = 0.3 (0.2) and f7 = 0.35 (0.1): 0.3 + 0.05·(0.2 − 0.143)/(0.2 − 0.1) = 0.3285 1/Å.
    assert fsc_resolution(FREQS, DIP, 0.143, low_resolution_angstrom=6.0) == pytest.approx(1 / 0.3285, rel=1e-12)


def test_first_crossing_edge_cases():
    # Never below: Nyquist, in both rules.
    flat = np.full(11, 0.9)
    assert cesped_fsc_resolution(FREQS, flat, 0.5) == pytest.approx(2.0) == fsc_resolution(FREQS, flat, 0.5)
    # An undefined shell (NaN) is never "below" for CESPED; cryopose says the resolution is unknown.
    with_nan = np.array([1.0, np.nan, 0.8, 0.4, 0.1, 0, 0, 0, 0, 0, 0])
    # between f2 = 0.1 (0.8) and f3 = 0.15 (0.4): 0.1 + 0.05·(0.5 − 0.8)/(0.4 − 0.8) = 0.1375
    assert cesped_fsc_resolution(FREQS, with_nan, 0.5) == pytest.approx(1 / 0.1375)
    assert math.isnan(fsc_resolution(FREQS, with_nan, 0.5))
    # Shell 0 below (maps whose means have opposite signs): CESPED's k − 1 is the last shell.
    neg = np.array([-1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.3])
    expected = 1 / (0.5 + (0.0 - 0.5) * (0.143 - 0.3) / (-1.0 - 0.3))
    assert cesped_fsc_resolution(FREQS, neg, 0.143) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# The shell binning
# ---------------------------------------------------------------------------------------------


def _cesped_fsc(a, b):
    """CESPED's unmasked FSC, transcribed from cesped.utils.fsc.getMaskCorrectedFSC (25.12.0), in float64."""
    fa, fb = np.fft.fftshift(np.fft.fftn(a)), np.fft.fftshift(np.fft.fftn(b))
    size = a.shape[0]
    xv = np.arange(size) - int(size / 2)
    grid = np.meshgrid(xv, xv, xv, indexing="ij")
    radii = np.sqrt(sum(g**2 for g in grid))
    ccf, i1, i2 = np.real(fa * fb.conj()), np.abs(fa) ** 2, np.abs(fb) ** 2
    out = []
    for k in range(int(size / 2) + 1):
        shell = (radii >= k) & (radii < k + 1)
        out.append(ccf[shell].sum() / np.sqrt(i1[shell].sum() * i2[shell].sum()))
    return np.array(out)


@pytest.mark.parametrize("size", [12, 11])
def test_floor_binning_is_cespeds(size):
    gen = np.random.default_rng(size)
    a = gen.normal(size=(size,) * 3)
    b = a + gen.normal(size=(size,) * 3)
    reference = _cesped_fsc(a, b)
    ours = compare_maps(a, b, 1.0, cesped_compatible=True).fsc
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)
    # cryopose's own binning (rounded radii) is another curve: the test tells them apart.
    assert np.abs(fsc_curve(a, b, 1.0)[1] - reference).max() > 1e-3


def test_compatible_comparison_uses_the_first_crossing_and_keeps_the_pcc():
    gen = np.random.default_rng(0)
    a = gen.normal(size=(16,) * 3)
    b = a + 2 * gen.normal(size=(16,) * 3)
    mask = np.zeros((16,) * 3)
    mask[3:13, 3:13, 3:13] = 1.0
    compat = compare_maps(a, b, 1.5, mask=mask, cesped_compatible=True)
    own = compare_maps(a, b, 1.5, mask=mask)
    assert compat.pcc == pytest.approx(own.pcc, abs=1e-12)
    assert compat.masked_pcc == pytest.approx(own.masked_pcc, abs=1e-12)
    for t in (0.143, 0.5):
        assert compat.resolution[t] == cesped_fsc_resolution(compat.frequencies, compat.fsc, t)
        assert compat.masked_resolution[t] == cesped_fsc_resolution(compat.frequencies, compat.masked_fsc, t)


# ---------------------------------------------------------------------------------------------
# Training labels: CESPED's canonical mate
# ---------------------------------------------------------------------------------------------

ANGLES = [[169.25, 127.5, -14.625], [151.5, 116.0, 104.75], [-115.75, 63.25, 29.25], [-76.25, 81.5, -116.375]]
# Recorded from CESPED 25.12.0 (scipy 1.17.1) in a separate venv, with the code of
# cesped/datamanager/relionStarDataset.py's __getitem:
#   r = R.from_euler("ZYZ", torch.FloatTensor(angles), degrees=True); r = r.reduce(R.create_group(sym))
#   torch.FloatTensor(r.as_matrix())
CESPED_LABELS = {
    "C4": [
        [
            [-0.62579536, 0.02947085, 0.77943033],
            [-0.13819090, 0.97928816, -0.14797947],
            [-0.76764798, -0.20031504, -0.60876143],
        ],
        [
            [0.79660076, -0.42602810, -0.42886746],
            [-0.55951935, -0.25106701, -0.78987557],
            [0.22883472, 0.86917514, -0.43837115],
        ],
        [
            [0.56599158, 0.18096329, 0.80430454],
            [0.26948968, 0.88140213, -0.38795048],
            [-0.77912056, 0.43632847, 0.45009845],
        ],
        [
            [0.88583815, 0.40003803, -0.23507512],
            [0.14916243, 0.23421893, 0.96067274],
            [0.43936467, -0.88606495, 0.14780942],
        ],
    ],
    "D2": [
        [
            [0.62579536, -0.02947085, -0.77943033],
            [-0.13819090, 0.97928816, -0.14797947],
            [0.76764798, 0.20031504, 0.60876143],
        ],
        [
            [0.55951935, 0.25106701, 0.78987557],
            [-0.79660076, 0.42602810, 0.42886746],
            [-0.22883472, -0.86917514, 0.43837115],
        ],
        [
            [0.26948968, 0.88140213, -0.38795048],
            [-0.56599158, -0.18096329, -0.80430454],
            [-0.77912056, 0.43632847, 0.45009845],
        ],
        [
            [0.88583815, 0.40003803, -0.23507512],
            [0.14916243, 0.23421893, 0.96067274],
            [0.43936467, -0.88606495, 0.14780942],
        ],
    ],
}


@pytest.mark.parametrize("symmetry", ["C4", "D2"])
def test_canonical_mate_matches_cespeds_recorded_labels(symmetry):
    rot = euler_to_matrix(torch.tensor(ANGLES, dtype=torch.float64))
    got = cesped_canonical_mate(rot, symmetry)
    torch.testing.assert_close(got, torch.tensor(CESPED_LABELS[symmetry], dtype=torch.float64), rtol=0, atol=1e-6)
    # Every mate g·R reduces to the same label, and it is one of R's mates.
    mates = symmetry_mates(rot, symmetry)  # (N, G, 3, 3)
    for g in range(mates.shape[1]):
        torch.testing.assert_close(cesped_canonical_mate(mates[:, g], symmetry), got, rtol=0, atol=1e-9)
    assert ((mates - got[:, None]).abs().amax(dim=(-1, -2)).min(dim=1).values < 1e-9).all()
    # With the map's own group (C4, D2: scipy's is RELION's) it is cryopose's canonical_mate.
    torch.testing.assert_close(got, canonical_mate(rot, symmetry), rtol=0, atol=1e-9)


def test_cespeds_groups_are_relions_except_t_and_i():
    def same_set(a, b):
        return all(min(float((x - y).abs().max()) for y in b) < 1e-9 for x in a)

    for name in ("C2", "C4", "D2", "D3", "O"):
        assert same_set(cesped_symmetry_matrices(name), symmetry_matrices(name))
    assert not same_set(cesped_symmetry_matrices("T"), symmetry_matrices("T"))
    assert not same_set(cesped_symmetry_matrices("I"), symmetry_matrices("I"))  # scipy's I is RELION's I1
    assert same_set(cesped_symmetry_matrices("I"), symmetry_matrices("I1"))
    with pytest.raises(InputError, match="CESPED package has no group"):
        cesped_symmetry_matrices("I3")


def test_c1_and_missing_labels_are_kept():
    rot = euler_to_matrix(torch.tensor(ANGLES, dtype=torch.float64))
    assert torch.equal(cesped_canonical_mate(rot, "C1"), rot)
    rot[1] = float("nan")
    out = cesped_canonical_mate(rot, "D2")
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


@pytest.fixture(scope="module")
def d2(tmp_path_factory):
    spec = SimulationSpec(name="ccd2", symmetry="D2", box_size=24, pixel_size=4.0, n_particles=40, snr=1.0, seed=5)
    return Entry(simulate_entry(spec, tmp_path_factory.mktemp("b"), progress=False))


def test_dataset_labels_are_reduced_only_in_compatible_mode(d2):
    raw = ParticlesDataset(d2, 0, ctf_correction=None)
    compat = ParticlesDataset(d2, 0, ctf_correction=None, cesped_compatible=True)
    idx = list(range(len(raw)))
    r_raw = raw.get_batch(idx)[2][0]
    r_compat = compat.get_batch(idx)[2][0]
    assert r_compat.dtype == r_raw.dtype == torch.float32
    torch.testing.assert_close(r_compat, cesped_canonical_mate(r_raw, "D2"))
    assert (r_compat - r_raw).abs().amax(dim=(-1, -2)).max() > 0.1  # some labels moved to another mate
    torch.testing.assert_close(compat[3][2][0], r_compat[3])


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def test_compatible_mode_refuses_the_torch_backend(d2, tmp_path):
    star = d2.star_path(0)
    with pytest.raises(InputError, match="relion_reconstruct"):
        evaluate(d2, star, d2.star_path(1), "SO3", backend="torch", cesped_compatible=True, progress=False)
    with pytest.raises(InputError, match="pad 3"):
        evaluate(d2, star, d2.star_path(1), "SO3", pad=3, cesped_compatible=True, progress=False)


def test_command_line_switch_refuses_torch(d2, capsys):
    from cryopose.cli import main as cli_main

    args = ["evaluate", str(d2.root), "--half0", str(d2.star_path(0)), "--half1", str(d2.star_path(1))]
    assert cli_main([*args, "--cesped-compatible", "--backend", "torch", "--quiet"]) == 2
    assert "relion_reconstruct" in capsys.readouterr().err


def test_cesped_metric_names_and_masking_choices():
    ours = {
        "MAnE": 10.0,
        "wMAnE": 9.0,
        "masked_PCC(GT0,GT1)": 0.9,
        "masked_FSCR0.143(GT0,GT1)": 4.0,
        "masked_FSCR0.5(GT0,GT1)": 5.0,
        "masked_FSCR0.143(V0,V1)": 6.0,
        "masked_FSCR0.5(V0,V1)": 7.0,
        "masked_PCC(V0,V1)": 0.8,
        "masked_PCC(GT,V)": 0.7,
        "PCC(GT,V)": 0.6,
        "FSCR0.143(GT,V)": 8.0,
        "FSCR0.5(GT,V)": math.nan,
    }
    out = cesped_metrics(ours)
    assert set(out) == set(CESPED_METRICS) - {"shiftsRMSE"}  # no shifts predicted
    assert out["mapVsGT_correlaton_diff_masked"] == pytest.approx(0.2)
    assert out["mapVsGT_correlaton_diff"] == pytest.approx(0.3)  # masked GT0/GT1 minus unmasked GT/V
    assert out["mapVsGT_resolution"] == 8.0 and out["mapVsGT_resolution05"] is None
    assert cesped_metrics({**ours, "shift_RMSE_A": 1.5})["shiftsRMSE"] == 1.5


@pytest.mark.relion
def test_compatible_evaluation_metrics(d2, tmp_path):
    from cryopose import io

    paths = []
    for h in d2.halves:
        star = d2.read_star(h)
        parts = star.particles.copy()
        parts["rlnParticleFigureOfMerit"] = 0.75
        paths.append(tmp_path / f"p{h}.star")
        io.write_particles_star(paths[-1], io.ParticleStar(star.optics, parts))
    common = dict(ground_truth_dir=tmp_path / "gt", plots=False, progress=False)
    m = evaluate(d2, *paths, "SO3", cesped_compatible=True, **common).metrics
    assert m["backend"] == "relion" and m["cesped_compatible"] is True
    assert set(m["cesped"]) == set(CESPED_METRICS) - {"shiftsRMSE"}
    assert m["cesped"]["meanAngularError"] == pytest.approx(0.0, abs=1e-4)
    assert m["cesped"]["GT_correlation"] == m["masked_PCC(GT0,GT1)"]
    default = evaluate(d2, *paths, "SO3", backend="relion", **common).metrics
    assert "cesped" not in default and "cesped_compatible" not in default
    assert default["masked_PCC(GT0,GT1)"] == pytest.approx(m["masked_PCC(GT0,GT1)"], abs=1e-9)  # same GT maps


# ---------------------------------------------------------------------------------------------
# Opt-in: against the CESPED package itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("CESPED_PYTHON"), reason="set CESPED_PYTHON to a cesped 25.12.0 venv's python")
def test_every_metric_equals_cespeds(tmp_path):
    """benchmarks/cesped_compatible.py --quick --check: a C1 and a D2 entry, two prediction sets each,
    CESPED's evaluate and cryopose's compatible mode on the same files; PCCs within 1e-3, resolutions
    to 1e-4 relative (CESPED's FFT is float32), D2 training labels within 1e-5."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cesped_compatible.py"), "--quick", "--check"]
        + ["--workdir", str(tmp_path), "--cesped-python", os.environ["CESPED_PYTHON"]],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "every metric agrees" in proc.stdout
