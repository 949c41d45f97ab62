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
