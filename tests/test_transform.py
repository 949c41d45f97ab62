"""Spatial transform: scaling and squaring, warping against an independent resampler."""
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from unireg.metrics import jacobian_determinant, jacobian_stats
from unireg.modeling.transform import SpatialTransformer, VelocityIntegrator, resize_field


def smooth_random_field(shape, amplitude, seed=0, sigma=4.0):
    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(3)])
    field *= amplitude / np.abs(field).max()
    return torch.from_numpy(field.astype(np.float32))[None]


def test_scaling_and_squaring_of_smooth_velocity_does_not_fold():
    velocity = smooth_random_field((32, 32, 32), amplitude=12.0, seed=1)
    # Used directly as a displacement this field folds ...
    assert jacobian_stats(velocity)["nonpositive_jacobian_pct"] > 1.0
    # ... its exponential does not.
    displacement = VelocityIntegrator(steps=7)(velocity)
    assert jacobian_stats(displacement)["nonpositive_jacobian_pct"] == 0.0
    assert displacement.abs().max() > 2.0  # and it is not a trivial field


def test_warp_matches_scipy_map_coordinates():
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.normal(size=(20, 24, 28)), 2).astype(np.float32)
    disp = smooth_random_field(image.shape, amplitude=3.0, seed=2)
    warped = SpatialTransformer()(torch.from_numpy(image)[None, None], disp)[0, 0].numpy()
    coords = np.indices(image.shape, dtype=np.float32) + disp[0].numpy()
    expected = ndimage.map_coordinates(image, coords, order=1, mode="nearest")
    assert np.abs(warped - expected).max() < 1e-4


def test_nearest_warp_keeps_label_values():
    labels = np.zeros((16, 16, 16), np.float32)
    labels[4:10, 4:10, 4:10] = 5
    labels[10:14, 2:6, 8:12] = 7
    disp = smooth_random_field(labels.shape, amplitude=2.0, seed=3)
    warped = SpatialTransformer()(torch.from_numpy(labels)[None, None], disp, nearest=True)
    assert set(torch.unique(warped).tolist()) <= {0.0, 5.0, 7.0}


def test_resize_field_keeps_physical_displacement():
    coarse = torch.full((1, 3, 8, 8, 8), 1.5)  # 1.5 coarse voxels everywhere
    fine = resize_field(coarse, (16, 16, 16))
    assert torch.allclose(fine, torch.full_like(fine, 3.0))


def test_jacobian_of_known_scaling():
    d = torch.zeros(1, 3, 10, 10, 10)
    grid = torch.arange(10, dtype=torch.float32)
    d[0, 0] = 0.1 * grid.view(10, 1, 1)  # stretch along axis 0 by 1.1
    det = jacobian_determinant(d)
    assert torch.allclose(det[:, 1:-1, 1:-1, 1:-1], torch.full_like(det[:, 1:-1, 1:-1, 1:-1], 1.1), atol=1e-5)
