"""Reconstruction backends: each recovers the source map of simulated particles, and they agree."""

import numba
import numpy as np
import pytest
import torch

from cryopose import io
from cryopose.errors import InputError
from cryopose.geometry import euler_to_matrix, matrix_to_euler
from cryopose.masks import mask_from_ground_truth
from cryopose.metrics import compare_maps, fsc_curve, pearson_correlation
from cryopose.reconstruct import RelionNotFound, reconstruct, reconstruct_relion
from cryopose.simulate import SimulationSpec, simulate_entry

EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
FAST = dict(
    box_size=32,
    pixel_size=4.1,
    n_particles=1500,
    snr=5.0,
    bfactor=0.0,
    contrast_sigma=0.0,
    shift_sigma=2.0,
    defocus_range=(1.0, 2.5),
)


@pytest.fixture(scope="module")
def c1(tmp_path_factory):
    return simulate_entry(
        SimulationSpec(name="rc1", symmetry="C1", seed=3, **FAST), tmp_path_factory.mktemp("b"), progress=False
    )


@pytest.fixture(scope="module")
def d2(tmp_path_factory):
    return simulate_entry(
        SimulationSpec(name="rd2", symmetry="D2", seed=4, **FAST), tmp_path_factory.mktemp("b"), progress=False
    )


def _source(entry):
    return io.read_map(entry / f"{entry.name}_source_map.mrc")[0]


def _rewrite(entry, name, transform):
    star = io.read_particles_star(entry / "particles_0.star")
    parts = star.particles.copy()
    transform(parts)
    io.write_particles_star(entry / name, io.ParticleStar(star.optics, parts))
    return entry / name


def test_torch_backend_recovers_the_source(c1):
    vol, px = reconstruct(c1 / "particles_0.star", backend="torch", progress=False)
    assert vol.shape == (32, 32, 32) and px == pytest.approx(4.1)
    src = _source(c1)
    assert pearson_correlation(vol, src) > 0.93
    freqs, fsc = fsc_curve(vol, src, px)
    assert fsc[freqs <= 1 / 12.0].min() > 0.9


def test_torch_backend_fails_with_transposed_poses_or_flipped_shifts(c1):
    good = pearson_correlation(reconstruct(c1 / "particles_0.star", progress=False)[0], _source(c1))

    def transpose(p):
        p[EULER] = matrix_to_euler(euler_to_matrix(torch.tensor(p[EULER].to_numpy())).transpose(-1, -2)).numpy()

    def flip(p):
        p["rlnOriginXAngst"] *= -1
        p["rlnOriginYAngst"] *= -1

    for name, fn in (("t.star", transpose), ("f.star", flip)):
        bad = pearson_correlation(reconstruct(_rewrite(c1, name, fn), progress=False)[0], _source(c1))
        assert bad < good - 0.1, (name, good, bad)


def test_torch_backend_symmetry_and_weights(d2):
    src = _source(d2)
    with_sym = pearson_correlation(reconstruct(d2 / "particles_0.star", symmetry="D2", progress=False)[0], src)
    assert with_sym > 0.93

    # Weights: 80 % of the particles get random poses and weight 0; weighted they must not spoil the map.
    def scramble(p):
        rng = np.random.default_rng(0)
        bad = rng.random(len(p)) < 0.8
        p.loc[bad, "rlnAngleRot"] = rng.uniform(-180, 180, bad.sum())
        p.loc[bad, "rlnAngleTilt"] = rng.uniform(0, 180, bad.sum())
        p["rlnParticleFigureOfMerit"] = np.where(bad, 0.0, 1.0)

    star = _rewrite(d2, "scrambled.star", scramble)
    weighted = pearson_correlation(reconstruct(star, symmetry="D2", use_weights=True, progress=False)[0], src)
    unweighted = pearson_correlation(reconstruct(star, symmetry="D2", progress=False)[0], src)
    assert weighted > 0.85 and unweighted < weighted - 0.05, (weighted, unweighted)


def test_bad_inputs(c1, tmp_path):
    with pytest.raises(InputError, match="rlnParticleFigureOfMerit"):
        reconstruct(c1 / "particles_0.star", use_weights=True, progress=False)
    with pytest.raises(InputError, match="backend"):
        reconstruct(c1 / "particles_0.star", backend="cryosparc")
    with pytest.raises(InputError, match="X9"):
        reconstruct(c1 / "particles_0.star", symmetry="X9", progress=False)
    with pytest.raises(RelionNotFound, match="not_a_relion"):
        reconstruct_relion(c1 / "particles_0.star", launcher=["not_a_relion_launcher"])


