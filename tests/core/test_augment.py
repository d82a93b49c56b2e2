"""Augmentation keeps labels true: an augmented projection matches the projection at the updated
pose and shift far better than at the old ones."""

import numpy as np
import pytest
import torch

from cryopose.augment import AugmentConfig, affine_about_centre, augment_batch, inplane_rotation, rotate90_about_centre
from cryopose.geometry import geodesic_angle, random_rotations
from cryopose.metrics import pearson_correlation
from cryopose.simulate import pseudo_molecule, simulate_images

S, PX, B = 48, 3.0, 12
OFF = dict(
    shift_prob=0.0,
    rotation_prob=0.0,
    rot90_prob=0.0,
    uniform_noise_prob=0.0,
    gaussian_noise_prob=0.0,
    zoom_prob=0.0,
    erase_prob=0.0,
    blur_prob=0.0,
)


@pytest.fixture(scope="module")
def volume():
    return torch.from_numpy(pseudo_molecule(S, PX, "C1", seed=7))


def _detail_pcc(a, b) -> float:
    """Correlation of the images' detail: the shared low-resolution envelope of a compact molecule
    would make any two views look alike."""
    from scipy.ndimage import gaussian_filter

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return pearson_correlation(a - gaussian_filter(a, 3), b - gaussian_filter(b, 3))


