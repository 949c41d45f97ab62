"""Instance optimisation: multi-resolution refinement of a stationary velocity field for one pair.

The network gives a good field fast but at its working grid and within what it learned; a few
hundred Adam steps on this very pair, started from the network's velocity, bring optimiser-level
accuracy (the uniGradICON / ConvexAdam recipe), and with the network's start far fewer steps are
needed than from zero.

Conventions (the network's, from ``unireg.modeling.transform``)
    ``fixed`` and ``moving`` are [1,1,D,H,W] on the SAME grid, voxel size ``spacing_mm``; or, with
    ``fixed_to_moving`` (the pipeline's way), ``moving`` lies on a grid of its own and every read of it
    goes through that voxel map, so the pre-alignment is composed in and the scan is interpolated once.
    Fields are [1,3,...] in voxels of the grid they live on, channels in tensor-axis order (d, h, w),
    ``warped(x) = moving(x + u(x))`` (through the map: ``moving(M (x + u(x)))``),
    ``u = resize_field(VelocityIntegrator(v), fixed.shape)``.

Method
    Levels are downsampling factors of the fixed grid, coarse to fine (default 4, 2, 1; the pipeline
    asks for 8, 4, 2, 1; images area-averaged). At each level the velocity lives on a coarser grid
    than the images: half the level's resolution, or ``velocity_factor`` times coarser than the fixed
    grid when that is coarser still (the pipeline asks for ~16 mm, 8 mm between subjects: a cheap
    scaling and squaring while the similarity keeps the level's detail); the displacement is integrated
    there and upsampled (trilinear) to the level grid for warping. With a preset ``steps``, sampled levels between the
    first and the finest that would optimise the finest's own velocity grid are skipped
    (``_skip_redundant_levels``). Loss per step:

        similarity (LNCC, box filter; or MIND-SSC, robust to contrast changes: computed once on the
                    grid passed in and area-averaged to each level, as ConvexAdam does; computed on
                    each level's own coarse image it scored 0.62 mm median TRE on a real chest CT
                    at 2 mm, at full resolution 0.47 mm; "auto" appends the locally standardised
                    intensity as a 13th channel, which matches soft-tissue edges MIND is blind to)
        + lambda(smoothness) * mean |grad v|^2          (diffusion regulariser on the velocity)
        + dice_weight * soft Dice(fixed masks, linearly warped moving masks)    if both are given
        + rigid_weight * mean over rigid_mask of |J^T J - I|^2, J = I + grad u (local rotation only)

    With a ``focus`` region (the prompt's organs, dilated, from a label map), the similarity is a
    weighted mean, weight ``1 + focus_gain`` inside the region and 1 elsewhere: the named organs count
    more, the rest of the scan still holds the field (what slides along an organ's boundary is seen
    only beyond it). A sampled level then also reads ``FOCUS_VOXELS`` points among the focus voxels
    at every step, and weighs the two means by the region's share of the level.

    With MIND-SSC (a descriptor per voxel, so the loss is a plain mean over voxels) a level larger
    than ``sample_voxels`` is optimised on random samples of that many of its voxels, a new sample at
    every step (elastix's random sampler with new samples every iteration): the displacement and the
    moving features are read at those points only, so a step costs the sample, not the grid, and the
    full-resolution level fits the CPU budget (real abdomen CT at 3 mm: the full grid cut median TRE
    0.67 -> 0.44 mm but took 24 s dense), while over its steps the optimiser still sees most of the
    grid. Each step also reads ``edge_voxels`` more among the quarter of the voxels where the fixed
    image varies most (``points.EDGE_FRACTION``): organ boundaries, which decide label overlap. The losses a
    level reports, and the final check, are measured on one fixed sample of ``CHECK_SAMPLES`` voxels.
    The Dice and rigidity terms need the dense field, so they keep every voxel.

    ``smoothness`` in [0, 1] (the prompt's λ) maps log-linearly onto lambda in
    [``SMOOTHNESS_RANGE``] (per similarity). Each level stops early when the loss, averaged over
    windows of ``check_every`` steps, improves by less than ``min_improvement`` (relative). Scaling and
    squaring of a smooth velocity keeps det J > 0.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from ..io import InputError
from ..losses import gradient_l2
from ..modeling.transform import SpatialTransformer, VelocityIntegrator, resize_field
from ..sampling import grid_sample
from ..similarity import LNCC_EPS, box_filter, lncc_loss, local_standardise, mind_loss, mind_ssc
from .points import PointSampler, edge_mask, field_at, values_at, warp_at

SIMILARITIES = ("lncc", "mind", "mind_ncc")
DESCRIPTORS = ("mind", "mind_ncc")   # per-voxel descriptors: a plain mean over voxels, so sampleable
#: Regulariser weight at smoothness 0 and at smoothness 1 (log-linear in between), per similarity:
#: MIND's squared descriptor differences are ~10x smaller than LNCC's [-1, 0] loss. The LNCC range
#: puts the default smoothness (inter 0.3, intra 0.5) at 0.8 and 3.2; tried on a phantom inter pair,
#: a phantom breathing pair and a real chest CT with a known field, (0.1, 100) scored best on the two
#: phantoms (Dice 0.833 / 0.906) and within 0.06 mm of the best on the chest (0.85 mm median TRE).
SMOOTHNESS_RANGE = {"lncc": (0.1, 100.0), "mind": (0.05, 20.0), "mind_ncc": (0.05, 20.0)}
#: Voxel-steps (level voxels x Adam steps) that a named ``steps=`` preset spends over the levels. One
#: CPU core does about 1.5 million per second (warp, LNCC, scaling and squaring, backward), so a 128^3
#: pair costs about 4 CPU-seconds; levels whose share buys fewer than AUTO_MIN_STEPS steps are left
#: out, finest first (on a CPU, the full grid of a scan above ~96^3). GPUs get every level. A
#: sampled level counts as its sample.
AUTO_BUDGET = {"cpu": 10e6, "cuda": 2e8}
AUTO_MIN_STEPS = 10


@dataclass(frozen=True)
class StepPreset:
    """A named accuracy/time trade-off for ``steps=``: the most Adam steps the finest level and each
    coarser level get, how many voxels a large MIND level samples per step (uniformly, and among its
    edges), and the similarity the pipeline uses with it when the caller leaves ``similarity="auto"``."""
    max_steps: int
    coarse_steps: int
    sample_voxels: int
    edge_voxels: int
    similarity: str


#: ``"auto"``, the default, balances accuracy and time; ``"fast"`` takes fewer steps and matches MIND-SSC
#: alone; ``"accurate"`` gives the finest level 40 steps (about 10 % lower TRE in 1.2x the seconds).
#: Each reads large levels at a new random sample of 2^15 voxels every step (elastix's random sampler)
#: instead of one fixed sample of 2^17: same accuracy in 0.65-0.75x the seconds, where a fixed 2^15
#: sample had cost the chest 0.32 -> 0.43 mm (sweeps: docs/experiments/refine_speed/). Measured
#: (bench/vs_optimisers.py, two seeds, 2-core CPU), median TRE mm / Dice / seconds, auto -> fast: real
#: chest at 2 mm 0.31 / 0.990 / 6.1 -> 0.35 / 0.988 / 4.0 (ANTs SyN 0.86 mm, 17.7 s); abdomen at 3 mm
#: 0.41 / 0.939 / 3.9 -> 0.50 / 0.921 / 2.7 (Greedy 0.83 mm / 0.926); phantom breathing 2.43 / 0.908 /
#: 3.1 -> 2.08 / 0.896 / 1.9; phantom inter-subject Dice 0.826 / 3.7 s -> 0.813 / 2.4. "fast" with the
#: intensity channel too cost the chest 0.35 -> 0.48 mm on 2^14 points.
#: "auto" then adds 2^14 points per step among the edges (``points.EDGE_FRACTION``); two seeds, median TRE /
#: Dice: phantom breathing 2.43 / 0.908 -> 2.21 / 0.915, phantom inter Dice 0.826 -> 0.829, chest 0.31 /
#: 0.990 -> 0.30 / 0.990, abdomen 0.41 / 0.939 -> 0.42 / 0.941, seconds within the machine's noise. The
#: same number of extra uniform points left the phantoms as they were (2.43 / 0.907): the edges, not the
#: count, do it. Taken from the uniform 2^15 instead of added, they cost the abdomen 0.41 -> 0.44 mm.
#: "auto"'s coarser levels then went from 20 to 10 steps (session 20, two seeds each, median TRE mm / Dice):
#: abdomen 0.42 / 0.939 -> 0.43 / 0.940, chest 0.26 -> 0.25, phantom breathing 2.19 / 0.915 -> 2.07 / 0.914,
#: phantom inter-subject Dice 0.878 either way in 0.3 s less, thick slices, cropped and 10 deg + 15 mm unchanged
#: (0.36, 0.26, 0.26 mm), 0.05-0.1 s less elsewhere.
#: Its finest level then went from 40 to 30 steps (session 21, with 3 squarings, two seeds each, median TRE mm /
#: Dice / seconds): abdomen at 3 mm 0.43 / 0.940 / 1.8 -> 0.45 / 0.937 / 1.6 (ANTs SyN, the fastest
#: optimiser, 5.3 s: 0.34x -> 0.30x), phantom breathing 2.04 / 0.914 / 1.3 -> 2.05 / 0.913 / 1.0 (ANTs 3.7 s),
#: chest at 2 mm 0.25 -> 0.28, native 0.25 -> 0.28, thick slices 0.35 -> 0.38, cropped 0.26 -> 0.29,
#: 10 deg + 15 mm 0.26 -> 0.28 in 0.85x the seconds, phantom inter-subject Dice 0.876 -> 0.874 in 3.0 -> 2.4 s.
#: Every case still at about half the best optimiser's TRE (Greedy: chest 0.59, abdomen 0.83 mm); where
#: the last 10 % of accuracy is worth 20 % more time, ``"accurate"`` keeps the 40 steps.
_AUTO = StepPreset(max_steps=30, coarse_steps=10, sample_voxels=2 ** 15, edge_voxels=2 ** 14, similarity="mind_ncc")
STEP_PRESETS = {"auto": _AUTO,
                "fast": replace(_AUTO, max_steps=20, edge_voxels=0, similarity="mind"),
                "accurate": replace(_AUTO, max_steps=40)}
#: "mind_ncc": MIND-SSC plus the locally standardised intensity (``similarity.local_standardise``,
#: a 5-voxel window, weight 1) as a 13th channel, an LNCC-like term that can be read point by point.
#: Two seeds each (bench/vs_optimisers.py, shipped model, "auto" steps), "mind" -> "mind_ncc", median /
#: p95 TRE mm and Dice: real abdomen at 3 mm 0.45 / 4.19 / 0.917 -> 0.43 / 3.10 / 0.937 (Greedy
#: 0.921 on the same pairs); chest at 2 mm 0.33 / 1.02 -> 0.34 / 0.92; thick slices p95 2.08 -> 1.68; phantom inter Dice
#: 0.811 -> 0.822, breathing 0.895 -> 0.906 (median TRE 2.30 -> 2.40). Weight 3 cost the abdomen's
#: median (0.71 mm); a 3- or 11-voxel window did no better. It is not contrast-invariant: for scans
#: whose intensities do not correspond (contrast phases, another modality) use "mind".
INTENSITY_WEIGHT = 1.0
INTENSITY_KERNEL = 5
#: Points per step a sampled level reads among the focus voxels (a named organ can be 1 % of the scan:
#: the uniform sample alone would hold a few hundred of its voxels).
FOCUS_VOXELS = 2 ** 14
#: Extra similarity weight of a focus voxel (see the module docstring).
FOCUS_GAIN = 4.0
#: One fixed sample of this many voxels measures a sampled level's losses (``history``) and the final
#: check, so that start and end are compared on the same points.
CHECK_SAMPLES = 2 ** 17
#: Most sampled voxels of a level coarser than the finest. Its velocity grid is the finest level's,
#: so a quarter of "auto"'s sample holds as many points per unknown as the finest level needs for
#: it: two seeds each, 2^17 -> 2^15 at the coarser levels left median TRE and Dice as they were (real
#: chest 0.34 mm / 0.989, abdomen 0.43 -> 0.44 mm / 0.937 -> 0.938, phantom breathing 2.40 mm / 0.906)
#: and cut 15-20 % of the seconds.
COARSE_LEVEL_SAMPLES = 2 ** 15
#: Squarings of the velocity while it is optimised (its gradient flows through every one); the field
#: handed back is integrated with ``integration_steps`` (the model's 7), so ``steps=0`` returns the
#: network's own field. The optimised velocity is smooth and small per squaring: two seeds each, 5
#: squarings throughout instead of 7 left median TRE and Dice as they were (real chest 0.31 mm / 0.991,
#: abdomen 0.41 mm / 0.938, phantom breathing 2.43 mm / 0.908) in 5-10 % fewer seconds
#: (docs/experiments/refine_speed/, section 2). 3 instead of 5 (session 21, two seeds each, "auto"): chest
#: at 2 mm 0.25 mm / 0.992, abdomen 0.43 mm / 0.940, phantom breathing 2.07 -> 2.04 mm / 0.914, phantom
#: inter-subject Dice 0.878 -> 0.876 (six seeds on the 8 mm grid: 0.851 -> 0.850); the 8 mm velocity grid's
#: squarings, forward and backward, 37 -> 22 ms a step (48^3), inter-subject pairs 3.6 -> 3.0 s. Then 2
#: (30 finest steps, four seeds, 3 -> 2 -> 1): phantom inter-subject Dice 0.841 -> 0.841 -> 0.838, breathing
#: 1.90 / 0.915 -> 1.89 / 0.914 -> 1.92 / 0.914, 10 deg + 15 mm chest 0.28 mm throughout; two seeds: chest
#: at 2 mm 0.28, abdomen 0.45 mm either way; inter-subject pairs about 0.2 s faster.
OPTIMISATION_SQUARINGS = 2


@dataclass
class RefineResult:
    velocity: torch.Tensor       # [1,3,...] voxel units of the grid it lives on (half the finest level used)
    displacement: torch.Tensor   # [1,3,D,H,W] voxels of the `fixed` grid passed in, exp(velocity) resized
    history: list[dict] = field(default_factory=list)  # per level: spacing/shape, steps, losses, seconds
    #: the final check: which field was kept ("optimised" or "start") and the loss of each
    check: dict = field(default_factory=dict)


def smoothness_weight(smoothness: float, similarity: str = "lncc") -> float:
    """Regulariser weight of a smoothness in [0, 1]: log-linear over ``SMOOTHNESS_RANGE[similarity]``."""
    lo, hi = SMOOTHNESS_RANGE[similarity]
    return float(math.exp(math.log(lo) + float(smoothness) * (math.log(hi) - math.log(lo))))


def level_shape(shape, factor: int) -> tuple[int, ...]:
    return tuple(max(4, math.ceil(n / factor)) for n in shape)


def _resample(x: torch.Tensor | None, shape) -> torch.Tensor | None:
    """Area-average an image or mask onto a coarser grid over the same extent (a plain average pool
    where the grids divide: 13 chest descriptor channels to half size, 65 -> 39 ms)."""
    if x is None or tuple(x.shape[2:]) == tuple(shape):
        return x
    factor = x.shape[2] // shape[0]
    if all(n == m * factor for n, m in zip(x.shape[2:], shape)):
        return F.avg_pool3d(x.float(), factor)
    return F.interpolate(x.float(), size=tuple(shape), mode="area")


def rigidity_penalty(displacement: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of |J^T J - I|_F^2 with J = I + grad u: zero exactly where u is locally a rotation."""
    grads = [torch.stack(torch.gradient(displacement[:, c], dim=(1, 2, 3)), dim=-1) for c in range(3)]
    jac = torch.stack(grads, dim=-2) + torch.eye(3, device=displacement.device, dtype=displacement.dtype)
    strain = jac.transpose(-1, -2) @ jac - torch.eye(3, device=displacement.device, dtype=displacement.dtype)
    per_voxel = strain.pow(2).sum((-1, -2))                                  # [1,D,H,W]
    w = weight[:, 0]
    return (per_voxel * w).sum() / w.sum().clamp(min=1e-6)


