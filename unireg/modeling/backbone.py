"""SAM image encoder applied to CT volumes slice by slice (2.5-D).

Each sampled axial slice and its two neighbours form the three input channels of a
segment-anything ``ImageEncoderViT``; the slice features are stacked back into a 3-D feature
volume. Fixed and moving scans share the encoder, so a pretrained SAM can be plugged in.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT

from ..config import UniRegConfig

# SAM normalises RGB in 0..255 with these statistics; CT in [0, 1] is mapped the same way so
# official SAM weights see inputs with the statistics they were trained on.
_SAM_MEAN, _SAM_STD = 123.675 / 255.0, 58.395 / 255.0


def build_image_encoder(config: UniRegConfig) -> ImageEncoderViT:
    from functools import partial
    return ImageEncoderViT(
        img_size=config.vit_img_size, patch_size=config.vit_patch_size, in_chans=3,
        embed_dim=config.vit_embed_dim, depth=config.vit_depth, num_heads=config.vit_num_heads,
        mlp_ratio=4.0, out_chans=config.vit_out_chans, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos=True,
        use_rel_pos=config.vit_window_size > 0 or bool(config.vit_global_attn_indexes),
        window_size=config.vit_window_size, global_attn_indexes=config.vit_global_attn_indexes,
    )


class SliceBackbone(nn.Module):
    """Volume [B,1,D,H,W] in [0,1] -> SAM features [B,C,D/s,H/s,W/s] at stride ``s``."""

    def __init__(self, config: UniRegConfig):
        super().__init__()
        self.image_encoder = build_image_encoder(config)
        self.stride = config.level_strides[0]
        self.img_size = config.vit_img_size
        self.gradient_checkpointing = False

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = volume.shape
        out_shape = (d // self.stride, h // self.stride, w // self.stride)
        slices = self._slice_triplets(volume, out_shape[0])            # [B*Dc, 3, H, W]
        slices = F.interpolate(slices, size=(self.img_size, self.img_size), mode="bilinear",
                               align_corners=False)
        slices = (slices - _SAM_MEAN) / _SAM_STD
        if self.gradient_checkpointing and self.training:
            feats = torch.utils.checkpoint.checkpoint(self.image_encoder, slices, use_reentrant=False)
        else:
            feats = self.image_encoder(slices)                          # [B*Dc, C, h', w']
        feats = feats.reshape(b, out_shape[0], *feats.shape[1:]).permute(0, 2, 1, 3, 4)
        return F.interpolate(feats, size=out_shape, mode="trilinear", align_corners=False)

    def _slice_triplets(self, volume: torch.Tensor, n_slices: int) -> torch.Tensor:
        """Centre slice of each coarse cell plus its neighbours, as 3 channels."""
        d = volume.shape[2]
        centres = ((torch.arange(n_slices, device=volume.device) + 0.5) * self.stride - 0.5).round().long()
        idx = torch.stack([centres - 1, centres, centres + 1], dim=1).clamp_(0, d - 1)  # [Dc, 3]
        picked = volume[:, 0][:, idx]                                   # [B, Dc, 3, H, W]
        return picked.reshape(-1, 3, *volume.shape[3:])
