"""Spatial transform: scaling-and-squaring of a stationary velocity and warping.

MONAI's ``Warp`` and ``DVF2DDF`` do the work. Fields are in voxels of the grid they live on,
channels in tensor-axis order (d, h, w): ``warped(x) = moving(x + u(x))``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp

# MONAI announces its grid_sample fallback on every construction; it is the path we want.
warnings.filterwarnings("ignore", message="monai.networks.blocks.Warp: Using PyTorch native grid_sample")


class SpatialTransformer(nn.Module):
    """Warps images (trilinear) or label maps (nearest) with a displacement in voxels."""

    def __init__(self):
        super().__init__()
        self.linear = Warp(mode="bilinear", padding_mode="border")
        self.nearest = Warp(mode="nearest", padding_mode="zeros")

    def forward(self, image: torch.Tensor, displacement: torch.Tensor, nearest: bool = False) -> torch.Tensor:
        if nearest:
            return self.nearest(image.float(), displacement.float()).to(image.dtype)
        return self.linear(image, displacement.to(image.dtype))


class VelocityIntegrator(nn.Module):
    """exp(v) by scaling and squaring: a diffeomorphic displacement for a smooth velocity."""

    def __init__(self, steps: int = 7):
        super().__init__()
        self.integrate = DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        return self.integrate(velocity)


def resize_field(field: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resample a voxel-unit field to another grid over the same extent, rescaling its values."""
    old = field.shape[2:]
    if tuple(old) == tuple(shape):
        return field
    # Voxel centres of a stride-s grid sit at s*j + (s-1)/2: the align_corners=False convention.
    out = F.interpolate(field, size=shape, mode="trilinear", align_corners=False)
    scale = torch.tensor([n / o for n, o in zip(shape, old)],
                         device=field.device, dtype=field.dtype)
    return out * scale.view(1, 3, 1, 1, 1)
