"""Controller: condition vector + instance feature -> kernels of one level's dynamic head.

The instance feature is GroupNorm + ReLU + global average pooling of the level's decoder
features, so the head adapts to the pair as well as to the prompt. The output layer starts at
zero weight with its bias holding a working base head: training starts from a plain network
and learns how conditions should bend it.

The condition-dependent part is scaled by 1/hidden: each generated kernel entry sums ``hidden``
weights, and with Adam every weight moves by about the learning rate per step, so unscaled the
generated kernels would move ``hidden`` times faster than an ordinary layer and training turns
chaotic (the network then settles on a near-zero field). ``gain`` (``UniRegConfig.controller_gain``)
replaces 1/hidden: at 1/128 the conditions learned ~100x slower than the base head and naming an
organ moved the trained field by < 0.6 mm; at 0.09 a fine-tune made it move by up to 3.4 mm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dynamic_head import DynamicHead


class Controller(nn.Module):
    def __init__(self, condition_dim: int, feature_channels: int, hidden: int, head: DynamicHead,
                 gain: float | None = None):
        super().__init__()
        groups = next(g for g in (8, 4, 2, 1) if feature_channels % g == 0)
        self.instance = nn.Sequential(nn.GroupNorm(groups, feature_channels), nn.ReLU(),
                                      nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(condition_dim + feature_channels, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, head.num_params)
        self.scale = 1.0 / hidden if gain is None else float(gain)
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.copy_(head.base_params())

    @torch.no_grad()
    def set_gain(self, gain: float) -> None:
        """Change how fast conditions bend the kernels during training, keeping today's kernels:
        the weights are rescaled so that ``weight * scale`` is unchanged."""
        self.out.weight.mul_(self.scale / float(gain))
        self.scale = float(gain)

    def forward(self, condition: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        hidden = self.mlp(torch.cat([condition, self.instance(features)], dim=1))
        return F.linear(hidden, self.out.weight * self.scale, self.out.bias)
