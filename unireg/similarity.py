"""Image similarities for training and the optimisation stages: box-filtered LNCC, MIND-SSC, global MI.

The stages call these hundreds of times per pair on a CPU, so the local statistics come from a
separable box filter (running sums along each axis: constant work per voxel whatever the window)
over all the needed products stacked as channels of one call. Every function takes [B,C,D,H,W] float
tensors and an optional voxel weight ``mask`` [B,1,D,H,W] (e.g. the part of the fixed grid that
the moving scan covers), and returns a scalar loss to *minimise*.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: LNCC's stabiliser. Scans are scaled to [0, 1] over a 2000 HU window, so soft tissue varies by
#: ~0.02 and its local variances multiply to ~1e-7: MONAI's default 1e-5 would silence every organ
#: and leave only bone and air edges to drive the field (instance optimisation on a real chest CT:
#: 0.97 -> 0.80 mm median TRE). Training and refinement use this value.
LNCC_EPS = 1e-8


#: Windows up to this side are summed from shifted copies, wider ones from running sums.
MAX_SHIFTED_KERNEL = 5


def box_filter(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean over a cube of side ``kernel`` (odd) around each voxel; the borders average what exists.

    Separable along each axis. Wide windows use running sums (a cumulative sum and one subtraction
    per axis: the cost does not grow with the window, and the backward pass is another cumulative
    sum). Narrow ones (MIND-SSC's 3, the intensity channel's 5) add shifted copies in place, which on a
    CPU is 4x faster than a cumulative sum (3 voxels, 175x125x143: 18.5 -> 4.4 ms).
    """
    if kernel <= 1:
        return x
    r = kernel // 2
    for dim in (2, 3, 4):
        n = x.shape[dim]
        if kernel <= MAX_SHIFTED_KERNEL:
            summed = x.clone()
            for shift in range(1, min(r, n - 1) + 1):
                summed.narrow(dim, shift, n - shift).add_(x.narrow(dim, 0, n - shift))
                summed.narrow(dim, 0, n - shift).add_(x.narrow(dim, shift, n - shift))
            x = summed
        else:
            summed = F.pad(x, [0, 0] * (4 - dim) + [r + 1, r]).cumsum(dim)
            x = summed.narrow(dim, kernel, n) - summed.narrow(dim, 0, n)
        index = torch.arange(n, device=x.device)
        count = (index.add(r).clamp(max=n - 1) - index.sub(r).clamp(min=0) + 1).to(x.dtype)
        x = x / count.view([n if d == dim else 1 for d in range(x.dim())])
    return x


def _masked_mean(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return value.mean()
    mask = mask.expand_as(value)
    return (value * mask).sum() / mask.sum().clamp(min=1.0)


def lncc_map(fixed: torch.Tensor, warped: torch.Tensor, kernel: int = 7, eps: float = 1e-5) -> torch.Tensor:
    """Squared local normalised cross-correlation per voxel, in [0, 1] (MONAI's definition).

    Variances and the ratio are clamped: with a stabiliser as small as soft tissue needs
    (``LNCC_EPS``), float32 cancellation in flat regions otherwise gives values far
    above 1 (MONAI's loss reached -9 in training at eps 1e-8)."""
    f, w = fixed.float(), warped.float()
    n = f.shape[1]
    stats = box_filter(torch.cat([f, w, f * f, w * w, f * w], dim=1), kernel)
    mf, mw, ff, ww, fw = stats.split(n, dim=1)
    cov = fw - mf * mw
    var_f = (ff - mf * mf).clamp(min=0)
    var_w = (ww - mw * mw).clamp(min=0)
    return (cov * cov / (var_f * var_w + eps)).clamp(max=1.0)


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, kernel: int = 7, mask: torch.Tensor | None = None,
              eps: float = 1e-5) -> torch.Tensor:
    """Minus the mean squared local normalised cross-correlation (in [-1, 0])."""
    return -_masked_mean(lncc_map(fixed, warped, kernel, eps), mask)


# Six-neighbourhood of MIND-SSC, and the 12 pairs of neighbours sqrt(2) apart whose patch distances
# form the descriptor (Heinrich et al., MICCAI 2013): self-similarity without the centre voxel,
# which makes it robust to noise at the centre and to contrast changes between scans.
_SIX = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (0, 1, 0), (1, 0, 0))
_SSC_PAIRS = tuple((i, j) for i in range(6) for j in range(i + 1, 6)
                   if sum((a - b) ** 2 for a, b in zip(_SIX[i], _SIX[j])) == 2)


def _ssc_directions() -> dict[tuple[int, int, int], list[tuple[int, tuple[int, int, int]]]]:
    """The 12 pairs' squared differences come from 6 directions: pair k at voxel x is the squared
    difference image of its direction v, (I(y) - I(y + v))^2, read at y = x + q (q: one of the
    pair's two neighbours). {v: [(k, q), ...]}, v's first nonzero component positive."""
    table: dict = {}
    for k, (i, j) in enumerate(_SSC_PAIRS):
        v = tuple(b - a for a, b in zip(_SIX[i], _SIX[j]))
        if next(c for c in v if c) > 0:
            table.setdefault(v, []).append((k, _SIX[i]))
        else:
            table.setdefault(tuple(-c for c in v), []).append((k, _SIX[j]))
    return table


_SSC_DIRECTIONS = _ssc_directions()


