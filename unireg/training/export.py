"""Turn a DeepSpeed checkpoint (any ZeRO stage) into a ``save_pretrained`` model folder.

ZeRO-2/3 checkpoints are consolidated with DeepSpeed's own ``zero_to_fp32`` tooling, so the
export works offline on one CPU for a model trained on many GPUs. DeepSpeed's checkpoint files
are pickles, read with ``torch.load(weights_only=False)``: unpickling can run code, so export
reads only a training run folder as the trainer writes it (``model_config.json`` beside
``checkpoints/<tag>/trainer_state.json``) unless the caller passes ``trust=True``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..api import UniReg
from ..config import UniRegConfig
from .checkpoint import STATE_FILE, CheckpointError, CheckpointManager

UNPICKLE_WARNING = ("DeepSpeed checkpoints are pickles read with torch.load(weights_only=False), which can run "
                    "code: export only checkpoints you trust")


def export_checkpoint(checkpoint_dir: "str | Path", out_dir: "str | Path", tag: str | None = None,
                      trust: bool = False) -> Path:
    """Run folder (or its ``checkpoints/``) -> ``save_pretrained`` folder at ``out_dir``; returns it."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir} is not a folder; give the run folder written by unireg-train")
    run_dir = checkpoint_dir.parent if checkpoint_dir.name == "checkpoints" else checkpoint_dir
    ckpts = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else checkpoint_dir
    config_path = run_dir / "model_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found: export needs the run folder written by unireg-train")
    manager = CheckpointManager(ckpts)
    tag = tag or manager.latest()
    if tag is None:
        raise CheckpointError(f"no complete checkpoint (one with {STATE_FILE}) in {ckpts}")
    if not trust:
        manager.trainer_state(tag)  # a tag the trainer completed, else CheckpointError
    elif not (ckpts / tag).is_dir():
        raise CheckpointError(f"no checkpoint {tag!r} in {ckpts}")
    state = _consolidated_state(ckpts, tag)
    try:
        model = UniReg(UniRegConfig.load(config_path))
    except (ValueError, TypeError, OSError) as exc:
        raise CheckpointError(f"{config_path} is not a readable model config ({exc})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpts / tag} does not match {config_path}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.save_pretrained(out_dir)


def _consolidated_state(ckpts: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        if list((ckpts / tag).glob("*optim_states.pt")):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=tag)
        else:  # ZeRO-0: the module is stored whole
            state = torch.load(ckpts / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    except Exception as exc:  # truncated or foreign files fail anywhere inside DeepSpeed / torch.load
        raise CheckpointError(f"checkpoint {ckpts / tag} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    return {k: v.float() for k, v in state.items()}
