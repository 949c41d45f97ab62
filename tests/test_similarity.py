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
