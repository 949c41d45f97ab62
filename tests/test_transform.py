"""Spatial transform: scaling and squaring, warping against an independent resampler."""
import numpy as np
import torch
from scipy import ndimage

from unireg.metrics import jacobian_determinant, jacobian_stats
from unireg.modeling.transform import GridCachedWarp, SpatialTransformer, VelocityIntegrator, resize_field


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
    warped = SpatialTransformer()(torch.from_numpy(labels)[None, None], disp, nearest=True)[0, 0].numpy()
    coords = np.indices(labels.shape, dtype=np.float32) + disp[0].numpy()
    expected = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    assert set(np.unique(warped)) == {0.0, 5.0, 7.0}
    assert (warped != labels).sum() > 20                  # the labels did move ...
    assert np.array_equal(warped, expected)               # ... exactly where the independent resampler puts them


def test_resize_field_keeps_physical_displacement():
    """A field linear in position (non-uniform, all components) resized anisotropically stays
    the same physical field: values rescale per axis, positions follow voxel centres."""
    old, new = (8, 6, 10), (16, 9, 5)
    a = np.array([[0.3, -0.2, 0.1], [0.05, 0.4, -0.3], [-0.1, 0.2, 0.25]])    # d(physical)/d(position)
    b = np.array([1.0, -2.0, 0.5])

    def voxel_field(shape):
        """u(p) = a p + b in extent units (each axis spans [0, 1]) -> voxels of ``shape``."""
        centres = [(np.arange(n) + 0.5) / n for n in shape]                   # align_corners=False centres
        p = np.stack(np.meshgrid(*centres, indexing="ij"))
        u = np.einsum("cd,d...->c...", a, p) + b[:, None, None, None]
        return torch.from_numpy((u * np.array(shape)[:, None, None, None]).astype(np.float32))[None]

    fine = resize_field(voxel_field(old), new)
    expected = voxel_field(new)
    assert fine.shape == (1, 3, *new)
    # Trilinear interpolation is exact for a linear field between the coarse voxel centres.
    inside = tuple(slice(int(np.ceil((0.5 * m / o - 0.5))), n - int(np.ceil((0.5 * m / o - 0.5))))
                   for o, m, n in zip(old, new, new))
    assert torch.allclose(fine[(slice(None), slice(None), *inside)], expected[(slice(None), slice(None), *inside)],
                          atol=1e-4)
    assert not torch.allclose(fine[:, 0], fine[:, 0].mean())                 # a non-uniform field


def test_jacobian_of_known_scaling():
    d = torch.zeros(1, 3, 10, 10, 10)
    grid = torch.arange(10, dtype=torch.float32)
    d[0, 0] = 0.1 * grid.view(10, 1, 1)  # stretch along axis 0 by 1.1
    det = jacobian_determinant(d)
    assert torch.allclose(det[:, 1:-1, 1:-1, 1:-1], torch.full_like(det[:, 1:-1, 1:-1, 1:-1], 1.1), atol=1e-5)


def test_cached_grids_warp_exactly_as_monai_at_every_shape():
    """The warp keeps grids for a few shapes (levels, full grid) and gives MONAI's result bit for bit."""
    from monai.networks.blocks import Warp
    ours, monai = GridCachedWarp("bilinear", "border"), Warp("bilinear", "border")
    torch.manual_seed(0)
    for shape in ((12, 14, 16), (6, 7, 8), (12, 14, 16), (3, 4, 5), (5, 5, 5), (2, 2, 2), (6, 7, 8)):
        image, field = torch.rand(2, 3, *shape), torch.randn(2, 3, *shape) * 2
        assert torch.equal(ours(image, field), monai(image, field)), shape
    assert len(ours._grids) == GridCachedWarp.MAX_SHAPES
