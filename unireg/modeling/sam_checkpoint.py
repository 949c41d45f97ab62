"""Load official segment-anything checkpoints into the UniReg backbone.

Official ``sam_vit_{b,l,h}`` files hold the whole SAM (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``); only the image encoder is used. The absolute position embedding and the
relative position tables of global-attention blocks are resized to the working slice size, so
a 1024-px SAM loads into a 256-px (or any) encoder. Files are read with ``weights_only=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

_PREFIX = "image_encoder."


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"SAM checkpoint: {len(self.loaded)} tensors loaded ({len(self.resized)} resized), "
                f"{len(self.missing)} missing in checkpoint, {len(self.unused)} unused "
                f"(prompt encoder / mask decoder weights are expected to be unused)")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with arbitrary objects, or not a torch file at all
        raise ValueError(f"{path} is not a readable weights-only torch checkpoint: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_sam_image_encoder(encoder: nn.Module, path: str | Path) -> LoadReport:
    """Copy SAM image-encoder weights into ``encoder`` (an ``ImageEncoderViT``)."""
    state = read_checkpoint(path)
    has_prefix = any(k.startswith(_PREFIX) for k in state)
    report = LoadReport()
    target = encoder.state_dict()
    new_state = {}
    for key, value in state.items():
        if has_prefix and not key.startswith(_PREFIX):
            report.unused.append(key)
            continue
        name = key[len(_PREFIX):] if has_prefix else key
        if name not in target:
            report.unused.append(key)
            continue
        if value.shape != target[name].shape:
            value = _resize(name, value, target[name].shape)
            report.resized.append(name)
        new_state[name] = value.to(target[name].dtype)
        report.loaded.append(name)
    report.missing = sorted(set(target) - set(new_state))
    encoder.load_state_dict(new_state, strict=False)
    return report


def _resize(name: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if name == "pos_embed":  # [1, H, W, C]
        grid = value.permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=tuple(shape[1:3]), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1)
    if name.endswith(("rel_pos_h", "rel_pos_w")) and value.shape[1] == shape[1]:  # [2S-1, C]
        table = value.float().t().unsqueeze(0)
        return F.interpolate(table, size=shape[0], mode="linear", align_corners=False)[0].t()
    raise ValueError(f"SAM checkpoint tensor {name} has shape {tuple(value.shape)}, the backbone "
                     f"expects {tuple(shape)}; is the checkpoint for another ViT size?")