def _project(volume, rotmats, origins_a):
    n = len(rotmats)
    ones = torch.ones(n, S, S // 2 + 1, dtype=torch.float64)
    return simulate_images(volume, rotmats, -origins_a.double() / PX, ones, torch.ones(n))


@pytest.fixture(scope="module")
def particles(volume):
    g = torch.Generator().manual_seed(3)
    rot = random_rotations(B, generator=g).float()
    origins = (torch.rand(B, 2, generator=g) * 2 - 1) * 4 * PX  # up to 4 px either way
    return _project(volume, rot, origins), rot, origins


def _check_labels_follow_images(volume, particles, config, min_match, seed=0):
    images, rot, origins = particles
    aug, rot2, origins2 = augment_batch(images, rot, origins, PX, config, torch.Generator().manual_seed(seed))
    expected_new = _project(volume, rot2, origins2)
    new = np.array([_detail_pcc(a, b) for a, b in zip(aug, expected_new)])
    old = np.array([_detail_pcc(a, b) for a, b in zip(aug, images)])
    changed = (geodesic_angle(rot.double(), rot2.double()) > 10) | ((origins - origins2).norm(dim=-1) > 2 * PX)
    assert changed.sum() >= B // 3, "the augmentation must actually move most particles"
    assert new.min() > min_match, new
    assert (new[changed.numpy()] > old[changed.numpy()] + 0.2).all(), (new, old)
    return rot2, origins2


def test_rotations_both_signs_update_the_pose(volume, particles):
    config = AugmentConfig(**{**OFF, "rotation_prob": 1.0, "rotation_deg": 40.0})
    rot2, origins2 = _check_labels_follow_images(volume, particles, config, 0.9)
    rel = particles[1].double().transpose(-1, -2) @ rot2.double()  # Rz(−φ)
    phi = torch.rad2deg(torch.atan2(-rel[:, 1, 0], rel[:, 0, 0]))
    assert (phi > 5).any() and (phi < -5).any()


def test_exact_90_degree_turns_update_the_pose(volume, particles):
    config = AugmentConfig(**{**OFF, "rot90_prob": 1.0})
    _check_labels_follow_images(volume, particles, config, 0.97)


def test_shifts_both_signs_update_the_origin(volume, particles):
    config = AugmentConfig(**{**OFF, "shift_prob": 1.0, "shift_fraction": 0.1})
    _, origins2 = _check_labels_follow_images(volume, particles, config, 0.9)
    moved = origins2 - particles[2]
    assert (moved > PX).any() and (moved < -PX).any()


def test_paper_config_all_together_keeps_labels_true(volume, particles):
    config = AugmentConfig(
        rotation_prob=1.0,
        shift_prob=1.0,
        rot90_prob=1.0,
        uniform_noise_prob=0.0,
        gaussian_noise_prob=0.0,
        zoom_prob=0.0,
        erase_prob=0.0,
    )
    _check_labels_follow_images(volume, particles, config, 0.85, seed=5)


def test_wrong_label_update_would_be_caught(volume, particles):
    """The opposite in-plane sign (R·Rz(+φ)) is what a transposed convention gives: it must not match."""
    images, rot, origins = particles
    config = AugmentConfig(**{**OFF, "rotation_prob": 1.0, "rotation_deg": 40.0})
    aug, rot2, origins2 = augment_batch(images, rot, origins, PX, config, torch.Generator().manual_seed(0))
    wrong = rot.double() @ (rot.double().transpose(-1, -2) @ rot2.double()).transpose(-1, -2)
    big = geodesic_angle(rot.double(), rot2.double()) > 10
    wrong_match = [_detail_pcc(a, b) for a, b in zip(aug[big], _project(volume, wrong[big].float(), origins2[big]))]
    assert max(wrong_match) < 0.7, wrong_match


def test_zoom_scales_the_displacement():
    img = torch.zeros(1, S, S)
    c = S // 2
    img[0, c, c + 8] = 1.0  # a point 8 px right of the centre: displacement (8, 0)
    config = AugmentConfig(**{**OFF, "zoom_prob": 1.0, "zoom_fraction": 0.5})
    out, rot2, origins2 = augment_batch(
        img, torch.eye(3)[None], torch.tensor([[-8.0 * PX, 0.0]]), PX, config, torch.Generator().manual_seed(1)
    )
    new_disp = -origins2[0] / PX
    ys, xs = torch.nonzero(out[0] > 1e-3, as_tuple=True)
    w = out[0][ys, xs]
    centroid = torch.stack([(xs.float() * w).sum() / w.sum() - c, (ys.float() * w).sum() / w.sum() - c])
    assert float(new_disp[0]) > 8.5  # zoomed in
    assert torch.allclose(centroid, new_disp.float(), atol=0.3)
    assert torch.allclose(rot2, torch.eye(3)[None])


def test_intensity_transforms_leave_labels_alone(particles):
    images, rot, origins = particles
    config = AugmentConfig(
        **{**OFF, "uniform_noise_prob": 1.0, "gaussian_noise_prob": 1.0, "erase_prob": 1.0, "blur_prob": 1.0}
    )
    aug, rot2, origins2 = augment_batch(images, rot, origins, PX, config, torch.Generator().manual_seed(0))
    assert torch.equal(rot2, rot) and torch.allclose(origins2, origins)
    assert not torch.allclose(aug, images)
    assert aug.shape == images.shape and aug.dtype == images.dtype


def test_augmentation_is_reproducible_with_a_generator(particles):
    images, rot, origins = particles
    a = augment_batch(images, rot, origins, PX, AugmentConfig(), torch.Generator().manual_seed(9))
    b = augment_batch(images, rot, origins, PX, AugmentConfig(), torch.Generator().manual_seed(9))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_rotate90_is_exact_and_agrees_with_interpolation():
    img = torch.randn(2, 16, 16)
    for k in range(4):
        exact = rotate90_about_centre(img, k)
        interp = affine_about_centre(img, torch.full((2,), 90.0 * k), torch.zeros(2, 2), torch.ones(2))
        assert torch.allclose(exact, interp, atol=1e-5)
    assert torch.equal(rotate90_about_centre(rotate90_about_centre(img, 1), 3)[:, 1:, 1:], img[:, 1:, 1:])
    # Counter-clockwise in (x = column, y = row): the point (x=3, y=0) goes to (x=0, y=3).
    p = torch.zeros(1, 16, 16)
    p[0, 8, 11] = 1
    assert rotate90_about_centre(p, 1)[0, 11, 8] == 1


def test_inplane_rotation_is_rz():
    r = inplane_rotation(torch.tensor([90.0]))
    assert torch.allclose(
        r[0] @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
        torch.tensor([0, 1.0, 0], dtype=torch.float64),
        atol=1e-12,
    )


def test_config_validation():
    with pytest.raises(ValueError, match="shift_prob"):
        AugmentConfig(shift_prob=1.5)
    with pytest.raises(ValueError, match="rotation_deg"):
        AugmentConfig(rotation_deg=-1)