def soft_dice_loss(fixed_masks: torch.Tensor, warped_masks: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the structures present in either map."""
    dims = (0, 2, 3, 4)
    inter = (fixed_masks * warped_masks).sum(dims)
    total = fixed_masks.sum(dims) + warped_masks.sum(dims)
    present = total > 0
    if not present.any():
        return fixed_masks.new_zeros(())
    return 1.0 - (2.0 * inter[present] / total[present]).mean()


def _pool_exact(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average over blocks of ``factor`` voxels, the last incomplete block of each axis left out: level
    voxel a is exactly the mean of voxels factor * a .. factor * a + factor - 1 (an area resize to a
    size the grid does not divide would average windows of uneven width, a jitter of up to half a voxel)."""
    if factor == 1:
        return x
    short = [max(0, factor - n) for n in x.shape[2:]]     # a side thinner than one block: its edge repeated
    if any(short):
        x = F.pad(x.float(), (0, short[2], 0, short[1], 0, short[0]), mode="replicate")
    keep = [n - n % factor for n in x.shape[2:]]
    return F.avg_pool3d(x[..., :keep[0], :keep[1], :keep[2]].float(), factor)


def _level_map(to_moving: torch.Tensor, fixed_shape, fixed_level, factor: int) -> torch.Tensor:
    """``to_moving`` (voxels of the full fixed grid -> voxels of the full moving grid) between the fixed
    level's grid (``_resample``: centres over the same extent, align_corners=False) and the moving
    level's (``_pool_exact``: voxel a at full voxel factor * a + (factor - 1) / 2)."""
    def centres(scale):   # level voxel -> full voxel: x = (a + 0.5) * scale - 0.5
        scale = torch.as_tensor(scale, dtype=torch.float64)
        out = torch.eye(4, dtype=torch.float64)
        out[:3, :3] = torch.diag(scale)
        out[:3, 3] = 0.5 * scale - 0.5
        return out
    fixed_scale = [n / m for n, m in zip(fixed_shape, fixed_level)]
    return torch.linalg.inv(centres([float(factor)] * 3)) @ to_moving @ centres(fixed_scale)


class _MovingReader:
    """Dense reads of a level's moving image at x + u(x), x a voxel of the fixed level: through
    ``SpatialTransformer`` when both share a grid, else through ``to_moving`` (4x4, on the images'
    device and dtype) into the moving scan's own grid (the image is interpolated once, where the
    composed mapping lands). The voxel grid x is the transformer's own cached one."""

    def __init__(self, warp: SpatialTransformer, to_moving: torch.Tensor | None):
        self.warp, self.to_moving = warp, to_moving

    def __call__(self, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        if self.to_moving is None:
            return self.warp(image, displacement)
        fixed_voxels = self.warp.linear.get_reference_grid(displacement) + displacement        # x + u
        moved = torch.einsum("ij,bjdhw->bdhwi", self.to_moving[:3, :3], fixed_voxels) + self.to_moving[:3, 3]
        size = torch.tensor([max(n - 1, 1) for n in image.shape[2:]], device=moved.device, dtype=moved.dtype)
        grid = (moved * 2 / size - 1).flip(-1)
        return grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _descriptor(image: torch.Tensor, similarity: str, intensity_weight: float = INTENSITY_WEIGHT) -> torch.Tensor:
    """MIND-SSC of an image [1,1,D,H,W]; for "mind_ncc" with the weighted standardised intensity appended
    (built in one tensor: concatenating copied 13 full-size channels, 0.17 s of 0.56 s on a 2 mm chest)."""
    if similarity != "mind_ncc":
        return mind_ssc(image)
    out = image.new_empty(image.shape[0], 13, *image.shape[2:])
    mind_ssc(image, out=out[:, :12])
    out[:, 12:] = local_standardise(image, INTENSITY_KERNEL).mul_(intensity_weight)
    return out


def _start_on(start: torch.Tensor | None, vel_shape, like: torch.Tensor) -> torch.Tensor:
    """The starting velocity (the network's, else zero) on a level's velocity grid."""
    return resize_field(start, vel_shape) if start is not None else like.new_zeros(1, 3, *vel_shape)


@dataclass
class _Scans:
    """What every level is cut from: both images on the grids passed in, the optional masks (on the fixed
    grid), and, once a level asks for them, the MIND-SSC descriptors of both images (made once)."""
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_to_moving: torch.Tensor | None = None
    fixed_masks: torch.Tensor | None = None
    moving_masks: torch.Tensor | None = None
    rigid_mask: torch.Tensor | None = None
    coverage: torch.Tensor | None = None
    focus: torch.Tensor | None = None
    region: torch.Tensor | None = None
    features: tuple | None = None

    def descriptors(self, similarity: str, intensity_weight: float) -> tuple:
        if self.features is None:
            self.features = tuple(_descriptor(x, similarity, intensity_weight) for x in (self.fixed, self.moving))
        return self.features


class _LevelLoss:
    """One pyramid level's images, masks and samples, and the loss of a velocity on them (the module
    docstring's loss): ``loss(p)`` -> (total, similarity) on the level's fixed check sample (or its dense
    grid), ``loss(p, *loss.draw())`` on a new sample, as every Adam step does.

    ``sample`` (None: the level is dense) is how many voxels a step reads uniformly, ``edge_voxels`` how many
    more among the fixed image's edges. ``release_features``: this is the last level that needs the
    full-size descriptors, so the scans' copies are let go before the level's channels-last ones are made
    (at most three full-size descriptors at once: a 512^2 x 400 pair's peak memory)."""

    def __init__(self, scans: _Scans, factor: int, shape, *, integrate: VelocityIntegrator, warp: SpatialTransformer,
                 similarity: str, lam: float, lncc_kernel: int, intensity_weight: float, dice_weight: float,
                 rigid_weight: float, focus_gain: float, sample: int | None, edge_voxels: int,
                 release_features: bool):
        self.shape, self.integrate, self.warp = tuple(shape), integrate, warp
        self.lam, self.lncc_kernel, self.dice_weight, self.rigid_weight = lam, lncc_kernel, dice_weight, rigid_weight
        self.sample, self.edge_voxels = sample, int(edge_voxels)
        fixed, device = scans.fixed, scans.fixed.device
        # The moving scan's own grid is pooled exactly (its size is the scan's, not a multiple of the factor).
        moving_level = (lambda x: _resample(x, shape)) if scans.fixed_to_moving is None else \
            (lambda x: _pool_exact(x, factor))
        self.f_l, self.m_l = _resample(fixed, shape), moving_level(scans.moving)
        self.to_moving = None if scans.fixed_to_moving is None else \
            _level_map(scans.fixed_to_moving, fixed.shape[2:], shape, factor).float().to(device)
        self.moved = _MovingReader(warp, self.to_moving)
        # A fixed mask, not one warped with the moving scan (warped, the optimiser could lower the loss
        # by pushing badly matching voxels out of it), eroded by the LNCC window (a window reaching past
        # the moving scan's edge sees its padding).
        mask = None if scans.coverage is None else \
            (box_filter(_resample(scans.coverage, shape), lncc_kernel) > 0.999).float()
        if scans.region is not None:   # the user's masks: voxel by voxel, not eroded (ANTs' and elastix's rule)
            region = (_resample(scans.region, shape) >= 0.5).float()
            mask = region if mask is None else mask * region
        f_feat = m_feat = None
        if similarity in DESCRIPTORS:
            features = scans.descriptors(similarity, intensity_weight)
            f_feat, m_feat = _resample(features[0], shape), moving_level(features[1])
            del features
        # Any level voxel the region touches is in it (a small organ must not vanish at a coarse level).
        focus_l = None if scans.focus is None else _resample(scans.focus, shape) > 0
        if focus_l is not None and mask is not None:
            focus_l &= mask > 0
        if focus_l is not None and not bool(focus_l.any()):
            focus_l = None                # the region lies outside the moving scan's coverage: nothing to favour
        self.points = self.sampler = self.focus_sampler = self.focus_points = None
        self.focus_weight = 0.0
        if sample is not None and (mask is None or bool(mask.any())):
            inside = None if mask is None else mask > 0
            self.sampler = PointSampler(shape, inside, device,                    # a new sample per step
                                        edge_mask(self.f_l, inside) if edge_voxels else None)
            self.points = self.sampler.fixed(CHECK_SAMPLES)                  # the fixed sample losses are reported on
            if focus_l is not None:
                self.focus_sampler = PointSampler(shape, focus_l, device)
                self.focus_points = self.focus_sampler.fixed(min(CHECK_SAMPLES, self.focus_sampler.count))
                # the focus's weight next to the whole level's: gain x its share of the level
                self.focus_weight = focus_gain * self.focus_sampler.count / (self.sampler.count or 1)
            if release_features:
                scans.features = None
            # Channels last: the descriptor's values read at a corner share a cache line (3x faster on a CPU).
            f_feat = f_feat.contiguous(memory_format=torch.channels_last_3d)
            m_feat = m_feat.contiguous(memory_format=torch.channels_last_3d)
            mask = None            # the points lie inside it
        elif focus_l is not None:
            mask = (1 + focus_gain * focus_l.float()) * (1 if mask is None else mask)   # a weighted mean
        self.f_feat, self.m_feat, self.mask, self.focus_l = f_feat, m_feat, mask, focus_l
        self.fm_l, self.mm_l = (None, None) if scans.fixed_masks is None else \
            (_resample(scans.fixed_masks, shape), _resample(scans.moving_masks, shape))
        # Every coarse voxel that touches the structure is held rigid: its boundary must not be
        # averaged into a half-weight seam that the upsampled field then bends.
        self.rigid_l = None if scans.rigid_mask is None else (_resample(scans.rigid_mask, shape) > 0.01).float()

    def draw(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One step's points: a new sample (and one among the focus voxels), or (None, None) on a dense level."""
        if self.sampler is None:
            return None, None
        return (self.sampler.draw(self.sample, self.edge_voxels),
                None if self.focus_sampler is None else self.focus_sampler.draw(FOCUS_VOXELS))

    def __call__(self, p: torch.Tensor, at: torch.Tensor | None = None,
                 at_focus: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Total and similarity losses of velocity ``p``; a sampled level reads them at points ``at`` and, with
        a focus, ``at_focus`` among its voxels (default: the fixed check samples)."""
        if self.points is not None:
            at = self.points if at is None else at
            if self.focus_points is not None:
                at_focus = self.focus_points if at_focus is None else at_focus
                at = torch.cat([at, at_focus])
            moved = warp_at(self.m_feat, at, field_at(self.integrate(p), at, self.shape), self.to_moving)
            distance = (values_at(self.f_feat, at) - moved).pow(2).mean(1)
            if self.focus_points is None:
                sim = distance.mean()
            else:                      # the dense weighted mean, from the two samples
                n_focus = len(at_focus)
                sim = (distance[:-n_focus].mean() + self.focus_weight * distance[-n_focus:].mean()) \
                    / (1 + self.focus_weight)
            return sim + self.lam * gradient_l2(p).sum(), sim
        disp = resize_field(self.integrate(p), self.shape)
        if self.f_feat is not None:
            sim = mind_loss(self.f_feat, self.moved(self.m_feat, disp), mask=self.mask)
        else:
            sim = lncc_loss(self.f_l, self.moved(self.m_l, disp), kernel=self.lncc_kernel, eps=LNCC_EPS, mask=self.mask)
        total = sim + self.lam * gradient_l2(p).sum()
        if self.fm_l is not None:
            total = total + self.dice_weight * soft_dice_loss(self.fm_l, self.warp(self.mm_l, disp))
        if self.rigid_l is not None:
            total = total + self.rigid_weight * rigidity_penalty(disp, self.rigid_l)
        return total, sim

    def record(self) -> dict:
        """What the level's history entry says of its sampling."""
        sampled = self.points is not None
        return {"sampled_voxels": self.sample if sampled else None, "edge_voxels": self.edge_voxels if sampled else None,
                "focus_voxels": None if self.focus_l is None else int(self.focus_l.sum())}


def _optimise_level(loss: _LevelLoss, param: torch.Tensor, n_steps: int, lr: float, check_every: int,
                    min_improvement: float, progress: Callable[[int], None] | None) -> int:
    """Adam on ``param`` for at most ``n_steps``, a new sample per step; stops when the loss, averaged over
    windows of ``check_every`` steps, improves by less than ``min_improvement`` (relative). Returns the steps
    taken; ``progress(step, loss)`` after each."""
    optimizer = torch.optim.Adam([param], lr=lr)
    # Adam moves every voxel by about lr per step whatever its gradient; decaying the rate lets
    # the field settle instead of ending on that noise (which shows as det J ripples).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps, eta_min=0.1 * lr)
    window, previous, run = [], None, 0
    for step in range(n_steps):
        total, _ = loss(param, *loss.draw())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        run += 1
        value = float(total.detach())
        if progress is not None:
            progress(step, value)
        window.append(value)
        if len(window) == check_every:
            mean = sum(window) / len(window)
            if previous is not None and previous - mean < min_improvement * abs(previous):
                break
            previous, window = mean, []
    return run


def _auto_steps(shapes, device: torch.device, preset: StepPreset) -> list[int]:
    """Spread the voxel-step budget over the levels, coarse to fine; the finest levels it cannot afford
    AUTO_MIN_STEPS steps of (after the coarser ones took theirs, at most the preset's) are left out."""
    lo = AUTO_MIN_STEPS
    budget = AUTO_BUDGET["cuda" if device.type == "cuda" else "cpu"]
    sizes = [math.prod(s) for s in shapes]
    for n_active in range(len(shapes), 0, -1):
        plan, left = [0] * len(shapes), budget
        for k in range(n_active):         # what a capped level leaves goes finer
            hi = preset.max_steps if k == n_active - 1 else preset.coarse_steps
            plan[k] = int(max(lo, min(hi, left / (n_active - k) / sizes[k])))
            left -= plan[k] * sizes[k]
        if n_active == 1 or left >= -1e-6 * budget:
            return plan
    return plan


def _skip_redundant_levels(plan: list[int], sampled: list[bool], vel_shapes) -> list[int]:
    """A preset's plan without the sampled levels between the first and the finest that optimise the
    finest level's own velocity grid: on blurred copies of the images the finest level then reads,
    they added seconds and no accuracy. Two seeds each (bench/vs_optimisers.py), median TRE mm /
    Dice / seconds, all levels -> first and finest: real chest at 2 mm 0.30 / 0.991 / 4.4 -> 0.30 /
    0.991 / 3.6; abdomen at 3 mm 0.41 / 0.941 / 3.1 -> 0.43 / 0.943 / 2.5; phantom breathing 2.15 /
    0.916 / 2.7 -> 2.20 / 0.916 / 2.3; thick slices, partial field of view and 10 deg + 15 mm
    unchanged (0.40, 0.32, 0.29 mm) in 0.75x the seconds. Without the first level too, the abdomen's
    p95 TRE rose 2.7 -> 3.3 mm."""
    finest = max((i for i, n in enumerate(plan) if n > 0), default=-1)
    if finest < 0 or not sampled[finest]:
        return plan
    return [0 if 0 < i < finest and sampled[i] and tuple(vel_shapes[i]) == tuple(vel_shapes[finest]) else n
            for i, n in enumerate(plan)]


def step_preset(steps) -> StepPreset:
    """The preset a ``steps=`` value names ("auto"'s for a number of steps)."""
    if not isinstance(steps, str):
        return STEP_PRESETS["auto"]
    if steps not in STEP_PRESETS:
        raise InputError(f"refine steps must be one of {', '.join(STEP_PRESETS)} or a number, got {steps!r}")
    return STEP_PRESETS[steps]


def _plan_steps(steps, shapes, device: torch.device) -> list[int]:
    if isinstance(steps, str):
        return _auto_steps(shapes, device, step_preset(steps))
    if isinstance(steps, (list, tuple)):
        if len(steps) != len(shapes) or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0
                                            for n in steps):
            raise InputError(f"refine steps per level must be {len(shapes)} whole numbers >= 0, got {steps!r}")
        return [int(n) for n in steps]
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise InputError(f"refine steps must be one of {', '.join(STEP_PRESETS)} or a whole number >= 0, "
                         f"got {steps!r}")
    # A total budget split evenly over the levels (early stopping may leave some unspent).
    steps = int(steps)
    share = [steps // len(shapes)] * len(shapes)
    for i in range(steps - sum(share)):
        share[i] += 1
    return share


def _check(fixed, moving, velocity, fixed_masks, moving_masks, rigid_mask, moving_coverage, similarity, levels,
           smoothness, focus=None, own_grids: bool = False, region=None) -> None:
    if similarity not in SIMILARITIES:
        raise InputError(f"refine similarity must be one of {', '.join(SIMILARITIES)}; got {similarity!r}")
    if fixed.dim() != 5 or fixed.shape[:2] != (1, 1) or moving.dim() != 5 or moving.shape[:2] != (1, 1) \
            or (fixed.shape != moving.shape and not own_grids):
        raise InputError(f"refine needs fixed and moving as [1,1,D,H,W] on one grid (or fixed_to_moving), got "
                         f"{tuple(fixed.shape)} and {tuple(moving.shape)}")
    if velocity is not None and (velocity.dim() != 5 or velocity.shape[:2] != (1, 3)):
        raise InputError(f"initial velocity must be [1,3,d,h,w], got {tuple(velocity.shape)}")
    if (fixed_masks is None) != (moving_masks is None):
        raise InputError("refine needs label masks for both scans or for neither")
    if fixed_masks is not None and (fixed_masks.shape != moving_masks.shape
                                    or fixed_masks.shape[2:] != fixed.shape[2:]):
        raise InputError(f"fixed and moving masks must be [1,K,D,H,W] on the image grid, got "
                         f"{tuple(fixed_masks.shape)} and {tuple(moving_masks.shape)}")
    if moving_coverage is not None and moving_coverage.shape != fixed.shape:
        raise InputError(f"moving coverage must be [1,1,D,H,W] like the images, got {tuple(moving_coverage.shape)}")
    if region is not None and (region.shape != fixed.shape or not bool((region > 0).any())):
        raise InputError(f"region must be a non-empty [1,1,D,H,W] mask like the images, got {tuple(region.shape)}")
    if rigid_mask is not None and rigid_mask.shape != fixed.shape:
        raise InputError(f"rigid mask must be [1,1,D,H,W] like the images, got {tuple(rigid_mask.shape)}")
    if focus is not None and (focus.shape != fixed.shape or not bool((focus > 0).any())):
        raise InputError(f"focus must be a non-empty [1,1,D,H,W] mask like the images, got {tuple(focus.shape)}"
                         + ("" if focus.shape != fixed.shape else " with no voxel in it"))
    if not levels or any(int(f) != f or f < 1 for f in levels):
        raise InputError(f"refine levels must be downsampling factors >= 1, got {levels!r}")
    if not 0.0 <= float(smoothness) <= 1.0:
        raise InputError(f"smoothness must lie in [0, 1], got {smoothness}")


def refine_velocity(fixed: torch.Tensor, moving: torch.Tensor, velocity: torch.Tensor | None = None, *,
                    smoothness: float, spacing_mm: float, levels=(4, 2, 1), steps="auto", similarity: str = "lncc",
                    fixed_masks: torch.Tensor | None = None, moving_masks: torch.Tensor | None = None,
                    rigid_mask: torch.Tensor | None = None, moving_coverage: torch.Tensor | None = None,
                    focus: torch.Tensor | None = None, focus_gain: float | None = None,
                    fixed_to_moving=None, region: torch.Tensor | None = None,
                    rigid_weight: float = 10.0, dice_weight: float = 1.0,
                    intensity_weight: float = INTENSITY_WEIGHT,
                    lr: float = 0.1, lncc_kernel: int = 7, integration_steps: int = 7,
                    min_improvement: float = 2e-3, check_every: int = 10, velocity_factor: int = 2,
                    sample_voxels: int | None = None, edge_voxels: int | None = None,
                    progress: Callable[[int, int, float], None] | None = None) -> RefineResult:
    """Optimise a velocity for this pair, coarse to fine; see the module docstring for the loss.

    ``steps``: a preset of ``STEP_PRESETS`` (``"auto"``: a voxel-step budget, ``AUTO_BUDGET``, a 128^3
    CPU run in seconds; ``"fast"``: fewer steps; ``"accurate"``: more), a total number of Adam steps split
    over the levels (at most; early stopping may use fewer), or a list with one number per level.
    ``moving_coverage`` [1,1,D,H,W] (1 where the moving scan has data, on this grid): the similarity
    is measured only there (a partial field of view; beyond it the moving scan is padding air).
    ``lr``: Adam step in voxels of each level's velocity grid. ``progress(level_index, step, loss)``
    is called after every step. ``intensity_weight``: the standardised intensity's weight in "mind_ncc"
    (``INTENSITY_WEIGHT`` by default). ``sample_voxels``: the finest MIND level, when larger, reads a new
    random sample of this many of its voxels at every step, coarser ones at most ``COARSE_LEVEL_SAMPLES``
    (None: the preset's, "auto"'s for a number of steps; 0: every voxel). ``edge_voxels``: sampled
    levels also read this many among their edges at every step (None: the preset's). ``focus``
    [1,1,D,H,W] (1 in the region that matters most, on this grid) and ``focus_gain`` (None:
    ``FOCUS_GAIN``): see the module docstring. ``region`` [1,1,D,H,W] (1 where the similarity may look, the
    user's fixed and moving masks on this grid): like ``moving_coverage``, but not eroded.
    ``fixed_to_moving`` (4x4, voxel indices (d, h, w) of
    ``fixed``'s grid -> those of ``moving``'s): ``moving`` lies on its own grid (any shape) and is read
    through this map (a pre-alignment composed in: the scan is interpolated once, where the whole
    mapping lands, not resampled through the alignment first and warped again); the masks stay on
    the fixed grid.
    """
    _check(fixed, moving, velocity, fixed_masks, moving_masks, rigid_mask, moving_coverage, similarity, levels,
           smoothness, focus, fixed_to_moving is not None, region)
    if sample_voxels is None:
        sample_voxels = step_preset(steps).sample_voxels
    if edge_voxels is None:
        edge_voxels = step_preset(steps).edge_voxels
    if focus_gain is None:
        focus_gain = FOCUS_GAIN
    device = fixed.device
    fixed, moving = fixed.float(), moving.float()
    if fixed_to_moving is not None:
        fixed_to_moving = torch.as_tensor(fixed_to_moving, dtype=torch.float64).cpu()
    integrate = VelocityIntegrator(min(integration_steps, OPTIMISATION_SQUARINGS)).to(device)
    warp = SpatialTransformer().to(device)
    lam = smoothness_weight(smoothness, similarity)
    shapes = [level_shape(fixed.shape[2:], int(f)) for f in levels]
    use_dice = fixed_masks is not None and dice_weight > 0
    use_rigid = rigid_mask is not None and rigid_weight > 0
    # The finest level gets the whole sample; the coarser ones, which optimise the same velocity grid
    # on blurred images, at most COARSE_LEVEL_SAMPLES of it.
    samples = [int(sample_voxels) if i == len(shapes) - 1 else min(int(sample_voxels), COARSE_LEVEL_SAMPLES)
               for i in range(len(shapes))]
    sampled = [bool(sample_voxels) and similarity in DESCRIPTORS and not (use_dice or use_rigid)
               and math.prod(shape) > n for shape, n in zip(shapes, samples)]
    plan = _plan_steps(steps, [(n,) if s else shape for shape, s, n in zip(shapes, sampled, samples)], device)
    vel_shapes = [level_shape(fixed.shape[2:], max(2 * int(f), int(velocity_factor))) for f in levels]
    if isinstance(steps, str):
        plan = _skip_redundant_levels(plan, sampled, vel_shapes)
    v = None if velocity is None else velocity.detach().float().to(device)
    initial = v
    if not use_dice:
        fixed_masks = moving_masks = None
    if not use_rigid:
        rigid_mask = None
    scans = _Scans(fixed, moving, fixed_to_moving, *(None if m is None else m.detach().float().to(device) for m in (
        fixed_masks, moving_masks, rigid_mask, moving_coverage, focus, region)))
    history, check = [], {}
    last_level = max((i for i, n in enumerate(plan) if n > 0), default=-1)  # where the final check is taken

    for index, (factor, shape, n_steps) in enumerate(zip(levels, shapes, plan)):
        if n_steps <= 0:
            continue
        start = time.perf_counter()
        vel_shape = vel_shapes[index]
        loss = _LevelLoss(scans, int(factor), shape, integrate=integrate, warp=warp, similarity=similarity, lam=lam,
                          lncc_kernel=lncc_kernel, intensity_weight=intensity_weight, dice_weight=dice_weight,
                          rigid_weight=rigid_weight, focus_gain=focus_gain,
                          sample=samples[index] if sampled[index] else None, edge_voxels=edge_voxels,
                          release_features=index == last_level)
        param = (resize_field(v, vel_shape) if v is not None else fixed.new_zeros(1, 3, *vel_shape)).clone()
        param.requires_grad_(True)
        with torch.no_grad():
            first = tuple(float(x) for x in loss(param))
        run = _optimise_level(loss, param, n_steps, lr, check_every, min_improvement,
                              None if progress is None else (lambda step, value, i=index: progress(i, step, value)))
        with torch.no_grad():
            total, sim = loss(param)
            if index == last_level:   # the final check (below): the start against the result, here
                start_loss = loss(_start_on(initial, vel_shape, param))[0]
                check = {"loss_optimised": float(total), "loss_start": float(start_loss)}
        v = param.detach()
        history.append({"level": int(factor), "spacing_mm": float(spacing_mm) * int(factor), "shape": list(shape),
                        "velocity_shape": list(vel_shape), **loss.record(),
                        "steps": run, "loss_start": first[0],
                        "loss_end": float(total), "similarity_start": first[1], "similarity_end": float(sim),
                        "seconds": time.perf_counter() - start})

    if v is None:  # nothing to optimise and no start: the identity
        v = fixed.new_zeros(1, 3, *(max(2, math.ceil(n / 2)) for n in fixed.shape[2:]))
    elif history:
        # Never hand back a field the optimiser's own loss (similarity and regularisers, at the finest
        # level optimised) scores worse than its start: a coarse level sees too little to be trusted.
        # On a phantom breathing pair at 4 mm a 32 mm level slid a steering-tuned network's field by
        # 28 mm on average and the finer levels only polished that (organ Dice 0.82 -> 0.32).
        check["kept"] = "start" if check["loss_start"] < check["loss_optimised"] else "optimised"
        if check["kept"] == "start":
            v = _start_on(initial, v.shape[2:], v)
    with torch.no_grad():
        displacement = resize_field(VelocityIntegrator(integration_steps).to(device)(v), fixed.shape[2:])
    return RefineResult(velocity=v, displacement=displacement, history=history, check=check)
