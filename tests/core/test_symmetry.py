"""Tests for cryopose.symmetry: group structure, RELION's conventions, symmetry-aware errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from cryopose.errors import InputError
from cryopose.geometry import geodesic_angle, is_rotation_matrix, random_rotations, rotation_about_axis
from cryopose.symmetry import (
    canonical_mate,
    group_order,
    parse_symmetry,
    symmetry_aware_angle,
    symmetry_mates,
    symmetry_matrices,
)

GROUPS = {
    "C1": 1,
    "C2": 2,
    "C4": 4,
    "C7": 7,
    "D1": 2,
    "D2": 4,
    "D3": 6,
    "D5": 10,
    "T": 12,
    "O": 24,
    "I": 60,
    "I1": 60,
    "I2": 60,
    "I3": 60,
    "I4": 60,
}
NON_TRIVIAL = ["C2", "C4", "D2", "D3", "T", "O", "I1", "I3"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _match_counts(a: torch.Tensor, b: torch.Tensor, atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each matrix of a (b): how many matrices of b (a) equal it within atol."""
    close = (a[:, None] - b[None, :]).abs().amax(dim=(-1, -2)) < atol
    return close.sum(dim=1), close.sum(dim=0)


def _min_angle_between_elements(g: torch.Tensor) -> float:
    angles = geodesic_angle(g[:, None], g[None, :])
    angles = angles + 360.0 * torch.eye(len(g), dtype=angles.dtype)
    return float(angles.min())


# --------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("c1", "C1"),
        ("C1", "C1"),
        ("d2", "D2"),
        (" C12 ", "C12"),
        ("t", "T"),
        ("O", "O"),
        ("I", "I2"),
        ("i", "I2"),
        ("i1", "I1"),
        ("I3", "I3"),
        ("I4", "I4"),
        ("D1", "D1"),
    ],
)
def test_parse_symmetry_normalises(raw, canonical):
    assert parse_symmetry(raw) == canonical


@pytest.mark.parametrize(
    "bad",
    ["X3", "C0", "D0", "", "Q", "I5", "I0", "C-1", "C1.5", "Cn", "C04", "D2h", "C2v", "Oh", "Ih", "Td", "CI", None, 4],
)
def test_bad_names_raise_input_error(bad):
    with pytest.raises(InputError, match="valid names"):
        parse_symmetry(bad)
    with pytest.raises(InputError):
        symmetry_matrices(bad)


# --------------------------------------------------------------------------------------------
# Group structure


@pytest.mark.parametrize("name, order", GROUPS.items())
def test_group_structure(name, order):
    g = symmetry_matrices(name)
    assert g.shape == (order, 3, 3)
    assert group_order(name) == order
    assert g.dtype == torch.float64
    assert torch.equal(g[0], torch.eye(3, dtype=torch.float64)), "identity must come first"
    assert is_rotation_matrix(g, atol=1e-12).all(), "all elements must be proper rotations"
    # No duplicates.
    dup, _ = _match_counts(g, g, atol=1e-6)
    assert (dup == 1).all()
    # Closure: every product g_i g_j is exactly one element of the group; inverses too.
    products = (g[:, None] @ g[None, :]).reshape(-1, 3, 3)
    hits, _ = _match_counts(products, g, atol=1e-9)
    assert (hits == 1).all()
    inv_hits, _ = _match_counts(g.transpose(-1, -2), g, atol=1e-9)
    assert (inv_hits == 1).all()


def test_symmetry_matrices_returns_fresh_copy_in_requested_dtype():
    g = symmetry_matrices("D2")
    g.zero_()
    assert torch.equal(symmetry_matrices("D2")[0], torch.eye(3, dtype=torch.float64))
    g32 = symmetry_matrices("O", dtype=torch.float32)
    assert g32.dtype == torch.float32 and g32.shape == (24, 3, 3)


def test_cyclic_and_dihedral_axes():
    # Cn: rotations about z; Dn: n-fold about z plus the 180-degree rotation about x.
    c4 = symmetry_matrices("C4")
    assert torch.allclose(c4[1], rotation_about_axis(torch.tensor([0.0, 0, 1], dtype=torch.float64), 90.0))
    d3 = symmetry_matrices("D3")
    rx = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    assert ((d3 - rx).abs().amax(dim=(-1, -2)) < 1e-12).any()
    assert (d3[:, 2, 2].abs() == 1).all(), "every D3 element maps the z axis to ±z"


# --------------------------------------------------------------------------------------------
# Against RELION


