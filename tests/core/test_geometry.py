import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryopose.geometry import (
    euler_to_matrix,
    geodesic_angle,
    is_rotation_matrix,
    matrix_to_euler,
    matrix_to_quaternion,
    quaternion_to_matrix,
    random_rotations,
    rotation_about_axis,
)


@pytest.fixture
def angles():
    rng = np.random.default_rng(0)
    return torch.tensor(rng.uniform([-180, 0, -180], [180, 180, 180], (500, 3)))


def test_euler_matches_scipy_intrinsic_zyz(angles):
    ours = euler_to_matrix(angles).numpy()
    ref = Rotation.from_euler("ZYZ", angles.numpy(), degrees=True).as_matrix()
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_euler_composition_order():
    # R = Rz(rot) Ry(tilt) Rz(psi): a pure tilt of 90° sends the image z axis (the beam) to volume +x.
    r = euler_to_matrix(torch.tensor([0.0, 90.0, 0.0], dtype=torch.float64))
    np.testing.assert_allclose(r @ torch.tensor([0, 0, 1.0], dtype=torch.float64), [1, 0, 0], atol=1e-12)
    # rot then rotates the beam direction about volume z.
    r = euler_to_matrix(torch.tensor([90.0, 90.0, 30.0], dtype=torch.float64))
    np.testing.assert_allclose(r @ torch.tensor([0, 0, 1.0], dtype=torch.float64), [0, 1, 0], atol=1e-12)


def test_matrix_euler_round_trip(angles):
    back = matrix_to_euler(euler_to_matrix(angles))
    assert back[:, 1].min() >= 0 and back[:, 1].max() <= 180
    assert geodesic_angle(euler_to_matrix(back), euler_to_matrix(angles)).max() < 1e-9


@pytest.mark.parametrize("tilt", [0.0, 180.0, 1e-9, 180 - 1e-9])
def test_matrix_euler_gimbal_lock(tilt):
    a = torch.tensor([[37.0, tilt, -12.0], [-150.0, tilt, 170.0]], dtype=torch.float64)
    back = matrix_to_euler(euler_to_matrix(a))
    assert torch.isfinite(back).all()
    assert geodesic_angle(euler_to_matrix(back), euler_to_matrix(a)).max() < 1e-5


def test_matrix_to_euler_float32():
    a = torch.tensor([[10.0, 45.0, 20.0], [5.0, 0.0, 0.0]], dtype=torch.float32)
    back = matrix_to_euler(euler_to_matrix(a))
    assert geodesic_angle(euler_to_matrix(back.double()), euler_to_matrix(a.double())).max() < 0.05


def test_quaternion_round_trip_and_scipy(angles):
    r = euler_to_matrix(angles)
    q = matrix_to_quaternion(r)
    assert (q[:, 0] >= 0).all()
    np.testing.assert_allclose(q.norm(dim=-1).numpy(), 1, atol=1e-12)
    np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), r.numpy(), atol=1e-12)
    ref = Rotation.from_matrix(r.numpy()).as_quat(scalar_first=True)
    ref *= np.sign(ref[:, :1])
    np.testing.assert_allclose(q.numpy(), ref, atol=1e-10)


def test_quaternion_near_180_degrees():
    r = rotation_about_axis(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), torch.tensor([180.0]))
    np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(r)).numpy(), r.numpy(), atol=1e-10)


@pytest.mark.parametrize("theta", [1e-4, 0.5, 5.0, 90.0, 179.0, 179.9999])
def test_geodesic_angle_recovers_rotation_angle(theta):
    base = random_rotations(50, generator=torch.Generator().manual_seed(1))
    axes = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    delta = rotation_about_axis(axes, torch.full((50,), theta, dtype=torch.float64))
    # Left or right perturbation: the geodesic distance is bi-invariant.
    np.testing.assert_allclose(geodesic_angle(base, delta @ base).numpy(), theta, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(geodesic_angle(base, base @ delta).numpy(), theta, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(geodesic_angle(delta @ base, base).numpy(), theta, rtol=1e-6, atol=1e-7)


def test_geodesic_angle_broadcasts():
    a = random_rotations(4, generator=torch.Generator().manual_seed(3))
    out = geodesic_angle(a[:, None], a[None, :])
    assert out.shape == (4, 4)
    assert torch.allclose(out, out.T) and out.diagonal().abs().max() < 1e-6


def test_random_rotations_are_haar_uniform():
    r = random_rotations(40000, generator=torch.Generator().manual_seed(4))
    assert is_rotation_matrix(r).all()
    angle = geodesic_angle(torch.eye(3, dtype=torch.float64), r)
    # Haar measure: angle density (1 - cos θ)/π, mean π/2 + 2/π rad = 126.48°.
    assert abs(float(angle.mean()) - math.degrees(math.pi / 2 + 2 / math.pi)) < 0.6
    # Every column is uniform on the sphere: mean direction near zero.
    assert r[:, :, 2].mean(0).abs().max() < 0.02


def test_is_rotation_matrix_rejects_reflections_and_nan():
    r = random_rotations(3, generator=torch.Generator().manual_seed(5))
    bad = r.clone()
    bad[0, :, 0] *= -1  # a reflection: orthogonal but det -1
    bad[1, 0, 0] = float("nan")
    bad[2] *= 1.1
    assert is_rotation_matrix(r).all()
    assert not is_rotation_matrix(bad).any()


def test_euler_to_matrix_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        euler_to_matrix(torch.zeros(4, 2))