def test_finite_check_sees_through_an_overflowing_sum(c1, tmp_path):
    """Each batch is checked by its pixel sum first: huge finite pixels overflow that sum yet are
    finite (accepted), and a NaN among them is still found, by image and row."""
    import shutil

    import mrcfile

    star = tmp_path / "particles_0.star"
    shutil.copy(c1 / "particles_0.star", star)
    shutil.copy(c1 / "particles_0.mrcs", tmp_path / "particles_0.mrcs")
    with mrcfile.mmap(tmp_path / "particles_0.mrcs", "r+") as mrc:
        mrc.data[1] = 1e36  # 32² of them: the float32 sum is inf
        assert not np.isfinite(mrc.data[:128].sum(dtype=np.float32))
    reconstruct(star, backend="torch", progress=False)  # finite pixels: no error
    with mrcfile.mmap(tmp_path / "particles_0.mrcs", "r+") as mrc:
        mrc.data[1, 5, 6] = np.nan
    with pytest.raises(InputError, match=r"image 2 of particles_0\.mrcs has NaN") as err:
        reconstruct(star, backend="torch", progress=False)
    assert "row 1" in str(err.value)


@pytest.mark.relion
def test_torch_and_relion_backends_agree(c1, d2):
    for entry, sym in ((c1, "C1"), (d2, "D2")):
        vt, px = reconstruct(entry / "particles_0.star", symmetry=sym, backend="torch", progress=False)
        vr, px_r = reconstruct(entry / "particles_0.star", symmetry=sym, backend="relion")
        assert px_r == pytest.approx(px, rel=1e-4)
        src = _source(entry)
        # Measured: PCC torch-relion 0.99, each against the source 0.95-0.98 at this size and SNR.
        assert pearson_correlation(vt, vr) > 0.97
        assert pearson_correlation(vr, src) > 0.93
        freqs, fsc = fsc_curve(vt, vr, px)
        assert fsc[freqs <= 1 / 10.0].min() > 0.9
    assert not list(c1.glob(".reconstruct-*"))  # RELION's scratch folder is cleaned up


# Noisy enough that the reconstruction scheme shows in the metrics: with the "wiener" scheme the
# masked PCC(GT0, GT1) of such entries is 0.03-0.07 above relion_reconstruct's.
NOISY = dict(FAST, snr=0.1, bfactor=40.0, contrast_sigma=0.2, n_particles=1000)


@pytest.mark.relion
@pytest.mark.parametrize("sym", ["C1", "C4"])
def test_torch_backend_gives_relions_metrics(tmp_path_factory, sym):
    """Issue 19 item 4: on the same noisy entry and true poses, the torch backend's default scheme
    gives relion_reconstruct's half-maps, so PCC(GT0, GT1) (masked and not) agrees within 0.01 and
    the FSC resolutions within one Fourier shell."""
    entry = simulate_entry(
        SimulationSpec(name=f"rn{sym.lower()}", symmetry=sym, seed=7, **NOISY),
        tmp_path_factory.mktemp("b"),
        progress=False,
    )
    maps = {}
    for backend in ("torch", "relion"):
        maps[backend] = [
            reconstruct(entry / f"particles_{h}.star", symmetry=sym, backend=backend, progress=False)[0] for h in (0, 1)
        ]
    px = 4.1
    for h in (0, 1):  # the maps themselves, at the same scale
        vt, vr = maps["torch"][h], maps["relion"][h]
        # Measured 0.988-0.999; relion_reconstruct against itself, after adding 1e-5° of noise to
        # rlnAngleRot, gives 0.992 on such a half (it divides by near-empty voxels' weights).
        assert pearson_correlation(vt, vr) > 0.98
        assert float(vt.std() / vr.std()) == pytest.approx(1.0, abs=0.02)
    mask = mask_from_ground_truth((maps["relion"][0] + maps["relion"][1]) / 2, px)
    got = {b: compare_maps(*maps[b], px, mask=mask).as_dict() for b in maps}
    shell = 1 / (32 * px)  # one Fourier shell, in 1/Å
    for key, value in got["relion"].items():
        if "PCC" in key:
            assert got["torch"][key] == pytest.approx(value, abs=0.01), (key, got)
        else:
            assert abs(1 / got["torch"][key] - 1 / value) <= shell, (key, got)
    # The "wiener" scheme does not: its half-maps are less noisy than RELION's.
    wiener = [
        reconstruct(entry / f"particles_{h}.star", symmetry=sym, progress=False, scheme="wiener")[0] for h in (0, 1)
    ]
    assert compare_maps(*wiener, px, mask=mask).masked_pcc > got["relion"]["masked_PCC"] + 0.01, got


