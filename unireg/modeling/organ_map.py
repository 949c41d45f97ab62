"""Organ map: where the prompt's organs are, in each scan, as a per-voxel logit.

Why: the dynamic head is a per-voxel 1x1x1 MLP whose kernels the prompt writes. To align "the
pancreas" better than the whole-body field does, it must know *which voxels* are pancreas, and a
C -> 8 -> 8 -> 3 kernel cannot carve a small organ out of generic registration features; between
subjects the named field hardly moved (issue 11, docs/experiments/inter_steering). So the prompt
also segments: per-voxel embeddings of a scan are matched against each named organ's text
embedding (CLIP-driven universal segmentation does this; SAM's mask decoder matches prompt tokens
against image embeddings alike), the union of the named organs is the max of their logits, and the
fusion levels get both scans' maps as two extra channels (the moving one warped with the moving
features). The whole-body prompt maps every organ. The map is supervised by the label maps
(``unireg.training.objective``); ``register(focus=True)`` uses the fixed scan's map as its focus
region when no label map is given.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoder import conv_block


class OrganMap(nn.Module):
    """One scan + its SAM features + phrase embeddings -> logits [N,1,...] at the finest level's stride.

    Its encoder is its own (a small U-Net from the image, the SAM features joining at the deepest
    stride): the registration features it was first built on find organs poorly (phantom Dice 0.53 for the
    liver and 0 for every smaller organ after 900 steps, docs/experiments/organ_map), and its own encoder
    can learn fast without moving the field."""

    def __init__(self, sam_channels: int, text_dim: int, sam_stride: int, out_stride: int,
                 channels: tuple[int, ...] = (16, 32, 48, 64), dim: int = 24):
        super().__init__()
        depth = int(round(math.log2(sam_stride)))
        widths = [channels[min(k, len(channels) - 1)] for k in range(depth)]      # at strides 2, 4, ..., sam_stride
        self.down = nn.ModuleList(conv_block(c_in, c_out, stride=2) for c_in, c_out in zip([1] + widths, widths))
        self.join = conv_block(widths[-1] + sam_channels, widths[-1])
        ups, width = [], widths[-1]
        self.out_level = int(round(math.log2(out_stride))) - 1                    # index of the output stride
        for k in range(depth - 2, self.out_level - 1, -1):
            ups.append(conv_block(width + widths[k], widths[k]))
            width = widths[k]
        self.up = nn.ModuleList(ups)
        self.head = nn.Conv3d(width, dim, 1)
        self.query = nn.Sequential(nn.Linear(text_dim, dim), nn.LeakyReLU(0.2), nn.Linear(dim, dim))
        self.scale = dim ** -0.5
        self.bias = nn.Parameter(torch.full((1,), -2.0))   # organs are a small part of a scan: start near "not here"

    def embed_voxels(self, image: torch.Tensor, sam: torch.Tensor) -> torch.Tensor:
        """Scans [N,1,D,H,W] and their SAM features (at the deepest stride) -> voxel embeddings [N,E,...]."""
        skips, x = [], image
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.join(torch.cat([x, F.interpolate(sam, size=x.shape[2:], mode="trilinear", align_corners=False)], 1))
        for block, skip in zip(self.up, reversed(skips[self.out_level:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False), skip], 1))
        return self.head(x)

    def logits(self, voxels: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        """Voxel embeddings [N,E,...] x phrase embeddings [N,K,T] -> one logit map per phrase, [N,K,...]."""
        queries = self.query(phrases.to(voxels.dtype))                        # [N,K,E]
        return torch.einsum("nke,ne...->nk...", queries, voxels) * self.scale + self.bias

    def forward(self, image: torch.Tensor, sam: torch.Tensor, phrases: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The union of each sample's named organs (``phrases`` [N,K,T], ``valid`` [N,K] marks the real ones) as
        logits [N,1,...], and the voxel embeddings, which training also queries with other organs."""
        voxels = self.embed_voxels(image, sam)
        logits = self.logits(voxels, phrases)
        absent = (~valid.bool()).view(*valid.shape, *([1] * (logits.dim() - 2)))
        union = logits.masked_fill(absent, torch.finfo(logits.dtype).min).amax(dim=1, keepdim=True)
        return union, voxels


@torch.no_grad()
def widen_first_conv(block: nn.Sequential, extra: int) -> None:
    """Give a trained fusion block ``extra`` more input channels with zero weights (appended last), so
    the block's output is unchanged until training teaches it to read them."""
    old = block[0]
    new = nn.Conv3d(old.in_channels + extra, old.out_channels, old.kernel_size, stride=old.stride,
                    padding=old.padding).to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, :old.in_channels] = old.weight
    new.bias.copy_(old.bias)
    block[0] = new
