"""save_pretrained / from_pretrained round-trip and official SAM checkpoints."""
import pickle
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from synthetic import blob_volume
from unireg import UniReg, UniRegConfig
from unireg.errors import ModelLoadError
from unireg.modeling.sam_checkpoint import load_sam_image_encoder


def _perturb_controllers(model, seed=0):
    """Stand-in for a trained controller: non-zero output weights so prompts matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in model.controllers:
            c.out.weight.copy_(torch.randn(c.out.weight.shape, generator=g) * 0.05)


def test_save_and_load_pretrained_give_identical_outputs(tmp_path):
    model = UniReg.from_config("tiny")
    _perturb_controllers(model)
    hu, _ = blob_volume((32, 32, 32), seed=0)
    hu2, _ = blob_volume((32, 32, 32), shift=(2, 1, 0), seed=1)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    before = model.register((hu, affine), (hu2, affine), "intra | liver", refine=False)
    model.save_pretrained(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} >= {"config.json", "model.safetensors", "prompt_cache.safetensors"}
    loaded = UniReg.from_pretrained(tmp_path / "model")
    assert "left kidney" in loaded.embedder.cache          # organ vocabulary cached with the model
    loaded.embedder._load = None                            # a cached prompt must not need the text model
    after = loaded.register((hu, affine), (hu2, affine), "intra | liver", refine=False)
    assert np.array_equal(before.displacement, after.displacement)
    assert np.array_equal(np.asanyarray(before.warped.dataobj), np.asanyarray(after.warped.dataobj))


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no UniReg model"):
        UniReg.from_pretrained("does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a UniReg model folder"):
        UniReg.from_pretrained(tmp_path / "empty")


def _small_official_sam(img_size=256, embed=64, depth=4, heads=4, out=32, window=4, global_idx=(1, 3)):
    """A SAM built like segment_anything.build_sam, small enough for a test, saved like the official files."""
    encoder = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=embed, depth=depth, num_heads=heads,
                              out_chans=out, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, window_size=window, global_attn_indexes=global_idx)
    grid = img_size // 16
    sam = Sam(image_encoder=encoder,
              prompt_encoder=PromptEncoder(embed_dim=out, image_embedding_size=(grid, grid),
                                           input_image_size=(img_size, img_size), mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=out,
                                       transformer=TwoWayTransformer(depth=2, embedding_dim=out, mlp_dim=64, num_heads=2)))
    return sam


@pytest.mark.parametrize("working_img_size", [256, 128])
def test_official_sam_checkpoint_loads_into_backbone(tmp_path, working_img_size):
    sam = _small_official_sam()
    path = tmp_path / "sam_vit_test.pth"
    torch.save(sam.state_dict(), path)
    config = UniRegConfig.from_preset("tiny", vit_img_size=working_img_size, vit_embed_dim=64, vit_depth=4,
                                      vit_num_heads=4, vit_out_chans=32, vit_window_size=4,
                                      vit_global_attn_indexes=(1, 3))
    model = UniReg(config)
    report = load_sam_image_encoder(model.backbone.image_encoder, path)
    assert not report.missing
    assert any(k.startswith("mask_decoder.") for k in report.unused)
    assert any(k.startswith("prompt_encoder.") for k in report.unused)
    encoder = model.backbone.image_encoder
    assert torch.equal(encoder.blocks[0].mlp.lin1.weight, sam.image_encoder.blocks[0].mlp.lin1.weight)
    if working_img_size == 256:
        assert not report.resized
        x = torch.rand(1, 3, 256, 256)
        assert torch.allclose(encoder(x), sam.image_encoder(x), atol=1e-5)
    else:
        assert "pos_embed" in report.resized
        assert encoder.pos_embed.shape == (1, 8, 8, 64)
        assert any("rel_pos" in k for k in report.resized)   # global-attention tables resized too
        assert torch.isfinite(encoder(torch.rand(1, 3, 128, 128))).all()


def test_sam_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"image_encoder.pos_embed": torch.zeros(1), "payload": object()}, f)
    model = UniReg.from_config("tiny")
    with pytest.raises(ValueError, match="weights-only"):
        load_sam_image_encoder(model.backbone.image_encoder, path)


def test_sam_checkpoint_of_another_vit_size_is_a_clear_error(tmp_path):
    sam = _small_official_sam(embed=96, heads=4)
    path = tmp_path / "sam.pth"
    torch.save(sam.state_dict(), path)
    model = UniReg.from_config("tiny")
    with pytest.raises(ValueError, match="another ViT size"):
        load_sam_image_encoder(model.backbone.image_encoder, path)
