"""The thread-split ``grid_sample`` gives ``F.grid_sample``'s values and gradients, and the warp
built on it gives MONAI's."""
import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from unireg import sampling
from unireg.modeling.transform import GridCachedWarp


@pytest.fixture
def three_threads():
    """An odd thread count, so the points do not split evenly (the padding path)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode,padding", [("bilinear", "border"), ("bilinear", "zeros"), ("nearest", "zeros")])
@pytest.mark.parametrize("volume_grad", [False, True])
def test_split_grid_sample_matches_torch(three_threads, mode, padding, volume_grad):
    torch.manual_seed(0)
    volume = torch.randn(1, 4, 9, 10, 11, requires_grad=volume_grad)
    grid = (torch.rand(1, 41, 31, 17, 3) * 2.4 - 1.2).requires_grad_(True)   # 21,607 points, some outside
    assert 41 * 31 * 17 >= sampling.MIN_SPLIT_POINTS and (41 * 31 * 17) % 3
    kw = dict(mode=mode, padding_mode=padding, align_corners=True)
    calls = []
    original = F.grid_sample

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])
        return original(*args, **kwargs)

    expected = original(volume, grid, **kw)
    sampling.F.grid_sample = counting
    try:
        got = sampling.grid_sample(volume, grid, **kw)
    finally:
        sampling.F.grid_sample = original
    assert calls == [3]                 # one call, one batch entry per thread
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    weights = torch.randn_like(expected)
    inputs = [volume, grid] if volume_grad else [grid]
    want = torch.autograd.grad((expected * weights).sum(), inputs)
    have = torch.autograd.grad((got * weights).sum(), inputs)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_volume_needing_its_gradient_is_split_unless_far_larger_than_the_points(three_threads):
    """Scaling and squaring samples a field at as many points as it has voxels, with the field's
    gradient: split. A volume with more than MAX_VOXELS_PER_POINT voxels per point is sampled whole."""
    calls, original = [], F.grid_sample

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])
        return original(*args, **kwargs)

    field = torch.randn(1, 3, 20, 20, 20, requires_grad=True)
    grid = torch.rand(1, 20, 20, 20, 3) * 2 - 1
    big = torch.randn(1, 1, 40, 40, 40 * (sampling.MAX_VOXELS_PER_POINT // 8) + 8, requires_grad=True)
    few = torch.rand(1, 8, 8, 80, 3) * 2 - 1
    assert 8 * 8 * 80 >= sampling.MIN_SPLIT_POINTS and big[0, 0].numel() > sampling.MAX_VOXELS_PER_POINT * 8 * 8 * 80
    sampling.F.grid_sample = counting
    try:
        sampling.grid_sample(field, grid, align_corners=True)
        sampling.grid_sample(big, few, align_corners=True)
    finally:
        sampling.F.grid_sample = original
    assert calls == [3, 1]


def test_small_grids_and_batches_go_straight_to_torch(three_threads):
    volume = torch.randn(2, 1, 8, 8, 8)
    grid = torch.rand(2, 32, 32, 32, 3) * 2 - 1
    torch.testing.assert_close(sampling.grid_sample(volume, grid, align_corners=True),
                               F.grid_sample(volume, grid, align_corners=True))
    small = torch.rand(1, 8, 8, 8, 3) * 2 - 1
    torch.testing.assert_close(sampling.grid_sample(volume[:1], small, align_corners=True),
                               F.grid_sample(volume[:1], small, align_corners=True))


@pytest.mark.parametrize("mode,padding", [("bilinear", "border"), ("nearest", "zeros")])
def test_cached_warp_matches_monai_warp(three_threads, mode, padding):
    torch.manual_seed(1)
    image = torch.randn(1, 2, 30, 28, 26)
    ddf = (torch.randn(1, 3, 30, 28, 26) * 3).requires_grad_(True)
    ours = GridCachedWarp(mode=mode, padding_mode=padding)(image, ddf)
    theirs = Warp(mode=mode, padding_mode=padding)(image, ddf)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if mode == "bilinear":
        g_ours, = torch.autograd.grad(ours.sum(), ddf)
        g_theirs, = torch.autograd.grad(theirs.sum(), ddf)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="DDF shape"):
        GridCachedWarp(mode=mode, padding_mode=padding)(image, ddf[:, :, :-1])


@pytest.mark.parametrize("shape", [(9, 10, 11), (2, 3, 2)])
def test_trilinear_at_points_matches_grid_sample_with_border_padding(shape):
    """The gathered-corner sampler gives grid_sample's values and point gradients (align_corners=True,
    border padding), inside, on and beyond the volume's edges; the volume gets no gradient."""
    torch.manual_seed(0)
    volume = torch.randn(1, 5, *shape).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    last = torch.tensor(shape, dtype=torch.float32) - 1
    points = torch.rand(3000, 3) * (last + 3) - 1.5              # some beyond every face
    # on the faces (interior whole numbers are left out: grid_sample's round trip through [-1, 1] can
    # land them a hair to either side, and the one-sided slope differs there)
    points[:4] = torch.tensor([[0.0, 0.0, 0.0], [*last.tolist()], [0.0, 0.5, last[2]], [last[0], 0.25, 0.0]])
    ours, theirs = points.clone().requires_grad_(True), points.clone().requires_grad_(True)
    got = sampling.trilinear_at_points(volume, ours)
    where = (theirs / last * 2 - 1).flip(-1).view(1, -1, 1, 1, 3)
    expected = F.grid_sample(volume.detach(), where, mode="bilinear", padding_mode="border", align_corners=True)
    expected = expected.view(5, -1).T
    assert got.shape == (3000, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)
    assert ours.grad[4:].abs().sum() > 0
    assert volume.grad is None


def test_trilinear_at_points_reads_any_memory_layout_and_refuses_a_batch():
    torch.manual_seed(1)
    volume = torch.randn(1, 3, 6, 7, 8)
    points = torch.rand(100, 3) * 5
    torch.testing.assert_close(sampling.trilinear_at_points(volume, points),
                               sampling.trilinear_at_points(volume.contiguous(memory_format=torch.channels_last_3d),
                                                            points))
    with pytest.raises(ValueError, match=r"\[1,C,D,H,W\]"):
        sampling.trilinear_at_points(volume.expand(2, -1, -1, -1, -1), points)
