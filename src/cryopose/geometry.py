"""Rotations in RELION's conventions, batched over leading dimensions.

Convention used throughout cryopose
-----------------------------------
A pose is the rotation matrix ``R = Rz(rot) @ Ry(tilt) @ Rz(psi)`` built from RELION's Euler
angles (rlnAngleRot, rlnAngleTilt, rlnAnglePsi), in degrees. This is scipy's
``Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix()``.

* ``R`` is the **transpose** of RELION's ``Euler_angles2matrix(rot, tilt, psi)`` (RELION's A).
* ``R`` left-multiplies column vectors ``(x, y, z)`` of image coordinates (x = columns, y = rows,
  z = the beam) and returns volume coordinates: RELION projects ``P(x, y) = ∫ V(R·(x, y, z)) dz``.
* For a map invariant under the point group G (``V(g·r) = V(r)``), the poses that give the same
  image as ``R`` are ``g @ R`` (left multiplication).

Shapes: every function accepts any number of leading batch dimensions ``(...)``. Angles are in
degrees unless the name says radians. Quaternions are ``(w, x, y, z)`` with ``w >= 0``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "quaternion_to_matrix",
    "geodesic_angle",
    "random_rotations",
    "rotation_about_axis",
    "axis_turns",
    "is_rotation_matrix",
]


def _rz(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(*angle.shape, 3, 3)


def _ry(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, z, s, z, o, z, -s, z, c], dim=-1).reshape(*angle.shape, 3, 3)


def euler_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """RELION Euler angles to pose matrices.

    Args:
        angles: ``(..., 3)`` (rot, tilt, psi) in degrees, as in rlnAngleRot/Tilt/Psi.

    Returns:
        ``(..., 3, 3)`` ``R = Rz(rot) Ry(tilt) Rz(psi)``, the transpose of RELION's A
        (see the module docstring for what R multiplies).
    """
    angles = torch.as_tensor(angles)
    if not angles.is_floating_point():
        angles = angles.double()
    if angles.shape[-1] != 3:
        raise ValueError(f"euler_to_matrix expects (..., 3) angles, got shape {tuple(angles.shape)}")
    rad = torch.deg2rad(angles)
    return _rz(rad[..., 0]) @ _ry(rad[..., 1]) @ _rz(rad[..., 2])


def matrix_to_euler(matrices: torch.Tensor) -> torch.Tensor:
    """Pose matrices to RELION Euler angles (inverse of :func:`euler_to_matrix`).

    Args:
        matrices: ``(..., 3, 3)`` rotation matrices ``R`` (not RELION's A).

    Returns:
        ``(..., 3)`` (rot, tilt, psi) in degrees with rot, psi in (-180, 180] and tilt in
        [0, 180]. At gimbal lock (tilt 0 or 180) psi is set to 0 and rot carries the rotation.
    """
    m = torch.as_tensor(matrices)
    if m.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_euler expects (..., 3, 3) matrices, got {tuple(m.shape)}")
    r22 = m[..., 2, 2].clamp(-1.0, 1.0)
    # sin(tilt) from the two other entries of the last row/column is better conditioned than acos
    sin_tilt = torch.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    tilt = torch.atan2(sin_tilt, r22)
    eps = 1e-6 if m.dtype == torch.float64 else 1e-4
    regular = sin_tilt > eps
    rot = torch.where(
        regular,
        torch.atan2(m[..., 1, 2], m[..., 0, 2]),
        torch.where(r22 > 0, torch.atan2(m[..., 1, 0], m[..., 0, 0]), torch.atan2(-m[..., 1, 0], -m[..., 0, 0])),
    )
    psi = torch.where(regular, torch.atan2(m[..., 2, 1], -m[..., 2, 0]), torch.zeros_like(rot))
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))


def matrix_to_quaternion(matrices: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to unit quaternions ``(w, x, y, z)`` with ``w >= 0``.

    Args:
        matrices: ``(..., 3, 3)``.

    Returns:
        ``(..., 4)``; the quaternion q satisfies ``quaternion_to_matrix(q) == matrices``.
    """
    m = torch.as_tensor(matrices)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # Four candidate formulas; take the one with the largest denominator for stability.
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1)
    denom = 2.0 * torch.sqrt(sq.clamp(min=1e-12))
    candidates = torch.stack(
        [
            torch.stack(
                [
                    denom[..., 0] / 4,
                    (m[..., 2, 1] - m[..., 1, 2]) / denom[..., 0],
                    (m[..., 0, 2] - m[..., 2, 0]) / denom[..., 0],
                    (m[..., 1, 0] - m[..., 0, 1]) / denom[..., 0],
                ],
                -1,
            ),
            torch.stack(
                [
                    (m[..., 2, 1] - m[..., 1, 2]) / denom[..., 1],
                    denom[..., 1] / 4,
                    (m[..., 0, 1] + m[..., 1, 0]) / denom[..., 1],
                    (m[..., 0, 2] + m[..., 2, 0]) / denom[..., 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    (m[..., 0, 2] - m[..., 2, 0]) / denom[..., 2],
                    (m[..., 0, 1] + m[..., 1, 0]) / denom[..., 2],
                    denom[..., 2] / 4,
                    (m[..., 1, 2] + m[..., 2, 1]) / denom[..., 2],
                ],
                -1,
            ),
            torch.stack(
                [
                    (m[..., 1, 0] - m[..., 0, 1]) / denom[..., 3],
                    (m[..., 0, 2] + m[..., 2, 0]) / denom[..., 3],
                    (m[..., 1, 2] + m[..., 2, 1]) / denom[..., 3],
                    denom[..., 3] / 4,
                ],
                -1,
            ),
        ],
        dim=-2,
    )
    best = sq.argmax(dim=-1)
    q = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_matrix(quaternions: torch.Tensor) -> torch.Tensor:
    """Quaternions ``(w, x, y, z)`` (normalised here) to rotation matrices ``(..., 3, 3)``."""
    q = torch.as_tensor(quaternions)
    if q.shape[-1] != 4:
        raise ValueError(f"quaternion_to_matrix expects (..., 4), got {tuple(q.shape)}")
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - z * w),
            2 * (x * z + y * w),
            2 * (x * y + z * w),
            1 - 2 * (x * x + z * z),
            2 * (y * z - x * w),
            2 * (x * z - y * w),
            2 * (y * z + x * w),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


