"""The organ map's ceiling (issue 11): the true masks of the prompt's organs in place of the predicted map.

If the fusion levels knew exactly where the named organ is in both scans, would the network steer
between subjects? A model with an organ map is fine-tuned and evaluated with its map replaced by the
label maps' masks (``prompt_region`` of the fixed and moving labels, as logits), everything else as in
``unireg-train`` / ``unireg eval``. Evaluation needs the label maps, so this is a ceiling, not a product.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 python docs/experiments/organ_map/oracle.py train docs/experiments/organ_map/oracle.yaml
    python docs/experiments/organ_map/oracle.py eval --model runs/oracle/export --data shards/mix6mm/test \
        --steering --zero-shot gallbladder small_bowel --no-hd95 --out runs/oracle/eval
"""
from __future__ import annotations

import sys

import numpy as np
import torch

import unireg.data as data
from unireg.modeling.model import UniRegModel
from unireg.training import objective, trainer
from unireg.training.objective import prompt_region

LABELS: dict = {}        # the pair being registered: its fixed and moving label maps, [B,1,D,H,W]


def oracle_maps(self, prompts, both, sam_both):
    stride = self.config.level_strides[-1]
    size = tuple(n // stride for n in both.shape[2:])
    maps = [torch.logit(prompt_region(LABELS[key].to(both.device), prompts, size).clamp(1e-3, 1 - 1e-3)).to(both.dtype)
            for key in ("fixed", "moving")]
    return tuple(maps), None


def patch() -> None:
    UniRegModel._organ_maps = oracle_maps
    step = objective.registration_step

    def registration_step(model, batch, loss_fn, forward=None):   # training: the batch's label maps
        LABELS.update(fixed=batch["fixed_seg"], moving=batch["moving_seg"])
        return step(model, batch, loss_fn, forward)
    trainer.registration_step = registration_step
    on_grid = data.on_working_grid

    def on_working_grid(arrays, spacing, spec, capped=True):          # evaluation: the pair on the working grid
        out, mm = on_grid(arrays, spacing, spec, capped)
        if "fixed_seg" in out:
            LABELS.update({k: torch.from_numpy(np.asarray(out[f"{k}_seg"]).astype(np.int64))[None, None]
                           for k in ("fixed", "moving")})
        return out, mm
    data.on_working_grid = on_working_grid


if __name__ == "__main__":
    patch()
    if sys.argv[1] == "train":
        from unireg.training.run import train_from_config
        print(train_from_config(sys.argv[2]))
    else:
        from unireg.cli import main
        sys.exit(main(sys.argv[1:]))
