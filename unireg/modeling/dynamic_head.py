"""Dynamic deformation head: per-sample 1x1x1 convolutions whose weights come from the controller.

DoDNet's idea applied to registration: the same decoder features give different velocity
increments for different prompts because the head itself changes per sample.
Layers: C -> hidden -> hidden -> 3 with LeakyReLU between them.

The last layer's output is multiplied by a fixed gain. Its weights start tiny (a near-zero
field) and Adam moves every weight by about the learning rate per step, so without a gain the
field needs hundreds of steps just to reach voxel-sized displacements, and with noisy gradients
from many pairs it stays stuck near identity; the gain lets it grow at a useful rate.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class DynamicHead:
    """Parameter layout of one head and its application; holds no weights of its own."""

    def __init__(self, in_channels: int, hidden: int = 8, out_channels: int = 3, output_gain: float = 1.0):
        self.shapes = [(hidden, in_channels), (hidden, hidden), (out_channels, hidden)]
        self.output_gain = output_gain

    @property
    def num_params(self) -> int:
        return sum(o * i + o for o, i in self.shapes)

    def base_params(self) -> torch.Tensor:
        """A working plain head (Kaiming init, small last layer) flattened like the controller output."""
        chunks = []
        for k, (o, i) in enumerate(self.shapes):
            w = torch.empty(o, i)
            if k == len(self.shapes) - 1:
                nn.init.normal_(w, std=1e-2 / self.output_gain)
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
        return (x * self.output_gain).view(b, -1, *spatial)
