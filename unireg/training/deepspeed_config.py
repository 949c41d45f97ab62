"""DeepSpeed settings: one shipped base JSON, per-run overrides from the training YAML.

Every run starts from ``deepspeed_base.json`` (beside this file) and merges the YAML's
``deepspeed:`` mapping over it, key by key, in DeepSpeed's own key names::

    deepspeed:
      train_micro_batch_size_per_gpu: 2
      gradient_accumulation_steps: 4
      zero_optimization: {stage: 3, overlap_comm: true}
      bf16: {enabled: true}
      optimizer: {params: {lr: 2.0e-4, weight_decay: 0.01}}
      scheduler: {params: {warmup_num_steps: 1000}}

so a config says only how it differs from the base, and there is one place to read what a run
used. The schedule length is not a setting: the trainer sets ``total_num_steps`` to ``run.steps``.
"""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

BASE_PATH = Path(__file__).resolve().parent / "deepspeed_base.json"

#: Keys the trainer owns; a YAML that sets them is refused rather than silently overwritten.
_OWNED = {("scheduler", "params", "total_num_steps"): "run.steps"}

#: path -> (kind, range as text, test): the values a user most often edits, checked here so a typo
#: fails when the config is read instead of inside DeepSpeed after the model is built.
_CHECKS = {
    ("train_micro_batch_size_per_gpu",): (int, ">= 1", lambda v: v >= 1),
    ("gradient_accumulation_steps",): (int, ">= 1", lambda v: v >= 1),
    ("gradient_clipping",): (float, ">= 0", lambda v: v >= 0),
    ("zero_optimization", "stage"): (int, "0, 1, 2 or 3", lambda v: 0 <= v <= 3),
    ("bf16", "enabled"): (bool, "", None),
    ("fp16", "enabled"): (bool, "", None),
    ("optimizer", "params", "lr"): (float, "> 0", lambda v: v > 0),
    ("optimizer", "params", "weight_decay"): (float, ">= 0", lambda v: v >= 0),
    ("scheduler", "params", "warmup_num_steps"): (int, ">= 0", lambda v: v >= 0),
}


class DeepSpeedSettingsError(ValueError):
    """A DeepSpeed setting is invalid; the message names the key (``deepspeed.<path>``)."""


def load_base() -> dict:
    return json.loads(BASE_PATH.read_text())


def build_deepspeed_config(overrides: dict | None, total_steps: int) -> dict:
    """Base JSON + the YAML's ``deepspeed:`` overrides, checked, with the schedule set to ``total_steps``."""
    overrides = overrides or {}
    if not isinstance(overrides, dict):
        raise DeepSpeedSettingsError(f"deepspeed: expected a mapping of DeepSpeed keys, got {type(overrides).__name__}")
    base = load_base()
    _check_names(overrides, base, ("deepspeed",))
    for path, owner in _OWNED.items():
        if _get(overrides, path) is not None:
            raise DeepSpeedSettingsError(f"deepspeed.{'.'.join(path)} is set by the trainer from {owner}; remove it")
    config = _merge(base, overrides)
    _check_values(config)
    if config["bf16"].get("enabled") and config.get("fp16", {}).get("enabled"):
        raise DeepSpeedSettingsError("deepspeed: bf16.enabled and fp16.enabled are both true; choose one")
    scheduler = config.get("scheduler")
    if scheduler is not None:
        scheduler.setdefault("params", {})["total_num_steps"] = int(total_steps)
    return config


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_names(overrides: dict, base: dict, prefix: tuple) -> None:
    """A key that is not in the base but close to one that is, is a typo (DeepSpeed would ignore it)."""
    for key, value in overrides.items():
        if key in base:
            if isinstance(value, dict) and isinstance(base[key], dict):
                _check_names(value, base[key], prefix + (key,))
            continue
        close = difflib.get_close_matches(str(key), [str(k) for k in base], n=1, cutoff=0.75)
        if close:
            raise DeepSpeedSettingsError(f"unknown DeepSpeed key {'.'.join(prefix + (key,))}; "
                                         f"did you mean {'.'.join(prefix + (close[0],))}?")


def _check_values(config: dict) -> None:
    for path, (kind, allowed, test) in _CHECKS.items():
        value = _get(config, path)
        if value is None:
            continue
        name = "deepspeed." + ".".join(path)
        if kind is bool:
            if not isinstance(value, bool):
                raise DeepSpeedSettingsError(f"{name}: expected true or false, got {value!r}")
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (kind is int and not isinstance(value, int)):
            expected = "an integer" if kind is int else "a number"
            raise DeepSpeedSettingsError(f"{name}: expected {expected}, got {value!r}")
        if not test(value):
            raise DeepSpeedSettingsError(f"{name} must be {allowed}, got {value}")


def _get(mapping: dict, path: tuple):
    for key in path:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping
