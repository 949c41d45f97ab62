"""FiLM on the fusion levels (issue 11 experiment): does naming an organ steer more when the condition also
modulates the decoder features, not only the 1x1x1 dynamic head?

Every model so far moves its field by < 0.25 mm inside an organ when the prompt names it (docs/experiments/
gpu_20261126b). The condition reaches only the dynamic head, a per-voxel map of the finest features; it
cannot choose *where* to act. Here each level's features are also scaled and shifted per channel by the
condition (FiLM, zero-initialised: a pretrained model's outputs are unchanged at step 0), and the modulated
features feed the next level's 3x3x3 convolutions, which can act on where the organ lies.

Nothing in the package changes: this script patches ``UniRegModel`` and then runs the ``unireg`` CLI, so
    python docs/experiments/film_steering/film.py train --config docs/experiments/film_steering/film_steer.yaml
    python docs/experiments/film_steering/film.py eval --model runs/film_steer/export --data ... --steering
train and evaluate the FiLM variant (its exports hold ``film.*`` weights; only this script loads them).
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from unireg.modeling import model as M
from unireg.prompt import Prompt, parse_prompt


def patch() -> None:
    init, load = M.UniRegModel.__init__, nn.Module.load_state_dict

    def __init__(self, config, embedder=None):
        init(self, config, embedder)
        self.film = nn.ModuleList(nn.Linear(self.condition.out_dim, 2 * c) for c in config.decoder_channels)
        for layer in self.film:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def load_state_dict(self, state, strict=True, assign=False):
        state = dict(state)               # a model saved without FiLM: its layers start at zero (identity)
        state.update({k: v for k, v in self.state_dict().items() if k.startswith("film.") and k not in state})
        return load(self, state, strict=strict, assign=assign)

    def forward(self, fixed, moving, prompts):
        self._check_inputs(fixed, moving)
        batch = fixed.shape[0]
        if isinstance(prompts, (str, Prompt)):
            prompts = [prompts] * batch
        condition = self.condition([parse_prompt(p) for p in prompts], fixed.device)
        both = torch.cat([fixed, moving])
        sam_fixed, sam_moving = self.backbone(both).chunk(2)
        stem = {s: f.chunk(2) for s, f in zip(self.stem.strides, self.stem(both))}
        velocity, features = None, None
        for level, stride in enumerate(self.config.level_strides):
            stem_fixed, stem_moving = stem[stride]
            if velocity is None:
                velocity = stem_fixed.new_zeros(batch, 3, *stem_fixed.shape[2:])
                features = self.levels[level](stem_fixed, stem_moving, M.local_correlation(stem_fixed, stem_moving),
                                              sam_fixed, sam_moving)
            else:
                velocity = M.resize_field(velocity, stem_fixed.shape[2:])
                warped = self.transformer(stem_moving, self.integrate(velocity))
                coarser = F.interpolate(features, size=stem_fixed.shape[2:], mode="trilinear", align_corners=False)
                features = self.levels[level](stem_fixed, warped, M.local_correlation(stem_fixed, warped), coarser)
            scale, shift = self.film[level](condition).view(batch, -1, 1, 1, 1).chunk(2, dim=1)
            features = features * (1 + scale) + shift
            params = self.controllers[level](condition, features)
            velocity = velocity + self.heads[level](features, params)
        displacement = M.resize_field(self.integrate(velocity), fixed.shape[2:])
        return M.FieldOutput(velocity=velocity, displacement=displacement)

    M.UniRegModel.__init__ = __init__
    M.UniRegModel.load_state_dict = load_state_dict
    M.UniRegModel.forward = forward


if __name__ == "__main__":
    patch()
    from unireg.cli import main
    sys.exit(main(sys.argv[1:]))
