"""Training run configuration: one YAML (model + data + loss + run + deepspeed).

Every key is checked when the file is read: an unknown key, a value of the wrong type or out of
range is reported with its dotted path, before any process group or model is built. Relative
paths (shards, ``run.output_dir``, ``run.export_dir``, checkpoints) resolve against the YAML's
folder, so a config means the same thing from any working directory; ``check_data`` then checks
that every local shard exists and is readable when a run starts, not after its first evaluation.
DeepSpeed settings are the ``deepspeed:`` mapping merged over the shipped base JSON
(see :mod:`unireg.training.deepspeed_config`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tarfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import UniRegConfig
from ..errors import UserError
from ..prompt import parse_prompt
from .deepspeed_config import DeepSpeedSettingsError, build_deepspeed_config


class ConfigError(UserError):
    """A training configuration is invalid; the message names the key."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    from_pretrained: str | None = None   # fine-tune a released model instead of starting from a preset
    overrides: dict = field(default_factory=dict)
    sam_checkpoint: str | None = None
    activation_checkpointing: bool = False
    controller_gain: float | None = None  # from_pretrained: re-scale the controllers (same outputs, faster condition learning)
    prompt_cache: str | None = None      # phrase embeddings made ahead: a prompt_cache.safetensors or a model (name, folder) holding one
    affine_head: bool = False            # from_pretrained: add a zero-initialised affine head (same outputs at step 0)
    organ_map: bool = False              # from_pretrained: add an organ map (fusion levels read it with zero weights at step 0)
    train_only: list | None = None       # parameter-name prefixes to train (e.g. [affine]); the rest stays frozen


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
    rigid_motion_prob: float = 0.0       # share of pairs whose moving scan is also moved rigidly (repositioning)
    rigid_motion: list = field(default_factory=lambda: [5.0, 10.0])   # its peak rotation (deg) and shift (mm)
    whole_body_prob: float = 0.25        # share of prompts naming no organ (the global objective)
    group_prob: float = 0.35             # share of organ prompts naming 2-3 organs instead of one
    zero_shot_organs: list = field(default_factory=list)  # never named in training; eval measures them by text alone


@dataclass
class LossSection:
    lncc_kernel: int = 9
    similarity_weight: float = 1.0
    dice_weight: float = 1.0
    smoothness_scale: float = 1.0
    # regulariser weight at λ = 0 and λ = 1 (times smoothness_scale), log-linear in between; the shipped
    # tiny model's last stage widened the top to 30 so smooth=1 halves SDlogJ between subjects too
    smoothness_range: list = field(default_factory=lambda: [0.1, 10.0])
    global_weight: float = 0.25          # similarity weight outside the named organs (1 + this inside)
    focus_dilation: int = 2              # voxels the named organs' mask grows by for the similarity focus
    lncc_eps: float = 1e-8               # LNCC stabiliser (unireg.similarity.LNCC_EPS explains the value)
    affine_weight: float = 0.0           # affine head vs the loader's known rigid motion (mean voxel error); needs one
    affine_only: bool = False            # that error alone, the rest of the network not run (model.train_only: [affine])
    map_weight: float = 1.0              # a model's organ map vs the prompt's organs in the label maps (BCE + Dice)
    margin_weight: float = 0.0           # steering margin: named organs' Dice under their prompt must beat the
    margin: float = 0.05                 # whole-body field's (no grad) by this much (unireg.training.objective)


@dataclass
class RunSection:
    output_dir: str = "runs/unireg"
    steps: int = 1000
    max_minutes: float | None = None     # time box: stop, checkpoint and export after this many training minutes
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


