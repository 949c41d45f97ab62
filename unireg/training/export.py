"""Turn a DeepSpeed checkpoint (any ZeRO stage) into a ``save_pretrained`` model folder.

ZeRO-2/3 checkpoints are consolidated with DeepSpeed's own ``zero_to_fp32`` tooling, so the
export works offline on one CPU for a model trained on many GPUs. These checkpoint files are
pickles written by our own trainer; only export checkpoints you trust.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..api import UniReg
from ..config import UniRegConfig
from .checkpoint import CheckpointManager


def export_checkpoint(checkpoint_dir: "str | Path", out_dir: "str | Path", tag: str | None = None) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    run_dir = checkpoint_dir.parent if checkpoint_dir.name == "checkpoints" else checkpoint_dir
    ckpts = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else checkpoint_dir
    config_path = run_dir / "model_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: export needs the run folder written by unireg-train")
    tag = tag or CheckpointManager(ckpts).latest()
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpts}")
    state = _consolidated_state(ckpts, tag)
    model = UniReg(UniRegConfig.load(config_path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpts / tag} does not match {config_path}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.save_pretrained(out_dir)


def _consolidated_state(ckpts: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    if list((ckpts / tag).glob("*optim_states.pt")):
        return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=tag).items()}
    model_file = ckpts / tag / "mp_rank_00_model_states.pt"  # ZeRO-0: the module is stored whole
    return {k: v.float() for k, v in torch.load(model_file, map_location="cpu", weights_only=False)["module"].items()}
