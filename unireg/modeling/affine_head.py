"""Affine head: the global part of the motion (patient repositioning, scale) as one matrix.

A patient lies a few degrees and millimetres differently at every scan. Left to the dynamic heads,
that global motion has to be drawn voxel by voxel into the velocity, by kernels that the prompt is
meant to spend on organs: trained with repositioned pairs, the tiny model learned the motion but lost
most of its prompt specificity (docs/experiments/rigid_motion/). This head takes the global part out
of their hands, the KeyMorph way (Yu et al., MIDL 2021): a small encoder of its own turns each scan
into K heatmaps, each heatmap's centre of mass is a keypoint, and the affine is the least-squares fit of
the fixed scan's keypoints onto the moving scan's (closed form, differentiable, and exact for any motion
the heatmaps follow, however large). The dynamic heads then explain what is left, on moving features
already moved by it.

The encoder is the head's own, not the network's features: a head reading a trained model's frozen
features learned almost nothing, by similarity or by the known motion, while one with its own encoder can
be taught alone, leaving the rest of a shipped model, prompt steering included, exactly as it was
(docs/experiments/affine_head/).

Affines here act on normalised coordinates ``p = (2 x + 1) / n - 1`` per tensor axis (d, h, w),
voxel centres in the ``align_corners=False`` convention, so one matrix ``[3, 4]``, ``p -> A p + t``,
means the same mapping on every level's grid. ``displacement`` and ``compose`` turn it into voxel
fields of a given grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn

#: Keypoints per scan, and the widths of the encoder's levels (each halves the grid: heatmaps at stride 8).
KEYPOINTS = 16
WIDTHS = (16, 32, 32)
#: Heatmap logits are the last layer's output times this, so that they can sharpen at Adam's pace (about
#: the learning rate a step per weight).
HEATMAP_GAIN = 10.0
#: Spread of the heatmaps' initial weights: distinct keypoints from the first step (logits within about +-1).
HEATMAP_INIT_STD = 0.01
#: Ridge towards the identity's linear part, per keypoint, in normalised units squared: keypoints spread
#: over less than ~0.1 of the extent (a new head's all sit at the centre) cannot tell a rotation or a
#: scale, and then the fit keeps the identity's linear part and only translates.
RIDGE = 0.01


class AffineHead(nn.Module):
    """The fixed and the moving scan [B,1,D,H,W] (network input) -> affine [B,3,4] (normalised
    coordinates) that maps fixed points to moving points.

    A new head's heatmaps are nearly flat, so every keypoint sits within a thousandth of the extent of the
    centre in both scans and the fit is the identity to about 0.001 voxels: a pretrained model the head is
    added to starts from its own outputs. They start small and random, not zero: zero-initialised, every
    keypoint sat at one point and got the same gradient, so the 16 heatmaps stayed one and the fit could only
    translate (docs/experiments/affine_head/, rounds 1-7)."""

    def __init__(self):
        super().__init__()
        layers, previous = [], 1
        for width in WIDTHS:
            layers += [nn.Conv3d(previous, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            previous = width
        layers += [nn.Conv3d(previous, previous, 3, padding=1), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*layers)
        self.heatmaps = nn.Conv3d(previous, KEYPOINTS, 1)
        nn.init.normal_(self.heatmaps.weight, std=HEATMAP_INIT_STD)
        nn.init.zeros_(self.heatmaps.bias)

    def keypoints(self, scan: torch.Tensor) -> torch.Tensor:
        """[B,1,D,H,W] -> [B,K,3]: each heatmap's centre of mass (a softmax over the grid)."""
        maps = self.heatmaps(self.encoder(scan))
        logits = maps.float().flatten(2) * HEATMAP_GAIN                                     # [B,K,N]
        points = normalised_points(maps.shape[2:], scan.device)                              # [1,N,3]
        return torch.softmax(logits, dim=-1) @ points[0]

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        source, target = self.keypoints(torch.cat([fixed, moving])).chunk(2)               # [B,K,3] each
        design = torch.cat([source, torch.ones_like(source[..., :1])], -1)                  # [B,K,4]
        ridge = RIDGE * source.shape[1] * torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], device=source.device))
        identity = torch.eye(4, 3, device=source.device)
        normal = design.transpose(1, 2) @ design + ridge
        rhs = design.transpose(1, 2) @ target + ridge @ identity
        solution = torch.linalg.solve(normal, rhs)                                          # [B,4,3]
        return solution.transpose(1, 2).to(fixed.dtype)                                     # [B,3,4]


def normalised_points(shape, device) -> torch.Tensor:
    """Voxel centres of a grid in normalised coordinates, [1, N, 3] in (d, h, w) order."""
    axes = [(2 * torch.arange(n, device=device, dtype=torch.float32) + 1) / n - 1 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, 3)


def displacement(affine: torch.Tensor, shape) -> torch.Tensor:
    """The affine as a voxel displacement on a grid of ``shape``: [B,3,D,H,W]."""
    points = normalised_points(shape, affine.device).to(affine.dtype)                  # [1,N,3]
    moved = points @ affine[:, :, :3].transpose(1, 2) + affine[:, None, :, 3]          # [B,N,3]
    half = torch.tensor([n / 2 for n in shape], device=affine.device, dtype=affine.dtype)
    field = (moved - points) * half                                                    # normalised -> voxels
    return field.transpose(1, 2).reshape(affine.shape[0], 3, *shape)


def voxel_linear(affine: torch.Tensor, shape) -> torch.Tensor:
    """The affine's linear part in voxels of a grid of ``shape``: [B,3,3] (anisotropic grids scale it)."""
    n = torch.tensor([float(s) for s in shape], device=affine.device, dtype=affine.dtype)
    return affine[:, :, :3] * n[None, :, None] / n[None, None, :]


def compose(affine: torch.Tensor, deformation: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> affine(x + deformation(x))`` on the deformation's grid.

    ``warped(x) = moving(affine(x + u(x)))``: the deformation acts first, in the fixed scan's frame, and the
    affine carries the result into the moving scan's. Affine in x, so ``a(x + u) = a(x) + (L - I) u``."""
    shape = deformation.shape[2:]
    linear = voxel_linear(affine, shape)
    return displacement(affine, shape) + torch.einsum("bij,bj...->bi...", linear, deformation)


def index_matrix(affine: torch.Tensor, shape) -> torch.Tensor:
    """One affine [3,4] as a 4x4 matrix on tensor voxel indices (d, h, w) of a grid of ``shape``."""
    a = torch.eye(4, dtype=torch.float64)
    a[:3] = affine.detach().double().cpu()
    to_normalised = _to_normalised(shape)
    return torch.linalg.inv(to_normalised) @ a @ to_normalised


def from_index_matrix(matrix, shape) -> torch.Tensor:
    """The inverse of :func:`index_matrix`: a 4x4 matrix on voxel indices of a grid of ``shape`` -> [3,4]."""
    to_normalised = _to_normalised(shape)
    return (to_normalised @ torch.as_tensor(matrix, dtype=torch.float64) @ torch.linalg.inv(to_normalised))[:3]


def _to_normalised(shape) -> torch.Tensor:
    """4x4 matrix from voxel indices to normalised coordinates, ``p = (2 x + 1) / n - 1``."""
    n = torch.tensor([float(s) for s in shape], dtype=torch.float64)
    to_normalised = torch.eye(4, dtype=torch.float64)
    to_normalised[:3, :3] = torch.diag(2 / n)
    to_normalised[:3, 3] = 1 / n - 1
    return to_normalised
