"""The box filter behind LNCC, MIND-SSC and the intensity channel: both of its paths are the mean over
the part of the window inside the volume, in value and in gradient."""
import pytest
import torch

from unireg import similarity
from unireg.similarity import box_filter


def _brute_force(x: torch.Tensor, kernel: int) -> torch.Tensor:
    r = kernel // 2
    out = torch.empty_like(x)
    D, H, W = x.shape[2:]
    for d in range(D):
        for h in range(H):
            for w in range(W):
                window = x[:, :, max(d - r, 0):d + r + 1, max(h - r, 0):h + r + 1, max(w - r, 0):w + r + 1]
                out[:, :, d, h, w] = window.mean(dim=(2, 3, 4))
    return out


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("shape", [(6, 7, 5), (1, 2, 9)])      # axes shorter than the window too
def test_box_filter_is_the_mean_over_the_window_inside_the_volume(kernel, shape):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    got = box_filter(x, kernel)
    torch.testing.assert_close(got, _brute_force(x.detach(), kernel))
    weights = torch.randn_like(got)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    (want,) = torch.autograd.grad((_brute_force(x, kernel) * weights).sum(), x)
    torch.testing.assert_close(grad, want)


def test_shifted_sums_and_running_sums_agree(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(1, 2, 20, 17, 23)
    shifted = box_filter(x, 5)
    monkeypatch.setattr(similarity, "MAX_SHIFTED_KERNEL", 1)      # force running sums
    torch.testing.assert_close(box_filter(x, 5), shifted, rtol=0, atol=1e-5)



def test_local_variance_is_the_windowed_variance_and_ignores_an_offset():
    torch.manual_seed(2)
    x = torch.randn(1, 1, 7, 6, 8, dtype=torch.float64)
    want = _brute_force(x * x, 3) - _brute_force(x, 3) ** 2
    torch.testing.assert_close(similarity.local_variance(x, 3).double(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(similarity.local_variance(x + 1000.0, 3), similarity.local_variance(x, 3),
                               atol=1e-3, rtol=1e-3)


def _mind_by_pairs(image: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """MIND-SSC as written in Heinrich et al. 2013: for each of the 12 pairs of six-neighbours, the
    patch (box) mean of their squared difference, then exp(-(d - min d) / mean(d - min d))."""
    d = dilation
    padded = torch.nn.functional.pad(image, [d] * 6, mode="replicate")
    D, H, W = image.shape[2:]

    def neighbour(offset):
        a, b, c = (d + o * d for o in offset)
        return padded[:, :, a:a + D, b:b + H, c:c + W]

    channels = [box_filter((neighbour(similarity._SIX[i]) - neighbour(similarity._SIX[j])) ** 2, 2 * radius + 1)
                for i, j in similarity._SSC_PAIRS]
    ssd = torch.cat(channels, 1)
    ssd = ssd - ssd.amin(dim=1, keepdim=True)
    variance = ssd.mean(dim=1, keepdim=True)
    level = variance.mean()
    return torch.exp(-ssd / variance.clamp(min=level * 1e-3 + 1e-12, max=level * 1e3 + 1e-12))


@pytest.mark.parametrize("radius,dilation", [(1, 2), (1, 1), (2, 2), (0, 2)])
def test_mind_ssc_from_six_difference_images_is_the_pairwise_descriptor(radius, dilation):
    """The 12 channels read from 6 shared difference images equal the 12 pairs built one by one,
    away from the outermost layers (where the shared patches also cover the replicate padding)."""
    torch.manual_seed(0)
    image = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 21, 18, 16, dtype=torch.float64), 3, 1, 1)
    got = similarity.mind_ssc(image, radius=radius, dilation=dilation)
    want = _mind_by_pairs(image, radius, dilation)
    assert got.shape == (1, 12, 21, 18, 16)
    r = radius
    inner = (..., slice(r, 21 - r), slice(r, 18 - r), slice(r, 16 - r))
    torch.testing.assert_close(got[inner], want[inner].float(), rtol=1e-5, atol=1e-6)
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    border = torch.ones_like(got, dtype=torch.bool)
    border[inner] = False
    if r:
        assert float((got - want.float()).abs()[border].mean()) < 0.15  # the border layers differ a little
    out = torch.zeros(1, 13, 21, 18, 16)
    similarity.mind_ssc(image, radius=radius, dilation=dilation, out=out[:, :12])
    torch.testing.assert_close(out[:, :12], got)
    assert not out[:, 12].any()
