"""UniRegModel: the network, tensors in and fields out.

    fixed, moving [B,1,D,H,W] in [0,1]
      -> SAM slice backbone (shared) + 3-D stem (shared)
      -> (optional) a global affine fitted to keypoints of each scan (a small encoder of its own); the moving features move by it
      -> coarse-to-fine fusion levels, each with a controller-generated dynamic head
      -> stationary velocity at the finest level -> scaling and squaring -> deformation
      -> displacement = the deformation, then the affine

All fields are in voxels of the input grid, channels in (d, h, w) order. Weights follow the
Hugging Face layout (``from_pretrained`` / ``save_pretrained``: config.json + model.safetensors +
prompt_cache.safetensors); registering *scans* is the pipeline's job (``unireg.pipeline``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import UniRegConfig
from ..errors import ModelLoadError
from ..hub import (CONFIG_NAME, PROMPT_CACHE_NAME, WEIGHTS_NAME, read_config_dict, read_safetensors,
                   resolve_model_dir)
from ..organs import ORGANS, organ_phrase
from ..prompt import Prompt, parse_prompt
from . import affine_head
from .affine_head import AffineHead
from .backbone import SliceBackbone
from .condition import ConditionEncoder
from .controller import Controller
from .decoder import FusionLevel, Stem3d, local_correlation
from .dynamic_head import DynamicHead
from .organ_map import OrganMap, widen_first_conv
from .text_encoder import WHOLE_BODY, TextEmbedder
from .transform import SpatialTransformer, VelocityIntegrator, resize_field


CORRELATION_CHANNELS = 27  # local_correlation with radius 1
MAP_CHANNELS = 2           # the organ map of the fixed scan and of the (warped) moving scan


@dataclass
class FieldOutput:
    velocity: torch.Tensor       # [B,3,...] at the finest level, voxels of that level
    displacement: torch.Tensor   # [B,3,D,H,W] voxels of the input grid: the whole mapping
    #: with an affine head: the affine [B,3,4] (normalised coordinates, unireg.modeling.affine_head) and the
    #: deformation exp(velocity) [B,3,D,H,W] that acts before it; without one, None and ``displacement``
    affine: torch.Tensor | None = None
    deformation: torch.Tensor | None = None
    #: with an organ map (``config.organ_map``): logits [B,1,...] of where the prompt's organs are, at the
    #: finest level's grid, in the fixed scan and in the moving scan (its own space, not warped)
    organ_maps: tuple[torch.Tensor, torch.Tensor] | None = None
    #: and the per-voxel embeddings behind them ([B,E,...], fixed and moving): training asks them about other organs
    organ_voxels: tuple[torch.Tensor, torch.Tensor] | None = None


class UniRegModel(nn.Module):
    def __init__(self, config: UniRegConfig, embedder: TextEmbedder | None = None):
        super().__init__()
        self.config = config
        self.backbone = SliceBackbone(config)
        self.stem = Stem3d(config.stem_channels, max_stride=config.level_strides[0])
        self.condition = ConditionEncoder(config, embedder or TextEmbedder(config.text_model))
        self.heads = [DynamicHead(c, config.head_hidden, output_gain=config.head_output_gain) for c in config.decoder_channels]
        levels, controllers, previous = [], [], None
        for stride, channels, head in zip(config.level_strides, config.decoder_channels, self.heads):
            in_ch = 2 * self.stem.channels[stride] + CORRELATION_CHANNELS
            in_ch += 2 * config.vit_out_chans if previous is None else previous
            in_ch += MAP_CHANNELS if config.organ_map else 0
            levels.append(FusionLevel(in_ch, channels))
            controllers.append(Controller(self.condition.out_dim, channels, config.controller_hidden, head,
                                          gain=config.controller_gain))
            previous = channels
        self.levels = nn.ModuleList(levels)
        self.controllers = nn.ModuleList(controllers)
        self.affine = AffineHead() if config.affine_head else None
        self.organ_map = self._new_organ_map() if config.organ_map else None
        self.integrate = VelocityIntegrator(config.integration_steps)
        self.transformer = SpatialTransformer()

    @property
    def embedder(self) -> TextEmbedder:
        return self.condition.embedder

    # ------------------------------------------------------------------------ weights on disk
    @classmethod
    def from_config(cls, config: "UniRegConfig | str" = "tiny"):
        return cls(UniRegConfig.from_preset(config) if isinstance(config, str) else config)

    @classmethod
    def from_pretrained(cls, name_or_path: "str | Path", device: "str | torch.device" = "cpu",
                        revision: str | None = None):
        """A shipped model name, a ``save_pretrained`` folder or a Hugging Face hub id."""
        folder = resolve_model_dir(name_or_path, revision)
        try:
            config = UniRegConfig.from_dict(read_config_dict(folder))
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{folder / CONFIG_NAME}: {exc}") from None
        cache = read_safetensors(folder / PROMPT_CACHE_NAME, required=False)
        model = cls(config, TextEmbedder(config.text_model, cache))
        state = read_safetensors(folder / WEIGHTS_NAME)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ModelLoadError(f"{folder / WEIGHTS_NAME} does not match its config: "
                                 f"{str(exc).splitlines()[1].strip() if chr(10) in str(exc) else exc}") from None
        if missing or unexpected:
            raise ModelLoadError(f"{folder / WEIGHTS_NAME} does not match its config: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        model.name_or_path = str(name_or_path)  # a readable id for adapters and model cards (HF convention)
        return model.to(device).eval()

    def save_pretrained(self, folder: "str | Path", cache_vocabulary: bool = True) -> Path:
        """Write config, weights (fp32) and the prompt cache (by default covering every organ name)."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if cache_vocabulary:
            self.embedder.embed([organ_phrase(o) for o in ORGANS] + [WHOLE_BODY])
        self.config.save(folder / CONFIG_NAME)
        state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in self.embedder.cache.items()}, str(folder / PROMPT_CACHE_NAME))
        return folder

    def add_affine_head(self) -> None:
        """Give a model without one a (zero-initialised, so output-preserving) affine head to fine-tune."""
        if self.affine is None:
            ref = next(self.levels[0].parameters())
            self.affine = AffineHead().to(device=ref.device, dtype=ref.dtype)
            self.config.affine_head = True

    def _new_organ_map(self) -> OrganMap:
        cfg = self.config
        return OrganMap(cfg.vit_out_chans, cfg.text_dim, sam_stride=cfg.level_strides[0], out_stride=cfg.level_strides[-1])

    def add_organ_map(self) -> None:
        """Give a trained model without one an organ map to fine-tune; the fusion levels get its two channels
        with zero weights, so the field is unchanged until training teaches them to read it."""
        if self.organ_map is None:
            ref = next(self.levels[0].parameters())
            self.organ_map = self._new_organ_map().to(device=ref.device, dtype=ref.dtype)
            for level in self.levels:
                widen_first_conv(level.block, MAP_CHANNELS)
            self.config.organ_map = True

    def load_sam_checkpoint(self, path: "str | Path"):
        """Initialise the backbone from an official SAM file (``sam_vit_b_01ec64.pth`` etc.)."""
        from .sam_checkpoint import load_sam_image_encoder
        return load_sam_image_encoder(self.backbone.image_encoder, path)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor,
                prompts: "list[str | Prompt] | str | Prompt", with_affine: bool = True) -> FieldOutput:
        """``with_affine=False`` leaves a model's affine head out (the identity in its place): for pairs an
        intensity pre-alignment has already aligned more precisely than the head can."""
        self._check_inputs(fixed, moving)
        batch = fixed.shape[0]
        if isinstance(prompts, (str, Prompt)):
            prompts = [prompts] * batch
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch} pairs")
        prompts = [parse_prompt(p) for p in prompts]
        condition = self.condition(prompts, fixed.device)

        both = torch.cat([fixed, moving])
        sam_both = self.backbone(both)
        sam_fixed, sam_moving = sam_both.chunk(2)
        stem = {s: f.chunk(2) for s, f in zip(self.stem.strides, self.stem(both))}
        maps = voxels = None
        if self.organ_map is not None:
            maps, voxels = self._organ_maps(prompts, both, sam_both)

        affine = None
        if self.affine is not None and with_affine:   # the global part first; the moving features move by it
            stem_fixed, stem_moving = stem[self.config.level_strides[0]]
            affine = self.affine(fixed, moving)
            moved = affine_head.displacement(affine, stem_moving.shape[2:])   # SAM features share this grid
            stem[self.config.level_strides[0]] = (stem_fixed, self.transformer(stem_moving, moved))
            sam_moving = self.transformer(sam_moving, moved)

        velocity, features = None, None
        for level, stride in enumerate(self.config.level_strides):
            stem_fixed, stem_moving = stem[stride]
            if velocity is None:  # coarsest level: nothing to warp yet (but by the affine)
                velocity = stem_fixed.new_zeros(batch, 3, *stem_fixed.shape[2:])
                mapping = None if affine is None else moved
                inputs = [stem_fixed, stem_moving, local_correlation(stem_fixed, stem_moving), sam_fixed, sam_moving]
            else:
                velocity = resize_field(velocity, stem_fixed.shape[2:])
                mapping = self._mapping(affine, self.integrate(velocity))
                warped = self.transformer(stem_moving, mapping)
                coarser = F.interpolate(features, size=stem_fixed.shape[2:], mode="trilinear", align_corners=False)
                inputs = [stem_fixed, warped, local_correlation(stem_fixed, warped), coarser]
            if maps is not None:
                inputs += self._map_channels(maps, stem_fixed.shape[2:], mapping)
            features = self.levels[level](*inputs)
            params = self.controllers[level](condition, features)
            velocity = velocity + self.heads[level](features, params)

        deformation = resize_field(self.integrate(velocity), fixed.shape[2:])
        if affine is None:
            return FieldOutput(velocity=velocity, displacement=deformation, organ_maps=maps, organ_voxels=voxels)
        return FieldOutput(velocity=velocity, displacement=self._mapping(affine, deformation), affine=affine,
                           deformation=deformation, organ_maps=maps, organ_voxels=voxels)

    def _organ_maps(self, prompts: list[Prompt], both: torch.Tensor, sam_both: torch.Tensor):
        """(fixed, moving) logits of the prompt's organs, each scan in its own space, at the finest level, and
        the two scans' voxel embeddings."""
        phrases, valid = self.condition.phrase_embeddings(prompts, both.device)
        logits, voxels = self.organ_map(both, sam_both, phrases.repeat(2, 1, 1), valid.repeat(2, 1))
        return tuple(logits.chunk(2)), tuple(voxels.chunk(2))

    def _map_channels(self, maps, size, mapping: torch.Tensor | None) -> list[torch.Tensor]:
        """Both maps as probabilities on a level's grid, the moving one moved like the moving features."""
        fixed_map, moving_map = (_resize_map(torch.sigmoid(m), size) for m in maps)
        if mapping is not None:
            moving_map = self.transformer(moving_map, mapping)
        return [fixed_map, moving_map]

    @staticmethod
    def _mapping(affine: torch.Tensor | None, deformation: torch.Tensor) -> torch.Tensor:
        return deformation if affine is None else affine_head.compose(affine, deformation)

    def warp(self, image: torch.Tensor, displacement: torch.Tensor, nearest: bool = False) -> torch.Tensor:
        return self.transformer(image, displacement, nearest=nearest)

    def _check_inputs(self, fixed: torch.Tensor, moving: torch.Tensor) -> None:
        if fixed.dim() != 5 or fixed.shape[1] != 1:
            raise ValueError(f"fixed must be [B,1,D,H,W], got {tuple(fixed.shape)}")
        if moving.shape != fixed.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must share a grid; "
                             f"resample them first (UniReg.register does)")
        div = self.config.size_divisor
        if any(n % div for n in fixed.shape[2:]):
            raise ValueError(f"spatial size {tuple(fixed.shape[2:])} must be a multiple of {div}")


def _resize_map(probability: torch.Tensor, size) -> torch.Tensor:
    """Average over the cells when a map goes to a coarser grid (a small organ keeps its share), trilinear
    when it goes to a finer one."""
    if all(n <= m for n, m in zip(size, probability.shape[2:])):
        return F.adaptive_avg_pool3d(probability, tuple(size))
    return F.interpolate(probability, size=tuple(size), mode="trilinear", align_corners=False)