SECTIONS = {"model": ModelSection, "data": DataSection, "loss": LossSection, "run": RunSection}
_MOVED = {"run.deepspeed_config": "DeepSpeed settings are now the `deepspeed:` section of the YAML, merged over "
                                  "unireg/training/deepspeed_base.json; move the values that differ there"}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    run: RunSection = field(default_factory=RunSection)
    deepspeed: dict = field(default_factory=dict)   # DeepSpeed keys merged over deepspeed_base.json
    source: Path | None = None           # the YAML file, to resolve relative paths

    @classmethod
    def from_yaml(cls, path: "str | Path", overrides: dict | None = None) -> "TrainConfig":
        """Read and check a YAML; ``overrides`` are ``{"section.key": value}`` (command-line flags)."""
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
            raise ConfigError("a training config must be a mapping with sections model, data, loss, run, deepspeed")
        _check_keys(raw, [*SECTIONS, "deepspeed"], "")
        kwargs = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{name}: expected a mapping, got {type(values).__name__}")
            _check_keys(values, [f.name for f in dataclasses.fields(section_cls)], name + ".")
            kwargs[name] = section_cls(**values)
        deepspeed = raw.get("deepspeed") or {}
        if not isinstance(deepspeed, dict):
            raise ConfigError(f"deepspeed: expected a mapping of DeepSpeed keys, got {type(deepspeed).__name__}")
        return cls(**kwargs, deepspeed=deepspeed)

    def validate(self) -> None:
        for name, section_cls in SECTIONS.items():
            _check_types(getattr(self, name), section_cls, name)
        d, loss, r = self.data, self.loss, self.run
        try:
            model_config = self.model_config()
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
        if not d.train:
            raise ConfigError("data.train: give the training shards (a folder, a brace pattern or a list)")
        for key in ("train", "val"):
            spec = getattr(d, key)
            if isinstance(spec, list) and not all(isinstance(s, str) and s for s in spec):
                raise ConfigError(f"data.{key}: expected shard paths (strings), got {spec!r}")
        if d.patch_size is not None:
            div = model_config.size_divisor
            if len(d.patch_size) != 3 or any(not _is_int(p) or p <= 0 or p % div for p in d.patch_size):
                raise ConfigError(f"data.patch_size: need three positive multiples of {div} (or null), got {d.patch_size}")
        if d.smoothness is not None and (len(d.smoothness) != 2 or not all(_is_number(s) for s in d.smoothness)
                                         or not 0 <= d.smoothness[0] <= d.smoothness[1] <= 1):
            raise ConfigError(f"data.smoothness: need [low, high] within [0, 1] (or null), got {d.smoothness}")
        if d.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
        for key in ("whole_body_prob", "group_prob"):
            if not 0 <= getattr(d, key) <= 1:
                raise ConfigError(f"data.{key} must be in [0, 1], got {getattr(d, key)}")
        from ..organs import ORGANS
        unknown = [o for o in d.zero_shot_organs if o not in ORGANS]
        if unknown:
            raise ConfigError(f"data.zero_shot_organs: unknown organ {unknown[0]!r} (TotalSegmentator class names)")
        if loss.focus_dilation < 0:
            raise ConfigError(f"loss.focus_dilation must be >= 0, got {loss.focus_dilation}")
        if not 0 <= d.identity_prob < 1:
            raise ConfigError(f"data.identity_prob must be in [0, 1), got {d.identity_prob}")
        if not 0 <= d.rigid_motion_prob <= 1:
            raise ConfigError(f"data.rigid_motion_prob must be in [0, 1], got {d.rigid_motion_prob}")
        motion = d.rigid_motion
        if not (isinstance(motion, (list, tuple)) and len(motion) == 2
                and all(isinstance(v, (int, float)) and v >= 0 for v in motion)):
            raise ConfigError(f"data.rigid_motion must be [peak rotation in degrees, peak shift in mm], both >= 0, "
                              f"got {motion}")
        if loss.lncc_kernel < 3 or loss.lncc_kernel % 2 == 0:
            raise ConfigError(f"loss.lncc_kernel must be an odd number >= 3, got {loss.lncc_kernel}")
        for key in ("similarity_weight", "dice_weight", "smoothness_scale", "global_weight", "affine_weight",
                    "map_weight"):
            if getattr(loss, key) < 0:
                raise ConfigError(f"loss.{key} must be >= 0, got {getattr(loss, key)}")
        weights = loss.smoothness_range
        if not (isinstance(weights, (list, tuple)) and len(weights) == 2
                and all(isinstance(v, (int, float)) for v in weights) and 0 < weights[0] < weights[1]):
            raise ConfigError(f"loss.smoothness_range must be two weights [low, high] with 0 < low < high, got {weights}")
        for key in ("steps", "log_every", "checkpoint_every", "keep_last", "eval_pairs"):
            if getattr(r, key) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(r, key)}")
        if r.max_minutes is not None and r.max_minutes <= 0:
            raise ConfigError(f"run.max_minutes must be > 0 (or null: no time box), got {r.max_minutes}")
        if self.model.controller_gain is not None and not self.model.controller_gain > 0:
            raise ConfigError(f"model.controller_gain must be > 0, got {self.model.controller_gain}")
        only = self.model.train_only
        if only is not None and (not isinstance(only, list) or not only
                                 or not all(isinstance(p, str) and p for p in only)):
            raise ConfigError(f"model.train_only must be a non-empty list of parameter-name prefixes, got {only!r}")
        if loss.affine_only and not (loss.affine_weight > 0 and only == ["affine"]):
            raise ConfigError("loss.affine_only trains the affine head alone on the known motion: it needs "
                              f"loss.affine_weight > 0 and model.train_only: [affine] (got {loss.affine_weight} and "
                              f"{only!r})")
        if not loss.lncc_eps > 0:
            raise ConfigError(f"loss.lncc_eps must be > 0, got {loss.lncc_eps}")
        if r.eval_every < 0:
            raise ConfigError(f"run.eval_every must be >= 0 (0: no periodic evaluation), got {r.eval_every}")
        if not r.output_dir:
            raise ConfigError("run.output_dir: give the run folder")
        if r.task is not None:
            try:
                parse_prompt(r.task)
            except ValueError as exc:
                raise ConfigError(f"run.task: {exc}") from None
        self.deepspeed_dict()

    def model_config(self) -> UniRegConfig:
        return UniRegConfig.from_preset(self.model.preset, **self.model.overrides)

    def deepspeed_dict(self) -> dict:
        """The DeepSpeed config of this run: base JSON + ``deepspeed:`` overrides, schedule = run.steps."""
        try:
            return build_deepspeed_config(self.deepspeed, self.run.steps)
        except DeepSpeedSettingsError as exc:
            raise ConfigError(str(exc)) from None

    # ---------------------------------------------------------------------------------- paths
    def resolve(self, path: str) -> Path:
        """Paths in the YAML are relative to the YAML file (or absolute / URLs)."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.source is None or _is_url(path):
            return p
        return Path(os.path.normpath(self.source.parent / p))

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.run.output_dir)

    @property
    def export_dir(self) -> Path:
        return self.resolve(self.run.export_dir) if self.run.export_dir else self.output_dir / "export"

    def shard_urls(self, key: str = "train") -> list[str]:
        """``data.train`` / ``data.val`` as a list of shard URLs, local paths checked (see ``check_data``)."""
        spec = getattr(self.data, key)
        specs = spec if isinstance(spec, list) else [spec]
        return [url for s in specs for url in _expand(str(s), self.resolve, f"data.{key}")]

    def prompt_cache_file(self) -> Path:
        """``model.prompt_cache`` as a file: given directly, or a model's (shipped name or folder) cache."""
        from ..hub import PROMPT_CACHE_NAME, ModelLoadError, resolve_model_dir
        value = self.model.prompt_cache
        path = self.resolve(value)
        if path.is_file():
            return path
        try:
            path = (path if path.is_dir() else resolve_model_dir(value)) / PROMPT_CACHE_NAME
        except ModelLoadError as exc:
            raise ConfigError(f"model.prompt_cache: {value!r} is neither a file nor a model ({exc})") from None
        if not path.is_file():
            raise ConfigError(f"model.prompt_cache: {path} not found")
        return path

    def check_data(self) -> None:
        """Raise ConfigError unless every local shard and checkpoint the run reads is there and readable."""
        self.shard_urls("train")
        if self.data.val:
            self.shard_urls("val")
        if self.model.sam_checkpoint:
            path = self.resolve(self.model.sam_checkpoint)
            if not path.is_file():
                raise ConfigError(f"model.sam_checkpoint: {path} not found")
        if self.model.prompt_cache:
            self.prompt_cache_file()
        source = self.model.from_pretrained
        if source and _looks_like_path(source) and not self.resolve(source).is_dir():
            raise ConfigError(f"model.from_pretrained: model folder {self.resolve(source)} not found")


