"""Dynamic deformation head: per-sample 1x1x1 convolutions whose weights come from the controller.

DoDNet's idea applied to registration: the same decoder features give different velocity
increments for different prompts because the head itself changes per sample.
Layers: C -> hidden -> hidden -> 3 with LeakyReLU between them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class DynamicHead:
    """Parameter layout of one head and its application; holds no weights of its own."""

    def __init__(self, in_channels: int, hidden: int = 8, out_channels: int = 3):
        self.shapes = [(hidden, in_channels), (hidden, hidden), (out_channels, hidden)]

    @property
    def num_params(self) -> int:
        return sum(o * i + o for o, i in self.shapes)

    def base_params(self) -> torch.Tensor:
        """A working plain head (Kaiming init, small last layer) flattened like the controller output."""
        chunks = []
        for k, (o, i) in enumerate(self.shapes):
            w = torch.empty(o, i)
            if k == len(self.shapes) - 1:
                nn.init.normal_(w, std=1e-2)
            else:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            chunks += [w.flatten(), torch.zeros(o)]
        return torch.cat(chunks)

    def __call__(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """features [B,C,D,H,W], params [B, num_params] -> [B,3,D,H,W]."""
        b, _, *spatial = features.shape
        x = features.flatten(2)                                   # [B, C, N]
        offset = 0
        for k, (o, i) in enumerate(self.shapes):
            w = params[:, offset:offset + o * i].view(b, o, i)
            offset += o * i
            bias = params[:, offset:offset + o].view(b, o, 1)
            offset += o
            x = torch.baddbmm(bias, w, x)
            if k < len(self.shapes) - 1:
                x = F.leaky_relu(x, 0.2)
        return x.view(b, -1, *spatial)