def _valid_box_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over a cube of side 2 radius + 1 at the voxels whose cube lies inside ``x`` (each side
    shrinks by 2 radius)."""
    if radius == 0:
        return x
    for dim in (2, 3, 4):
        n = x.shape[dim] - 2 * radius
        summed = x.narrow(dim, 0, n) + x.narrow(dim, 1, n)
        for shift in range(2, 2 * radius + 1):
            summed += x.narrow(dim, shift, n)
        x = summed
    return x


@torch.no_grad()
def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, out: torch.Tensor | None = None) -> torch.Tensor:
    """MIND-SSC descriptor [B,12,D,H,W] of a one-channel image [B,1,D,H,W] (a constant: no gradient).

    The 12 patch distances are 6 box-filtered squared difference images, each read at two shifts
    (pairs of neighbours in the same direction): half the filtering of 12 separate channels (a
    144x144x192 grid: 255 -> 170 ms). The image is replicate-padded, so at the outermost voxel layer
    a patch also covers the padding (a separate filter per channel averaged only the voxels inside).
    Built channel by channel and in place: instance optimisation computes it on the refinement grid
    (up to 160^3 on a CPU), where stacking the 12 channels' temporaries took 1.4 GB for a pair.
    ``out``: a [B,12,D,H,W] tensor (or view) to build it in, e.g. the first channels of a larger
    descriptor, which saves concatenating a full-size copy."""
    x = image.float()
    d, r = dilation, radius
    margin = d + r
    padded = F.pad(x, [margin] * 6, mode="replicate")
    size = x.shape[2:]
    ssd = x.new_empty(x.shape[0], len(_SSC_PAIRS), *size) if out is None else out
    if ssd.shape != (x.shape[0], len(_SSC_PAIRS), *size):
        raise ValueError(f"mind_ssc out must be {(x.shape[0], len(_SSC_PAIRS), *size)}, got {tuple(ssd.shape)}")
    cube = float((2 * r + 1) ** 3)
    for v, reads in _SSC_DIRECTIONS.items():
        # the padded voxels this direction's difference image is needed at: every read, plus the patch
        lo = [min(margin + q[a] * d for _, q in reads) - r for a in range(3)]
        hi = [max(margin + q[a] * d for _, q in reads) + size[a] + r for a in range(3)]
        here = padded[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        there = padded[:, :, lo[0] + v[0] * d:hi[0] + v[0] * d, lo[1] + v[1] * d:hi[1] + v[1] * d,
                       lo[2] + v[2] * d:hi[2] + v[2] * d]
        patch = _valid_box_sum((here - there).square_(), r)
        for k, q in reads:
            s = [margin + q[a] * d - r - lo[a] for a in range(3)]
            torch.div(patch[:, :, s[0]:s[0] + size[0], s[1]:s[1] + size[1], s[2]:s[2] + size[2]], cube,
                      out=ssd[:, k:k + 1])
    ssd -= ssd.amin(dim=1, keepdim=True)           # values only: 10x faster than .min(dim)
    variance = ssd.mean(dim=1, keepdim=True)
    level = variance.mean()
    variance = variance.clamp(min=level * 1e-3 + 1e-12, max=level * 1e3 + 1e-12)
    return ssd.mul_(variance.reciprocal_().neg_()).exp_()          # exp(-ssd / variance)


def _local_moments(image: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image less its global mean, and its local mean and variance over a ``kernel``-wide cube."""
    x = image.float()
    x = x - x.mean()                    # box(x^2) - box(x)^2 cancels badly far from zero in float32
    mean = box_filter(x, kernel)
    return x, mean, (box_filter(x * x, kernel) - mean * mean).clamp(min=0)


def local_variance(image: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Variance over a ``kernel``-wide cube around each voxel: high on edges, zero where flat."""
    return _local_moments(image, kernel)[2]


def local_standardise(image: torch.Tensor, kernel: int = 5, eps: float = LNCC_EPS) -> torch.Tensor:
    """``(image - local mean) / local std`` over a ``kernel``-wide cube (a constant: no gradient).

    Averaged over a window whose statistics these are, the squared difference of two such images is
    2 (1 - their correlation) there: an LNCC-like term that, unlike LNCC, can be read point by point;
    instance optimisation adds it to MIND-SSC as a 13th channel. MIND-SSC describes the shape of the
    local structure and is blind to which side of a weak soft-tissue edge is brighter; this channel
    sees the intensity step itself."""
    x, mean, var = _local_moments(image, kernel)
    # A floor relative to the scan's own local variance (not an absolute one) keeps it gain-invariant
    # and stops flat air from turning noise into unit-variance texture.
    return (x - mean) / (var + eps + 1e-3 * var.mean()).sqrt()


def mind_loss(fixed_mind: torch.Tensor, warped_mind: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of two MIND-SSC descriptors (0 for identical structure)."""
    return _masked_mean((fixed_mind - warped_mind).pow(2).mean(dim=1, keepdim=True), mask)


def mutual_information_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
                            bins: int = 32, max_samples: int = 32768) -> torch.Tensor:
    """Minus global mutual information (MONAI's Parzen-window estimate) over the voxels in ``mask``.

    The Parzen histogram costs voxels x bins, so above ``max_samples`` voxels an evenly strided,
    deterministic subset is used (the sampling of ITK's Mattes metric, without its randomness).
    """
    from monai.losses import GlobalMutualInformationLoss
    f, w = fixed.float().flatten(), warped.float().flatten()
    if mask is not None:
        keep = mask.expand_as(fixed).flatten() > 0.5
        f, w = f[keep], w[keep]
    stride = max(1, -(-f.numel() // max_samples))
    f, w = f[::stride], w[::stride]
    loss = GlobalMutualInformationLoss(num_bins=bins, sigma_ratio=0.5).to(f.device)
    return loss(w.view(1, 1, -1), f.view(1, 1, -1))
