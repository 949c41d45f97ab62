"""Training losses: LNCC image similarity, Dice on prompted organs, gradient smoothness.

MONAI provides LNCC and soft Dice; the smoothness term is computed per sample because its
weight is a per-sample condition (the prompt's smoothness).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from monai.losses import DiceLoss, LocalNormalizedCrossCorrelationLoss


def gradient_l2(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a [B,3,D,H,W] field, per sample -> [B]."""
    terms = []
    for dim in (2, 3, 4):
        diff = field.diff(dim=dim)
        terms.append(diff.pow(2).flatten(1).mean(1))
    return sum(terms) / 3.0


class RegistrationLoss(nn.Module):
    """similarity_weight * LNCC + dice_weight * Dice(prompted organs) + lambda_i * smoothness."""

    def __init__(self, lncc_kernel: int = 9, similarity_weight: float = 1.0, dice_weight: float = 1.0,
                 smoothness_scale: float = 1.0):
        super().__init__()
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=lncc_kernel,
                                                        kernel_type="rectangular", reduction="mean")
        self.dice = DiceLoss(reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        self.similarity_weight = similarity_weight
        self.dice_weight = dice_weight
        self.smoothness_scale = smoothness_scale

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, velocity: torch.Tensor,
                smoothness: torch.Tensor, fixed_masks: torch.Tensor | None = None,
                warped_masks: torch.Tensor | None = None, mask_valid: torch.Tensor | None = None) -> dict:
        """Masks [B,K,...] (soft for the warped ones); mask_valid [B,K] marks real organs."""
        similarity = self.lncc(warped.float(), fixed.float())
        smooth = (gradient_l2(velocity.float()) * smoothness.float() * self.smoothness_scale).mean()
        total = self.similarity_weight * similarity + smooth
        out = {"similarity": similarity.detach(), "smoothness": smooth.detach()}
        if fixed_masks is not None and mask_valid is not None and mask_valid.any():
            per = self.dice(warped_masks.float(), fixed_masks.float()).flatten(2).mean(2)  # [B,K]
            dice = (per * mask_valid).sum() / mask_valid.sum()
            total = total + self.dice_weight * dice
            out["dice"] = dice.detach()
        out["loss"] = total
        return out
