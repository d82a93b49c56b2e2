"""HEALPix SO(3) grids and nearest-cell labels, with symmetry on the correct side."""

import pytest
import torch

from cryopose.geometry import geodesic_angle, is_rotation_matrix, random_rotations
from cryopose.grids import nearest_grid_index, so3_grid_size, so3_healpix_grid, symmetric_grid_target
from cryopose.metrics import angular_errors
from cryopose.symmetry import symmetry_matrices


@pytest.mark.parametrize("order", [0, 1, 2])
def test_grid_size_and_rotations(order):
    grid = so3_healpix_grid(order)
    assert grid.shape == (so3_grid_size(order), 3, 3) == (72 * 8**order, 3, 3)
    assert is_rotation_matrix(grid).all()
    # No two cells coincide: the closest pair is a sizeable fraction of the cell size.
    g = grid.double()
    sample = g[:: max(1, len(g) // 200)]
    d = geodesic_angle(sample[:, None], g[None])
    d[d < 1e-6] = 180.0
    assert d.min() > 0.2 * 60 / 2**order


def test_nearest_cell_is_the_brute_force_nearest_and_errors_shrink_with_order():
    gen = torch.Generator().manual_seed(0)
    r = random_rotations(500, generator=gen).double()
    medians = []
    for order in (1, 2, 3):
        grid = so3_healpix_grid(order, dtype=torch.float64)
        idx = nearest_grid_index(r, grid)
        err = geodesic_angle(r, grid[idx])
        if order < 3:
            brute = geodesic_angle(r[:, None], grid[None]).min(dim=1).values
            torch.testing.assert_close(err, brute, atol=1e-6, rtol=0)
        medians.append(float(err.median()))
    # The medians of these 500 rotations are 14.5° at order 1, 7.3° at order 2, 3.6° at order 3 (the
    # grid's nearest-cell error, measured once); each order halves the error.
    assert medians[1] == pytest.approx(6.9, abs=1.0) and medians[2] == pytest.approx(3.6, abs=0.6)
    assert medians[0] > 1.7 * medians[1] > 1.7 * 1.7 * medians[2] * 0.9


@pytest.mark.parametrize("group", ["C1", "C4", "D2"])
def test_symmetric_target_spreads_over_the_mates(group):
    gen = torch.Generator().manual_seed(1)
    r = random_rotations(64, generator=gen).double()
    grid = so3_healpix_grid(2, dtype=torch.float64)
    target = symmetric_grid_target(r, grid, group)
    order = symmetry_matrices(group).shape[0]
    torch.testing.assert_close(target.sum(1), torch.ones(64))
    assert ((target > 0).sum(1) == order).all()  # one cell per mate at this grid resolution
    # Every cell with mass is a grid pose of the truth up to the symmetry: small symmetry-aware
    # error. This pins the side: with right-multiplied mates R·g most cells would be far off.
    rows, cols = torch.nonzero(target, as_tuple=True)
    err = angular_errors(r[rows], grid[cols], group)
    assert err.max() < 12.0
    if group != "C1":
        plain = angular_errors(r[rows], grid[cols], "C1")
        assert (plain > 45).float().mean() > 0.5  # the mates really are different poses


def test_wrong_side_would_be_caught():
    """The property above fails for right-multiplied mates, so the test can tell the sides apart."""
    gen = torch.Generator().manual_seed(2)
    r = random_rotations(64, generator=gen).double()
    grid = so3_healpix_grid(2, dtype=torch.float64)
    ops = symmetry_matrices("D2")
    wrong = (r[:, None] @ ops[None]).reshape(-1, 3, 3)  # R·g
    idx = nearest_grid_index(wrong, grid).reshape(64, 4)
    err = angular_errors(r[:, None].expand(64, 4, 3, 3).reshape(-1, 3, 3), grid[idx.reshape(-1)], "D2")
    assert err.max() > 30
