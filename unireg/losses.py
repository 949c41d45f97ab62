"""Training losses: prompt-focused LNCC, Dice on the prompted organs, λ-weighted smoothness.

The prompt must matter, so the objective rewards what it names: image similarity is weighted
towards the named organs (a dilated mask of them plus a smaller global weight), the Dice of the
named organs carries a weight that makes them win over the rest of the image, and the
whole-body prompt keeps the global objective (every organ's Dice, uniform similarity). The
smoothness weight is a per-sample condition (HyperMorph-style): λ ∈ [0, 1] maps log-linearly
onto ``smoothness_scale · [SMOOTHNESS_RANGE]`` (or a config's ``loss.smoothness_range``) so ``smooth=``
changes regularity monotonically over two orders of magnitude or more. MONAI provides soft Dice; LNCC is the box-filtered one instance optimisation
uses (``unireg.similarity.lncc_map``): MONAI's has no clamp, and at the small stabiliser
soft tissue needs its float32 cancellation gave losses of -9 where [-1, 0] is the range.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

from .similarity import LNCC_EPS, lncc_map

#: Regulariser weight at λ = 0 and λ = 1 (times ``smoothness_scale``), log-linear in between.
SMOOTHNESS_RANGE = (0.1, 10.0)


def gradient_l2(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a [B,3,D,H,W] field, per sample -> [B]."""
    terms = []
    for dim in (2, 3, 4):
        diff = field.diff(dim=dim)
        terms.append(diff.pow(2).flatten(1).mean(1))
    return sum(terms) / 3.0


def smoothness_weight(lam: torch.Tensor, weight_range=None) -> torch.Tensor:
    """λ in [0, 1] -> regulariser weight, log-linear over ``weight_range`` (default SMOOTHNESS_RANGE)."""
    lo, hi = SMOOTHNESS_RANGE if weight_range is None else weight_range
    return lo * (hi / lo) ** lam.clamp(0.0, 1.0)


def focus_map(fixed_masks: torch.Tensor, warped_masks: torch.Tensor, valid: torch.Tensor,
              dilation: int = 2) -> torch.Tensor:
    """[B,1,...] in {0,1}: the named organs in either scan, dilated so their borders count too."""
    union = torch.maximum(fixed_masks, warped_masks.detach()) * valid[:, :, None, None, None]
    focus = union.amax(dim=1, keepdim=True)
    if dilation:
        focus = F.max_pool3d(focus, 2 * dilation + 1, stride=1, padding=dilation)
    return focus


def point_error(affine: torch.Tensor, target: torch.Tensor, shape, samples: int = 8) -> torch.Tensor:
    """Mean distance [B] in voxels of a grid of ``shape`` between where two affines [B,3,4] (normalised
    coordinates, ``unireg.modeling.affine_head``'s convention) put the points of a ``samples``^3 lattice over
    that grid: the error an affine head is taught with when the motion is known (unlike a matrix norm, it
    weighs a rotation by how far it moves the scan)."""
    axis = (2 * torch.arange(samples, device=affine.device, dtype=affine.dtype) + 1) / samples - 1
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
    difference = affine - target.to(affine.dtype)
    moved = points @ difference[:, :, :3].transpose(1, 2) + difference[:, None, :, 3]    # [B,N,3]
    half = torch.tensor([n / 2 for n in shape], device=affine.device, dtype=affine.dtype)
    return (moved * half).norm(dim=-1).mean(1)


