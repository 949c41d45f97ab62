"""``F.grid_sample`` for one 3-D volume that uses every CPU thread.

PyTorch's CPU kernels for 3-D ``grid_sample`` (forward and backward) run in parallel over the
batch only, so a single volume - every warp of instance optimisation, pre-alignment and
registration - ran on one core while the others idled. Splitting the sampling points into one
batch entry per thread, over the same volume (``expand``: no copy), gives the same numbers, in
about half the time on 2 cores (131,072 points of a 12-channel 128x112x112 descriptor, forward
and backward: 111 -> 54 ms). The gradient with respect to the volume is summed back over the
copies by autograd. That sum is cheap next to the sampling: measured on 2 threads, forward and
backward with the volume's gradient, the split still won with 64x more voxels than points (a 96^3
3-channel field at 13,824 points: 12.5 -> 10.3 ms; at as many points as voxels, scaling and squaring's
case, 16^3: 4.5 -> 3.4 ms, 64^3: 241 -> 149 ms); only a volume far larger than that is left whole.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Below this many sampling points a split does not pay for its bookkeeping (12^3 points: 2.2 -> 2.1 ms).
MIN_SPLIT_POINTS = 4096
#: With the volume's gradient, a volume of more than this many voxels per sampling point is sampled whole.
MAX_VOXELS_PER_POINT = 64


def grid_sample(input: torch.Tensor, grid: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.grid_sample(input, grid, **kwargs)``; split over CPU threads for a single 3-D volume."""
    threads = torch.get_num_threads()
    points = math.prod(grid.shape[1:-1])
    volume_grad = input.requires_grad and torch.is_grad_enabled()
    if (input.device.type != "cpu" or input.dim() != 5 or input.shape[0] != 1 or threads < 2
            or points < MIN_SPLIT_POINTS or (volume_grad and math.prod(input.shape[2:]) > MAX_VOXELS_PER_POINT * points)):
        return F.grid_sample(input, grid, **kwargs)
    spatial = grid.shape[1:-1]
    flat = grid.reshape(1, points, 3)
    pad = (-points) % threads
    if pad:
        flat = torch.cat([flat, flat.new_zeros(1, pad, 3)], dim=1)
    chunks = flat.reshape(threads, (points + pad) // threads, 1, 1, 3)
    out = F.grid_sample(input.expand(threads, *input.shape[1:]), chunks, **kwargs)   # [T, C, n, 1, 1]
    channels = input.shape[1]
    out = out.permute(1, 0, 2, 3, 4).reshape(channels, points + pad)
    if pad:
        out = out[:, :points]
    return out.reshape(1, channels, *spatial)


class _TrilinearAtPoints(torch.autograd.Function):
    """Forward and backward of :func:`trilinear_at_points` (the gradient flows to the points only)."""

    @staticmethod
    def forward(ctx, volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        _, channels, depth, height, width = volume.shape
        rows = volume.permute(0, 2, 3, 4, 1).reshape(-1, channels)              # a view of channels-last
        last = torch.tensor([depth - 1, height - 1, width - 1], device=points.device, dtype=points.dtype)
        inside = (points > 0) & (points < last)       # border padding: clamped points get no gradient (as torch)
        x = torch.minimum(points.clamp(min=0), last)
        base = torch.minimum(x.floor(), last - 1)
        frac = x - base
        corner = base.long()
        index = corner[:, 0] * (height * width) + corner[:, 1] * width + corner[:, 2]
        # Voxels (w, w + 1) are neighbouring rows: one gather of 2C values reads both, four gathers a cube.
        pairs = rows.as_strided((rows.shape[0] - 1, 2 * channels), (channels, 1))
        offsets = torch.tensor([0, width, height * width, height * width + width], device=points.device)
        corners = pairs.index_select(0, (index[:, None] + offsets).view(-1)).view(-1, 8, channels)
        # Weights and slopes as rows of N values (contiguous, so elementwise work vectorises), corner
        # order (d, h, w) as the gather: k = 4 a + 2 b + c.
        ones_minus = torch.stack([1 - frac, frac]).permute(2, 0, 1).contiguous()   # [3 axes, 2, N]
        wd, wh, ww = ones_minus.unbind(0)
        w_dh = (wd[:, None] * wh[None]).view(4, -1)                            # [4, N]: (a, b)
        weights = (w_dh[:, None] * ww[None]).view(8, -1)                       # [8, N]
        ctx.save_for_backward(corners, wd, wh, ww, w_dh, inside)
        return torch.einsum("kn,nkc->nc", weights, corners)     # (bmm of weights.T: 1.8x slower)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        corners, wd, wh, ww, w_dh, inside = ctx.saved_tensors
        dots = torch.bmm(corners, grad.unsqueeze(2)).view(-1, 8).T.contiguous().view(2, 2, 2, -1)  # <grad, corner>
        gd = ((dots[1] - dots[0]) * (wh[:, None] * ww[None])).sum((0, 1))
        gh = ((dots[:, 1] - dots[:, 0]) * (wd[:, None] * ww[None])).sum((0, 1))
        gw = ((dots[:, :, 1] - dots[:, :, 0]) * w_dh.view(2, 2, -1)).sum((0, 1))
        return None, torch.stack([gd, gh, gw], 1) * inside


def trilinear_at_points(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """A volume [1,C,D,H,W] read trilinearly at voxel coordinates ``points`` [N,3] (d, h, w) -> [N,C],
    with border padding: ``F.grid_sample(..., align_corners=True, padding_mode="border")``'s values
    and its gradient with respect to the points (the volume is a constant).

    Instance optimisation reads a 13-channel descriptor at ~50,000 moved points per step. Stored
    channels-last, the two voxels of a cube's edge along the last axis are one contiguous row of 2C
    values, so four gathers read the cube; the backward pass reuses the gathered corners. Forward and
    backward of 49,152 points of a 13-channel 96^3 volume on 2 threads: 18.6 ms with the thread-split
    ``grid_sample``, 9.3 ms here. A volume that is not channels-last is copied to it (do it once).
    """
    if volume.dim() != 5 or volume.shape[0] != 1 or min(volume.shape[2:]) < 2 or points.dim() != 2:
        raise ValueError(f"trilinear_at_points needs a [1,C,D,H,W] volume (each side >= 2) and [N,3] points, "
                         f"got {tuple(volume.shape)} and {tuple(points.shape)}")
    volume = volume.detach().contiguous(memory_format=torch.channels_last_3d)
    return _TrilinearAtPoints.apply(volume, points)