def test_numba_kernel_equals_torch_scatter(d2):
    """The CPU kernel (cryopose.reconstruct_kernels) makes the map torch's index_add_ makes, the GPU's path:
    same corners, same weights, same Friedel conjugation (D2: 4 operators, shifted particles)."""
    star = d2 / "particles_0.star"
    scatter, _ = reconstruct(star, symmetry="D2", progress=False, kernel="torch")
    kernel, _ = reconstruct(star, symmetry="D2", progress=False, kernel="numba", batch_size=100)
    np.testing.assert_allclose(kernel, scatter, atol=2e-5 * float(np.abs(scatter).max()))


def test_numba_kernel_same_bits_on_any_thread_count():
    """Threads own z-planes, so each voxel's sum is added in one order: the accumulator does not
    depend on how many threads filled it (a kernel sharing voxels between threads, or one with
    per-thread copies summed at the end, would differ in the last bits)."""
    from scipy.spatial.transform import Rotation

    from cryopose.reconstruct import insert_particles

    gen = torch.Generator().manual_seed(5)
    images = torch.randn(40, 32, 32, generator=gen)
    rot = torch.tensor(Rotation.random(40, random_state=5).as_matrix(), dtype=torch.float32)
    args = (images, rot, torch.randn(40, 2, generator=gen), torch.rand(40, 32, 17, generator=gen), torch.ones(40))
    sums = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            sums.append(insert_particles(*args, torch.eye(3)[None], 2, kernel="numba"))
    finally:
        torch.set_num_threads(previous)
    assert bool(sums[0].abs().sum() > 0)
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])


def test_two_reconstructions_side_by_side_give_the_same_maps(c1):
    """evaluate(jobs=2) runs the two halves in two Python threads, one kernel thread each (serial
    builds, which never enter numba's threading layer): the same maps, bit for bit, as one after
    the other with all threads (the layer aborts the process if two threads enter it at once)."""
    from cryopose.evaluate import _reconstruct_each
    from cryopose.reconstruct_kernels import kernel_threads, using_threads

    stars = [c1 / "particles_0.star", c1 / "particles_1.star"]
    one_by_one = _reconstruct_each(stars, 1, backend="torch", progress=False)
    side_by_side = _reconstruct_each(stars, 2, backend="torch", progress=False)
    for (a, _), (b, _) in zip(one_by_one, side_by_side):
        assert np.array_equal(a, b)
    with using_threads(1):
        assert kernel_threads() == 1
    assert kernel_threads() == max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def test_gpu_formulation_of_the_fourier_steps_matches_the_cpu_one():
    """Off the CPU the density compensation runs as torch operations on a blob grid, and the
    leading axes are transformed by torch in slabs; no GPU is needed to check that formulation
    against the CPU's (numba kernels, radial blob table, scipy in place) on the same inputs."""
    from cryopose.reconstruct import _fft_leading_axes, _fft_leading_axes_slabs, _finish_relion

    gen = torch.Generator().manual_seed(2)
    s, pad = 24, 2
    p = s * pad
    grid = torch.randn(p, p, p // 2 + 1, dtype=torch.complex64, generator=gen)
    for inverse in (True, False):
        a, b = grid.clone(), grid.clone()
        _fft_leading_axes(a, inverse)
        _fft_leading_axes_slabs(b, inverse)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    num = torch.randn(p, p, p // 2 + 1, dtype=torch.complex64, generator=gen)
    den = torch.rand(p, p, p // 2 + 1, generator=gen) * 50
    cpu_way = _finish_relion(num.clone(), den.clone(), s, pad)
    gpu_way = _finish_relion(num.clone(), den.clone(), s, pad, fused=False)
    assert np.abs(cpu_way).max() > 0
    np.testing.assert_allclose(gpu_way, cpu_way, rtol=0, atol=1e-5 * float(np.abs(cpu_way).max()))


def test_unknown_kernel_refused(c1):
    with pytest.raises(InputError, match="kernel 'fast'"):
        reconstruct(c1 / "particles_0.star", progress=False, kernel="fast")
