"""Stage 3: the network's prompt-conditioned field at the model's working grid."""
from __future__ import annotations

import torch

from ..modeling.model import FieldOutput, UniRegModel
from ..prompt import Prompt


@torch.no_grad()
def predict_field(model: UniRegModel, fixed: torch.Tensor, moving: torch.Tensor, prompt: Prompt,
                  with_affine: bool = True) -> FieldOutput:
    """One forward pass in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return model(fixed, moving, [prompt], with_affine=with_affine)
    finally:
        model.train(was_training)
