"""3-D convolutional parts: a shared multi-scale stem and the per-level fusion blocks.

The stem gives full-resolution detail the slice-wise ViT cannot see (through-plane structure,
fine edges); each decoder level fuses fixed features with moving features warped by the
current estimate, so every level only has to explain what is still misaligned.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3x3 convolutions; group norm (4 channels a group) keeps activations O(1) so the
    dynamic head, whose weights are generated, sees well-scaled features from the first step."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.GroupNorm(max(1, out_channels // 4), out_channels), nn.LeakyReLU(0.2),
        nn.Conv3d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(max(1, out_channels // 4), out_channels), nn.LeakyReLU(0.2),
    )


class Stem3d(nn.Module):
    """Image [N,1,D,H,W] -> features at strides 2, 4, 8, ... (a list, in ``self.strides`` order;
    a list rather than a dict keyed by stride because ZeRO-3's hooks need string-keyed outputs)."""

    def __init__(self, channels: tuple[int, ...], max_stride: int):
        super().__init__()
        self.strides = []
        blocks, in_ch, s = [], 1, 2
        for c in channels:
            if s > max_stride:
                break
            blocks.append(conv_block(in_ch, c, stride=2))
            self.strides.append(s)
            in_ch, s = c, s * 2
        self.blocks = nn.ModuleList(blocks)
        self.channels = {s: c for s, c in zip(self.strides, channels)}

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        out, x = [], image
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out


def local_correlation(fixed: torch.Tensor, moving: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Cost volume: channel-mean product of fixed features with moving features shifted by every
    offset in [-radius, radius]^3 -> [B, (2r+1)^3, D, H, W]. It tells each voxel directly where its
    match lies, which is what makes a registration decoder learn quickly (as in PWC-Net)."""
    fixed = nn.functional.normalize(fixed, dim=1)
    moving = nn.functional.normalize(moving, dim=1)
    padded = nn.functional.pad(moving, [radius] * 6, mode="replicate")
    d, h, w = fixed.shape[2:]
    out = []
    for i in range(2 * radius + 1):
        for j in range(2 * radius + 1):
            for k in range(2 * radius + 1):
                out.append((fixed * padded[:, :, i:i + d, j:j + h, k:k + w]).sum(1, keepdim=True))
    return torch.cat(out, dim=1)


class FusionLevel(nn.Module):
    """Concatenated fixed / warped-moving / coarser features -> per-voxel level features."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block = conv_block(in_channels, out_channels)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat(features, dim=1))
