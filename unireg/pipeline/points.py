"""Reading a pyramid level at random voxels: the samples instance optimisation measures its loss on.

With a per-voxel descriptor (MIND-SSC) the similarity is a plain mean over voxels, so a level larger than
its sample is optimised on a new random sample of voxels at every step (elastix's random sampler with new
samples every iteration): the displacement and the moving descriptor are read at those points only, and a
step costs the sample, not the grid (``refine`` says what was measured). This module draws the samples
(uniform, among a mask's voxels, plus extra ones among the fixed image's edges) and reads volumes and
fields at them, forward and backward, without building a full grid.
"""
from __future__ import annotations

import math

import torch

from ..sampling import grid_sample, trilinear_at_points
from ..similarity import local_variance

#: The edges extra points are drawn from: this fraction of a level's voxels (within the moving scan's
#: coverage) where the fixed image's local variance (3-voxel window) is highest.
EDGE_FRACTION = 0.25


def level_points(shape, n: int, mask: torch.Tensor | None, device) -> torch.Tensor:
    """A fixed random sample (seeded: runs repeat) of ``n`` voxel indices [N,3] (d,h,w) of a level grid,
    among the voxels of ``mask`` when one is given, in memory order (reading a volume at sorted points
    is twice as fast as at shuffled ones: the cache sees neighbours)."""
    return PointSampler(shape, mask, device).fixed(n)


class PointSampler:
    """Random voxels of a level grid (among ``mask``'s when one is given), a new set per draw, plus
    ``n_edge`` more among the voxels of ``edges``; seeded: runs repeat.

    A draw is stratified: the candidates, in memory order, are cut into as many equal runs as points
    wanted and one is picked at random in each. Every voxel is as likely to be read as with
    independent picks, the points come out sorted (reading a volume at sorted points is twice as fast
    as at shuffled ones: the cache sees neighbours) and none repeats, with no sort per step."""

    def __init__(self, shape, mask: torch.Tensor | None, device, edges: torch.Tensor | None = None):
        self.shape = tuple(shape)
        self.candidates = None if mask is None else mask.flatten().nonzero()[:, 0]
        self.count = math.prod(self.shape) if mask is None else len(self.candidates)
        self.edges = None if edges is None else edges.flatten().nonzero()[:, 0]
        self.generator = torch.Generator().manual_seed(1)
        self.device = device

    def fixed(self, n: int) -> torch.Tensor:
        """``n`` distinct voxels, the same for every call (``level_points``)."""
        candidates = (torch.arange(self.count, device=self.device) if self.candidates is None
                      else self.candidates)
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(0))[:n]
        return self._points(candidates[order.to(self.device)].sort().values)

    def draw(self, n: int, n_edge: int = 0) -> torch.Tensor:
        """``n`` voxels, then ``n_edge`` among the edges, each part in memory order."""
        chosen = self._stratified(self.count, n)
        if self.candidates is not None:
            chosen = self.candidates[chosen]
        if n_edge and self.edges is not None and len(self.edges):
            chosen = torch.cat([chosen, self.edges[self._stratified(len(self.edges), n_edge)]])
        return self._points(chosen)

    def _stratified(self, count: int, n: int) -> torch.Tensor:
        """One position in [0, count) per run of count / n, ascending (repeats only when n > count)."""
        runs = torch.arange(n, dtype=torch.float64).add_(torch.rand(n, generator=self.generator, dtype=torch.float64))
        return runs.mul_(count / n).long().clamp_(max=count - 1).to(self.device)

    def _points(self, chosen: torch.Tensor) -> torch.Tensor:
        """Flat indices -> [N,3] voxels (d, h, w) (``torch.unravel_index`` in half the time)."""
        plane, row = self.shape[1] * self.shape[2], self.shape[2]
        d = torch.div(chosen, plane, rounding_mode="floor")
        rest = chosen - d * plane
        h = torch.div(rest, row, rounding_mode="floor")
        return torch.stack([d, h, rest - h * row], dim=1)


def edge_mask(image: torch.Tensor, inside: torch.Tensor | None, fraction: float | None = None) -> torch.Tensor:
    """The ``fraction`` (None: ``EDGE_FRACTION``) of voxels (among ``inside``'s) of an image [1,1,D,H,W] with
    the highest local variance over a 3-voxel window: its edges."""
    fraction = EDGE_FRACTION if fraction is None else fraction
    variance = local_variance(image, 3)
    values = variance.flatten() if inside is None else variance[inside]
    keep = max(1, int(len(values) * fraction))
    threshold = values.kthvalue(len(values) - keep + 1).values
    edges = variance >= threshold
    return edges if inside is None else edges & inside


def values_at(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``volume`` [1,C,D,H,W] at integer voxels ``points`` [N,3] -> [N,C].

    A channels-last volume is read a voxel's C values at a time (25x faster than C strided reads)."""
    _, h, w = volume.shape[2:]
    index = points[:, 0] * (h * w) + points[:, 1] * w + points[:, 2]
    channels = volume.shape[1]
    if volume.is_contiguous(memory_format=torch.channels_last_3d):
        rows = volume.permute(0, 2, 3, 4, 1).reshape(-1, channels)        # a view: no copy
        return rows.index_select(0, index)
    return volume.flatten(2)[0, :, index].T


def field_at(field: torch.Tensor, points: torch.Tensor, shape) -> torch.Tensor:
    """``resize_field(field, shape)`` read at level voxels ``points`` [N,3] -> [N,3], without the grid.

    Voxel centres (align_corners=False) and border clamping, as ``F.interpolate`` does."""
    size = torch.tensor(shape, device=field.device, dtype=field.dtype)
    where = ((points.to(field.dtype) + 0.5) / size * 2 - 1).flip(-1).view(1, -1, 1, 1, 3)
    values = grid_sample(field, where, mode="bilinear", padding_mode="border", align_corners=False)
    scale = size / torch.tensor(field.shape[2:], device=field.device, dtype=field.dtype)
    return values.view(3, -1).T * scale


def warp_at(image: torch.Tensor, points: torch.Tensor, displacement: torch.Tensor,
             to_moving: torch.Tensor | None = None) -> torch.Tensor:
    """``SpatialTransformer()(image, u)`` read at ``points`` [N,3] given ``u`` there [N,3] -> [N,C]
    (``trilinear_at_points``: a channels-last image is read without a copy). With ``to_moving`` (4x4,
    fixed level voxel -> moving level voxel) the image lies on the moving scan's own grid."""
    moved = points.to(displacement.dtype) + displacement
    if to_moving is not None:
        moved = moved @ to_moving[:3, :3].T + to_moving[:3, 3]
    return trilinear_at_points(image, moved)
