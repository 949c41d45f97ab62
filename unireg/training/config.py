"""Training run configuration: one YAML (model + data + loss + run) beside a DeepSpeed JSON.

Every key is checked: an unknown key or a bad value is reported with its dotted path and a
suggestion, before any process group or model is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import UniRegConfig
from ..prompt import parse_prompt


class ConfigError(ValueError):
    """A training configuration is invalid; the message names the key."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    from_pretrained: str | None = None   # fine-tune a released model instead of starting from a preset
    overrides: dict = field(default_factory=dict)
    sam_checkpoint: str | None = None
    activation_checkpointing: bool = False


@dataclass
class DataSection:
    train: str | list = ""
    val: str | list | None = None
    patch_size: list | None = field(default_factory=lambda: [64, 64, 64])
    num_workers: int = 0
    prompt_sampling: bool = True
    smoothness: list | None = field(default_factory=lambda: [0.0, 1.0])
    augment: bool = True
    identity_prob: float = 0.0           # share of pairs turned into (fixed, fixed): teaches 'no motion -> no field'


@dataclass
class LossSection:
    lncc_kernel: int = 9
    similarity_weight: float = 1.0
    dice_weight: float = 1.0
    smoothness_scale: float = 1.0


@dataclass
class RunSection:
    output_dir: str = "runs/unireg"
    deepspeed_config: str = "ds_tiny_cpu.json"
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_pairs: int = 8
    eval_hd95: bool = True               # HD95 in periodic evaluation (MONAI; slower than Dice)
    checkpoint_every: int = 100
    keep_last: int = 3
    task: str | None = None              # task-specific mode: one fixed prompt, e.g. "intra | liver"
    export_dir: str | None = None
    record_data_order: bool = False      # append each rank's pair keys to <output_dir>/data_order/


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    run: RunSection = field(default_factory=RunSection)
    source: Path | None = None           # the YAML file, to resolve relative paths

    @classmethod
    def from_yaml(cls, path: "str | Path", overrides: dict | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"training config not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        config = cls.from_dict(raw)
        config.source = path.resolve()
        for dotted, value in (overrides or {}).items():
            section, key = dotted.split(".", 1)
            setattr(getattr(config, section), key, value)
        config.validate()
        return config

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        if not isinstance(raw, dict):
            raise ConfigError("a training config must be a mapping with sections model, data, loss, run")
        sections = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "source"}
        _check_keys(raw, sections, "")
        kwargs = {}
        for name, section_cls in ((n, globals()[t] if isinstance(t, str) else t) for n, t in sections.items()):
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{name}: expected a mapping, got {type(values).__name__}")
            _check_keys(values, {f.name for f in dataclasses.fields(section_cls)}, name + ".")
            kwargs[name] = section_cls(**values)
        return cls(**kwargs)

    def validate(self) -> None:
        m, d, loss, r = self.model, self.data, self.loss, self.run
        try:
            self.model_config()
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
        if not d.train:
            raise ConfigError("data.train: give the training shards (a folder, a brace pattern or a list)")
        if d.patch_size is not None:
            div = self.model_config().size_divisor
            if len(d.patch_size) != 3 or any(int(p) <= 0 or int(p) % div for p in d.patch_size):
                raise ConfigError(f"data.patch_size: need three positive multiples of {div}, got {d.patch_size}")
        if d.smoothness is not None and (len(d.smoothness) != 2 or not 0 <= d.smoothness[0] <= d.smoothness[1] <= 1):
            raise ConfigError(f"data.smoothness: need [low, high] within [0, 1], got {d.smoothness}")
        if d.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if not 0 <= d.identity_prob < 1:
            raise ConfigError(f"data.identity_prob must be in [0, 1), got {d.identity_prob}")
        if loss.lncc_kernel < 3 or loss.lncc_kernel % 2 == 0:
            raise ConfigError(f"loss.lncc_kernel must be an odd number >= 3, got {loss.lncc_kernel}")
        for key in ("similarity_weight", "dice_weight", "smoothness_scale"):
            if getattr(loss, key) < 0:
                raise ConfigError(f"loss.{key} must be >= 0")
        for key in ("steps", "log_every", "checkpoint_every", "keep_last"):
            if int(getattr(r, key)) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(r, key)}")
        if r.eval_every < 0 or r.eval_pairs < 1:
            raise ConfigError("run.eval_every must be >= 0 and run.eval_pairs >= 1")
        if r.task is not None:
            try:
                parse_prompt(r.task)
            except ValueError as exc:
                raise ConfigError(f"run.task: {exc}") from None
        self.deepspeed_dict()

    def model_config(self) -> UniRegConfig:
        return UniRegConfig.from_preset(self.model.preset, **self.model.overrides)

    def resolve(self, path: str) -> Path:
        """Paths in the YAML are relative to the YAML file (or absolute / URLs)."""
        p = Path(path)
        if p.is_absolute() or self.source is None or ":" in path:
            return p
        return self.source.parent / p

    def deepspeed_dict(self) -> dict:
        path = self.resolve(self.run.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"run.deepspeed_config: {path} not found")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"run.deepspeed_config: {path} is not valid JSON: {exc}") from None
        if "train_micro_batch_size_per_gpu" not in ds:
            raise ConfigError(f"{path}: set train_micro_batch_size_per_gpu (pairs per rank per step)")
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}: zero_optimization.stage must be 0-3, got {stage}")
        return ds


def _check_keys(values: dict, known, prefix: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {sorted(known)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