def geodesic_angle(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Angle in degrees of the rotation taking ``r1`` to ``r2`` (the geodesic distance on SO(3)).

    Args:
        r1, r2: ``(..., 3, 3)``, broadcast against each other.

    Returns:
        ``(...)`` angles in [0, 180]. Computed with atan2 of the skew and symmetric parts of
        ``r1ᵀ r2`` so it stays accurate near 0° and 180°, where acos loses precision.
    """
    rel = r1.transpose(-1, -2) @ r2
    trace = rel[..., 0, 0] + rel[..., 1, 1] + rel[..., 2, 2]
    skew = torch.stack(
        [rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]], dim=-1
    )
    return torch.rad2deg(torch.atan2(skew.norm(dim=-1) / 2, (trace - 1) / 2))


def random_rotations(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``(n, 3, 3)`` rotations uniform on SO(3) (Haar measure), from normalised Gaussian quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    return quaternion_to_matrix(q)


def rotation_about_axis(axis: torch.Tensor, angle_deg: torch.Tensor | float) -> torch.Tensor:
    """Right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues).

    Args:
        axis: ``(..., 3)``, normalised here.
        angle_deg: ``(...)`` or a float.

    Returns:
        ``(..., 3, 3)``.
    """
    axis = torch.as_tensor(axis, dtype=torch.float64) if not torch.is_tensor(axis) else axis
    angle = torch.deg2rad(torch.as_tensor(angle_deg, dtype=axis.dtype))
    u = axis / axis.norm(dim=-1, keepdim=True)
    half = angle / 2
    u, half = torch.broadcast_tensors(u, half[..., None])
    q = torch.cat([torch.cos(half[..., :1]), torch.sin(half) * u], -1)
    return quaternion_to_matrix(q)


def is_rotation_matrix(matrices: torch.Tensor, atol: float = 1e-4) -> torch.Tensor:
    """``(...)`` booleans: orthonormal with determinant +1 within ``atol``."""
    m = torch.as_tensor(matrices)
    eye = torch.eye(3, dtype=m.dtype, device=m.device)
    orth = (m @ m.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2)) < atol
    det = (torch.linalg.det(m) - 1).abs() < atol
    return orth & det & torch.isfinite(m).all(dim=-1).all(dim=-1)


def axis_turns(step_deg: float) -> torch.Tensor:
    """``(7, 3, 3)`` float64: the identity and turns of ±``step_deg`` about x, y and z (the moves of a
    local search on SO(3): ``R·δ`` for each δ)."""
    a = math.radians(step_deg)
    out = [torch.eye(3, dtype=torch.float64)]
    for axis in range(3):
        for sign in (1.0, -1.0):
            k = torch.zeros(3, 3, dtype=torch.float64)
            i, j = [(1, 2), (2, 0), (0, 1)][axis]
            k[i, j], k[j, i] = -sign * a, sign * a
            out.append(torch.linalg.matrix_exp(k))
    return torch.stack(out)
