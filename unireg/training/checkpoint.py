"""Atomic, rotating DeepSpeed checkpoints.

DeepSpeed writes each checkpoint into ``<dir>/<tag>/``. A tag only counts once every rank has
finished writing it and rank 0 has added ``trainer_state.json`` (step, data position); the
``latest`` pointer is then replaced atomically. A run killed mid-save leaves a tag without
that file, which resume ignores, so a crash never leaves a broken latest.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from .config import ConfigError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST = "latest"


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed from or exported; the message names it and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, directory: "str | Path", keep_last: int = 3):
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, engine, step: int, state: dict) -> Path:
        tag = tag_for(step)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state={"trainer_state": state},
                               save_latest=False)
        _barrier()
        if _rank() == 0:
            _atomic_write(self.directory / tag / STATE_FILE, json.dumps({**state, "tag": tag}, indent=2))
            _atomic_write(self.directory / LATEST, tag)
            self._rotate()
        _barrier()
        return self.directory / tag

    def valid_tags(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and (p / STATE_FILE).is_file())

    def latest(self) -> str | None:
        """The newest complete checkpoint: the pointer if it is valid, else the newest valid tag."""
        valid = self.valid_tags()
        pointer = self.directory / LATEST
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if tag in valid:
                return tag
            logger.warning("checkpoint pointer names %s, which is incomplete; falling back", tag)
        return valid[-1] if valid else None

    def trainer_state(self, tag: str) -> dict:
        """The tag's ``trainer_state.json``, checked; CheckpointError for an unknown or broken tag."""
        valid = self.valid_tags()
        if tag not in valid:
            raise CheckpointError(f"no complete checkpoint {tag!r} in {self.directory}; complete ones: "
                                  f"{', '.join(valid) or 'none'} (or --resume none to start afresh)")
        path = self.directory / tag / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is unreadable ({exc}); resume from another tag or --resume none") from None
        missing = [k for k in ("step", "epoch", "batch_in_epoch", "torch_rng") if k not in state] \
            if isinstance(state, dict) else ["all keys"]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}; resume from another tag or --resume none")
        return state

    def load(self, engine, tag: str) -> dict:
        """Restore the engine (model, optimizer, scheduler) from ``tag``; returns its trainer state."""
        state = self.trainer_state(tag)
        try:
            load_path, _ = engine.load_checkpoint(str(self.directory), tag=tag)
        except Exception as exc:  # DeepSpeed/torch raise anything from EOFError to UnpicklingError on a bad file
            raise CheckpointError(f"checkpoint {self.directory / tag} cannot be loaded ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); resume from another tag or --resume none") from None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {self.directory / tag}")
        return state

    def _rotate(self) -> None:
        tags = sorted(p.name for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step_"))
        latest = self.latest()
        complete = [t for t in tags if t in self.valid_tags()]
        for tag in complete[:-self.keep_last]:
            if tag != latest:
                shutil.rmtree(self.directory / tag, ignore_errors=True)
        for tag in tags:  # leftovers of saves that died, older than the latest good one
            if tag not in complete and latest and tag < latest:
                shutil.rmtree(self.directory / tag, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