class RegistrationLoss(nn.Module):
    """similarity (focus-weighted LNCC) + dice_weight · Dice(named organs) + w(λ) · smoothness."""

    def __init__(self, lncc_kernel: int = 9, similarity_weight: float = 1.0, dice_weight: float = 1.0,
                 smoothness_scale: float = 1.0, global_weight: float = 0.25, focus_dilation: int = 2,
                 lncc_eps: float = LNCC_EPS, smoothness_range=SMOOTHNESS_RANGE, affine_weight: float = 0.0,
                 map_weight: float = 1.0, map_hidden_organs=(), margin_weight: float = 0.0, margin: float = 0.05):
        super().__init__()
        self.margin_weight, self.margin = margin_weight, margin
        self.affine_weight = affine_weight
        self.map_weight = map_weight
        self.map_hidden_organs = tuple(map_hidden_organs)   # never shown to the organ map (zero-shot organs)
        self.map_dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        self.lncc_kernel, self.lncc_eps = lncc_kernel, lncc_eps
        self.dice = DiceLoss(reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        self.similarity_weight = similarity_weight
        self.dice_weight = dice_weight
        self.smoothness_scale = smoothness_scale
        lo, hi = (float(v) for v in smoothness_range)
        if not 0 < lo < hi:
            raise ValueError(f"loss.smoothness_range must be two weights 0 < low < high, got {list(smoothness_range)}")
        self.smoothness_range = (lo, hi)
        self.global_weight = global_weight
        self.focus_dilation = focus_dilation

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, velocity: torch.Tensor,
                smoothness: torch.Tensor, fixed_masks: torch.Tensor | None = None,
                warped_masks: torch.Tensor | None = None, mask_valid: torch.Tensor | None = None,
                focused: torch.Tensor | None = None, affine: torch.Tensor | None = None,
                affine_target: torch.Tensor | None = None) -> dict:
        """Masks [B,K,...] (soft for the warped ones); ``mask_valid`` [B,K] marks real organs;
        ``focused`` [B] (bool) marks pairs whose prompt names organs (False: whole body, uniform similarity).
        ``affine`` [B,3,4], a model's affine head's output, and ``affine_target``, the known motion, add
        ``affine_weight`` x their mean point error in voxels (``point_error``)."""
        per_voxel = -lncc_map(fixed, warped, self.lncc_kernel, self.lncc_eps)   # [B,1,...], in [-1, 0]
        has_masks = fixed_masks is not None and mask_valid is not None and bool(mask_valid.any())
        if has_masks and focused is not None and bool(focused.any()):
            focus = focus_map(fixed_masks.float(), warped_masks.float(), mask_valid, self.focus_dilation)
            focus = focus * focused.float().view(-1, 1, 1, 1, 1)
            weight = self.global_weight + focus          # named organs: 1 + g, the rest of the image: g
            similarity = ((per_voxel * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)).mean()
        else:
            similarity = per_voxel.mean()
        smooth = (gradient_l2(velocity.float()) * smoothness_weight(smoothness.float(), self.smoothness_range)
                  * self.smoothness_scale).mean()
        total = self.similarity_weight * similarity + smooth
        out = {"similarity": similarity.detach(), "smoothness": smooth.detach()}
        if has_masks:
            per = self.dice(warped_masks.float(), fixed_masks.float()).flatten(2).mean(2)  # [B,K]
            # Mean over each pair's organs, then over pairs: pooled over the batch, a pair prompted with
            # one organ next to a whole-body pair (40+ organs) would get 1/40 of its say.
            counts = mask_valid.sum(1)
            per_pair = (per * mask_valid).sum(1) / counts.clamp(min=1)
            dice = per_pair[counts > 0].mean()
            total = total + self.dice_weight * dice
            out["dice"] = dice.detach()
        if self.affine_weight and affine is not None and affine_target is not None:
            error = self.affine_error(affine, affine_target, fixed.shape[2:])
            total = total + self.affine_weight * error
            out["affine_error"] = error.detach()
        out["loss"] = total
        return out

    def organ_map_error(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A model's organ map (logits [B,1,...]) against the fraction of each of its cells the prompt's organs
        fill ([B,1,...], same grid): BCE for every voxel plus soft Dice so a small organ is not drowned by
        the background."""
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return bce + self.map_dice(logits.float(), target.float()).mean()

    def steering_margin(self, named: torch.Tensor, whole_body: torch.Tensor, fixed_masks: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
        """Hinge on how much better the named organs' warped masks ``named`` [B,K,...] match ``fixed_masks``
        than the whole-body field's ``whole_body`` (no gradient) do: ``relu(margin - (Dice_named - Dice_whole))``
        per valid organ, mean. The rest of the objective never asks the prompt to *differ*; this does."""
        dice_named = 1 - self.dice(named.float(), fixed_masks.float()).flatten(2).mean(2)
        dice_whole = 1 - self.dice(whole_body.float(), fixed_masks.float()).flatten(2).mean(2)
        gap = F.relu(self.margin - (dice_named - dice_whole.detach())) * valid
        return gap.sum() / valid.sum().clamp(min=1)

    @staticmethod
    def affine_error(affine: torch.Tensor, target: torch.Tensor, shape) -> torch.Tensor:
        """The affine head's term before its weight: mean point error in voxels over the batch."""
        return point_error(affine.float(), target.float(), shape).mean()