def command_line_overrides(output_dir: str | None = None, train_data: str | None = None) -> dict:
    """``--output-dir`` / ``--train-data`` as config overrides. A path typed on the command line means
    the working directory's path, so it is made absolute before the YAML-relative rule applies."""
    overrides = {}
    if output_dir:
        overrides["run.output_dir"] = str(Path(output_dir).expanduser().absolute())
    if train_data:
        overrides["data.train"] = train_data if _is_url(train_data) else str(Path(train_data).expanduser().absolute())
    return overrides


def _expand(spec: str, resolve, key: str) -> list[str]:
    """A folder (its ``*.tar``, subfolders included: shards written in parallel), a file, a brace
    pattern of files, or URLs (brace-expanded, read by the loader). Hidden subfolders are not data:
    ``unireg prepare shards`` stages its shards in ``.writing-*`` and renames them when done, so a
    killed or running job leaves there only half-written shards."""
    import braceexpand
    if _is_url(spec):
        return list(braceexpand.braceexpand(spec))
    if "{" in spec:
        paths = [resolve(p) for p in braceexpand.braceexpand(spec)]
    else:
        path = resolve(spec)
        if path.is_dir():
            paths = sorted(p for p in path.rglob("*.tar")
                           if not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not paths:
                raise ConfigError(f"{key}: no .tar shards in {path} (write them with `unireg prepare shards --out {path}`)")
        else:
            paths = [path]
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{key}: {path} not found")
        if not path.is_file() or not os.access(path, os.R_OK) or not tarfile.is_tarfile(path):
            raise ConfigError(f"{key}: {path} is not a readable .tar shard")
    return [str(p) for p in paths]


def _is_url(path: str) -> bool:
    """``pipe:...``, ``s3://...``, ``file:...``: a scheme of two letters or more before a colon."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", path) is not None


def _looks_like_path(name: str) -> bool:
    """Shipped names and hub ids (``org/name``) are not paths; ``./x``, ``../x``, ``/x``, ``a/b/c`` are."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_keys(values: dict, known, prefix: str) -> None:
    for key in values:
        if key not in known:
            if f"{prefix}{key}" in _MOVED:
                raise ConfigError(f"{prefix}{key}: {_MOVED[prefix + key]}")
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {sorted(known)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")


# ------------------------------------------------------------------------------------ types
_DESCRIPTION = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
                dict: "a mapping", type(None): "null"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_MATCHES = {bool: lambda v: isinstance(v, bool), int: _is_int, float: _is_number, type(None): lambda v: v is None,
            str: lambda v: isinstance(v, str), list: lambda v: isinstance(v, list), dict: lambda v: isinstance(v, dict)}


def _check_types(section, section_cls, name: str) -> None:
    """Each value has its field's annotated type: ``augment: "no"`` is not a bool, ``steps: four`` not an int."""
    hints = typing.get_type_hints(section_cls)
    for f in dataclasses.fields(section_cls):
        value, allowed = getattr(section, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
        if any(_MATCHES[t](value) for t in allowed):
            continue
        expected = " or ".join(_DESCRIPTION[t] for t in allowed)
        hint = ""
        if isinstance(value, str) and float in allowed and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            hint = f" (YAML reads {value} as text: write it with a decimal point, e.g. 1.0e-3)"
        raise ConfigError(f"{name}.{f.name}: expected {expected}, got {value!r} ({type(value).__name__}){hint}")
