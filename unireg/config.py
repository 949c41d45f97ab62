"""Model configuration with size presets.

A plain dataclass serialised to ``config.json`` (Hugging Face convention), so a saved model
folder fully describes the network it holds. Sizes differ only in the SAM backbone and in
decoder width; every size runs the same code path.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .preprocessing import PreprocessingSpec

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class UniRegConfig:
    size: str = "tiny"
    # Backbone: segment-anything ImageEncoderViT over axial slices (2.5-D, 3 neighbours = RGB).
    vit_img_size: int = 128
    vit_patch_size: int = 16
    vit_embed_dim: int = 128
    vit_depth: int = 4
    vit_num_heads: int = 4
    vit_window_size: int = 0
    vit_global_attn_indexes: tuple[int, ...] = ()
    vit_out_chans: int = 32
    # 3-D stem + coarse-to-fine decoder. One dynamic head per entry of level_strides.
    stem_channels: tuple[int, ...] = (8, 16, 32)   # at strides 2, 4, 8 (and 16 when present)
    level_strides: tuple[int, ...] = (8, 4, 2)      # coarse -> fine; field is integrated at the finest
    decoder_channels: tuple[int, ...] = (32, 16, 16)
    head_hidden: int = 8
    # Velocity increments are the head's output times this (see DynamicHead): with Adam, a weight
    # moves ~lr a step, so the gain sets how fast the field can grow from zero at the start of training.
    head_output_gain: float = 10.0
    # Controller conditions.
    text_model: str = DEFAULT_TEXT_MODEL
    text_dim: int = 384
    prompt_dim: int = 64
    type_dim: int = 16
    controller_hidden: int = 128
    # Gain of the condition-dependent part of the generated kernels; None: 1 / controller_hidden
    # (the first models). See unireg.modeling.controller for why it matters to steering.
    controller_gain: float | None = None
    # A global affine, fitted at the coarsest level before the dynamic heads (unireg.modeling.affine_head):
    # repositioning is then not drawn into the prompt-steered velocity. Off in the first models.
    affine_head: bool = False
    # Where the prompt's organs are, segmented in both scans and fed to the fusion levels (modeling.organ_map).
    organ_map: bool = False
    # Transform.
    integration_steps: int = 7
    # Preprocessing (see ``preprocessing``): the fixed image's field of view resampled to isotropic
    # voxels of this size, at most max_working_size along an axis, HU clamped to [hu_min, hu_max].
    working_spacing_mm: float = 4.0
    max_working_size: int = 128
    hu_min: float = -1000.0
    hu_max: float = 1000.0
    # Smoothness used when a prompt does not say (0 = flexible, 1 = stiff).
    default_smoothness: dict = field(default_factory=lambda: {"inter": 0.3, "intra": 0.5})

    def __post_init__(self):
        self.vit_global_attn_indexes = tuple(self.vit_global_attn_indexes)
        self.stem_channels = tuple(self.stem_channels)
        self.level_strides = tuple(self.level_strides)
        self.decoder_channels = tuple(self.decoder_channels)
        if len(self.decoder_channels) != len(self.level_strides):
            raise ValueError("decoder_channels needs one entry per level in level_strides")
        if list(self.level_strides) != sorted(self.level_strides, reverse=True):
            raise ValueError("level_strides must go coarse -> fine, e.g. (8, 4, 2)")
        if len(self.stem_channels) < len(_stride_ladder(self.level_strides[0])):
            raise ValueError(f"stem_channels needs an entry per stride up to {self.level_strides[0]}")
        if self.vit_img_size % self.vit_patch_size:
            raise ValueError("vit_img_size must be a multiple of vit_patch_size")
        if not self.hu_max > self.hu_min:
            raise ValueError(f"hu_max ({self.hu_max}) must be above hu_min ({self.hu_min})")
        if not self.working_spacing_mm > 0:
            raise ValueError(f"working_spacing_mm must be positive, got {self.working_spacing_mm}")

    @property
    def size_divisor(self) -> int:
        """Working-grid sizes are multiples of this so every level has whole voxels."""
        return self.level_strides[0]

    @property
    def preprocessing(self) -> PreprocessingSpec:
        """How this model sees a CT: shard loading, training, evaluation and ``register`` all use it."""
        return PreprocessingSpec(hu_min=float(self.hu_min), hu_max=float(self.hu_max),
                                 spacing_mm=float(self.working_spacing_mm), max_size=self.max_working_size,
                                 divisor=self.size_divisor)

    @classmethod
    def from_preset(cls, size: str, **overrides) -> "UniRegConfig":
        if size not in PRESETS:
            raise ValueError(f"unknown model size {size!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[size], "size": size, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UniRegConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UniRegConfig keys: {unknown}")
        _check_types(data, cls())
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "UniRegConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _check_types(data: dict, defaults: "UniRegConfig") -> None:
    """Each value must have its default's type (ints may stand for floats; lists for tuples)."""
    for key, value in data.items():
        default = getattr(defaults, key)
        if default is None or value is None and key == "text_model":
            continue
        expected = (int, float) if isinstance(default, float) else (list, tuple) if isinstance(default, tuple) \
            else type(default)
        if isinstance(value, bool) and not isinstance(default, bool) or not isinstance(value, expected):
            raise ValueError(f"config key {key!r} must be {type(default).__name__}, got {value!r}")


def _stride_ladder(max_stride: int) -> list[int]:
    out, s = [], 2
    while s <= max_stride:
        out.append(s)
        s *= 2
    return out


_SAM = {  # segment-anything build_sam.py encoder settings
    "vit_b": dict(vit_embed_dim=768, vit_depth=12, vit_num_heads=12, vit_global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(vit_embed_dim=1024, vit_depth=24, vit_num_heads=16, vit_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(vit_embed_dim=1280, vit_depth=32, vit_num_heads=16, vit_global_attn_indexes=(7, 15, 23, 31)),
}
_LARGE_DECODER = dict(vit_img_size=256, vit_window_size=14, vit_out_chans=256,
                      stem_channels=(16, 32, 64, 64), level_strides=(16, 8, 4, 2),
                      decoder_channels=(64, 48, 32, 16), working_spacing_mm=1.5, max_working_size=256)

PRESETS: dict[str, dict] = {
    "tiny": {},
    **{name: {**_LARGE_DECODER, **sam} for name, sam in _SAM.items()},
}