def _relion_symmetry_ops(name: str, workdir) -> torch.Tensor:
    """Matrices printed by ``relion_refine --sym NAME --print_symmetry_ops`` (RELION 3.1)."""
    proc = subprocess.run(
        ["relion_refine", "--sym", name, "--print_symmetry_ops"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = proc.stdout + proc.stderr
    header = re.search(r"Using symmetry group (\S+), with the following (\d+) transformation matrices", text)
    assert header, f"unexpected relion_refine output:\n{text}"  # it exits 0 even on errors
    lines = text.splitlines()
    mats = []
    for i, line in enumerate(lines):
        if re.match(r"\s*R\(\d+\)=\s*$", line):
            mats.append([[float(v) for v in lines[i + k].split()] for k in (1, 2, 3)])
    assert len(mats) == int(header.group(2))
    return torch.tensor(mats, dtype=torch.float64)


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="relion_refine (RELION) is not on PATH")
@pytest.mark.parametrize("name", ["C1", "C4", "D1", "D2", "D3", "T", "O", "I", "I1", "I2", "I3", "I4"])
def test_matches_relion_symmetry_ops(name, tmp_path):
    # RELION prints every element of the group (its R matrices, which act on its A = Rᵀ from the
    # right). The group is closed under transposition, so the sets must be equal; RELION prints
    # about 5 significant digits.
    relion = _relion_symmetry_ops(name, tmp_path)
    ours = symmetry_matrices(name)
    assert relion.shape == ours.shape
    ours_in_relion, relion_in_ours = _match_counts(ours, relion, atol=2e-4)
    assert (ours_in_relion == 1).all(), f"{name}: some of our matrices are not among RELION's"
    assert (relion_in_ours == 1).all(), f"{name}: some of RELION's matrices are not among ours"
    transposed, _ = _match_counts(ours.transpose(-1, -2), relion, atol=2e-4)
    assert (transposed == 1).all()


def test_icosahedral_variants_differ():
    # I1..I4 are four different orientations of the same abstract group; I is I2.
    groups = {n: symmetry_matrices(n) for n in ["I1", "I2", "I3", "I4"]}
    for a in groups:
        for b in groups:
            if a < b:
                hits, _ = _match_counts(groups[a], groups[b], atol=1e-6)
                assert (hits == 0).any(), f"{a} and {b} should be different orientations"
    assert torch.allclose(symmetry_matrices("I"), groups["I2"])


# --------------------------------------------------------------------------------------------
# Symmetry-aware error


@pytest.mark.parametrize("name", NON_TRIVIAL + ["C1", "I2"])
def test_left_mates_have_zero_error(name):
    g = symmetry_matrices(name)
    r_true = random_rotations(50, generator=_gen(1))
    mates = symmetry_mates(r_true, name)
    assert mates.shape == (50, len(g), 3, 3)
    assert torch.allclose(mates[:, 0], r_true)
    err = symmetry_aware_angle(r_true[:, None].expand_as(mates), mates, name)
    assert err.shape == (50, len(g))
    assert err.max() < 1e-5


@pytest.mark.parametrize("name", NON_TRIVIAL + ["I2"])
def test_small_perturbation_of_a_mate_gives_the_perturbation_angle(name):
    g = symmetry_matrices(name)
    n = 200
    gen = _gen(2)
    r_true = random_rotations(n, generator=gen)
    pick = torch.randint(0, len(g), (n,), generator=gen)
    theta = torch.rand(n, generator=gen, dtype=torch.float64) * 0.45 * _min_angle_between_elements(g)
    axes = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    r_pred = rotation_about_axis(axes, theta) @ g[pick] @ r_true
    err = symmetry_aware_angle(r_true, r_pred, name)
    assert torch.allclose(err, theta, atol=1e-6)


def test_c1_equals_geodesic_angle():
    r_true = random_rotations(300, generator=_gen(3))
    r_pred = random_rotations(300, generator=_gen(4))
    assert torch.allclose(symmetry_aware_angle(r_true, r_pred, "C1"), geodesic_angle(r_true, r_pred), atol=1e-9)


@pytest.mark.parametrize("name", NON_TRIVIAL)
def test_right_multiplied_mates_are_not_equivalent(name):
    # Pins the side: R @ g is not a symmetry mate of R in this convention.
    g = symmetry_matrices(name)
    n = 200
    gen = _gen(5)
    r_true = random_rotations(n, generator=gen)
    pick = torch.randint(1, len(g), (n,), generator=gen)
    err = symmetry_aware_angle(r_true, r_true @ g[pick], name)
    assert (err > 1.0).float().mean() > 0.9, f"median error {err.median():.3f} deg"


def test_symmetric_error_is_bounded_by_plain_error_and_uses_best_mate():
    name = "O"
    r_true = random_rotations(500, generator=_gen(6))
    r_pred = random_rotations(500, generator=_gen(7))
    err = symmetry_aware_angle(r_true, r_pred, name)
    brute = geodesic_angle(symmetry_mates(r_true, name), r_pred[:, None]).amin(dim=-1)
    assert torch.allclose(err, brute, atol=1e-9)
    assert (err <= geodesic_angle(r_true, r_pred) + 1e-9).all()
    # Random poses: the error is bounded well below 180 for O (max of min is ~62.8 deg).
    assert err.max() < 63.0 and err.mean() < geodesic_angle(r_true, r_pred).mean() / 2


def test_symmetry_aware_angle_chunks_broadcasts_and_keeps_dtype():
    r_true = random_rotations(1000, generator=_gen(8))
    r_pred = random_rotations(1000, generator=_gen(9))
    full = symmetry_aware_angle(r_true, r_pred, "I")
    chunked = symmetry_aware_angle(r_true, r_pred, "I", chunk_size=77)
    assert torch.allclose(full, chunked, rtol=0, atol=1e-10)
    one = symmetry_aware_angle(r_true[0], r_pred, "D2")  # (3,3) against (N,3,3)
    assert one.shape == (1000,)
    assert symmetry_aware_angle(r_true.float(), r_pred.float(), "T").dtype == torch.float32
    assert symmetry_aware_angle(r_true.reshape(10, 100, 3, 3), r_pred.reshape(10, 100, 3, 3), "I").shape == (10, 100)


def test_symmetry_aware_angle_is_differentiable():
    r_true = random_rotations(4, generator=_gen(10))
    axis = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64)
    theta = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    r_pred = rotation_about_axis(axis, theta) @ symmetry_matrices("D2")[2] @ r_true
    err = symmetry_aware_angle(r_true, r_pred, "D2").sum()
    err.backward()
    assert torch.allclose(theta.grad, torch.tensor(4.0, dtype=torch.float64), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Canonical mate


@pytest.mark.parametrize("name", NON_TRIVIAL + ["C1", "I2", "I4"])
def test_canonical_mate_invariant_under_left_multiplication(name):
    g = symmetry_matrices(name)
    r = random_rotations(100, generator=_gen(11))
    canon = canonical_mate(r, name)
    assert canon.shape == r.shape
    # It is a mate of r, and no mate is closer to the identity.
    assert symmetry_aware_angle(r, canon, name).max() < 1e-6
    eye = torch.eye(3, dtype=torch.float64)
    to_identity = geodesic_angle(symmetry_mates(r, name), eye).amin(dim=-1)
    assert torch.allclose(geodesic_angle(canon, eye), to_identity, atol=1e-9)
    for h in g:
        assert torch.allclose(canonical_mate(h @ r, name), canon, atol=1e-10)


def test_canonical_mate_is_not_invariant_under_right_multiplication():
    g = symmetry_matrices("D3")
    r = random_rotations(100, generator=_gen(12))
    moved = (canonical_mate(r @ g[4], "D3") - canonical_mate(r, "D3")).abs().amax(dim=(-1, -2))
    assert (moved > 1e-3).float().mean() > 0.9


def test_canonical_mate_ties_go_to_lowest_group_index():
    # Under C4 (g_k = Rz(90 k)) a pose Rz(a) with a = 45 mod 90 has two mates 45 degrees from the
    # identity, Rz(45) and Rz(-45); the one reached with the lower group index wins. This is the
    # documented exception to invariance.
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    rz = lambda a: rotation_about_axis(z, float(a))  # noqa: E731
    assert torch.allclose(canonical_mate(rz(45), "C4"), rz(45))  # g0 @ R = Rz(45), g3 @ R = Rz(-45)
    assert torch.allclose(canonical_mate(rz(135), "C4"), rz(-45))  # g2 @ R = Rz(-45), g3 @ R = Rz(45)
    assert torch.allclose(canonical_mate(rz(-45), "C4"), rz(-45))  # g0 @ R = Rz(-45), g1 @ R = Rz(45)
    # Away from ties the answer is unique: Rz(100) -> Rz(10).
    assert torch.allclose(canonical_mate(rz(100), "C4"), rz(10))
