"""Training configs: the shipped ones validate, mistakes are reported by key."""
import json
from pathlib import Path

import pytest
import yaml

from unireg.training.config import ConfigError, TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"


@pytest.mark.parametrize("name", ["tiny_cpu", "base_gpu", "large_multinode", "finetune_from_pretrained"])
def test_shipped_configs_validate(name):
    config = TrainConfig.from_yaml(CONFIGS / f"{name}.yaml")
    ds = config.deepspeed_dict()
    assert ds["train_micro_batch_size_per_gpu"] >= 1


def test_shipped_configs_match_their_purpose():
    tiny = TrainConfig.from_yaml(CONFIGS / "tiny_cpu.yaml")
    assert tiny.deepspeed_dict()["zero_optimization"]["stage"] == 2 and not tiny.deepspeed_dict()["bf16"]["enabled"]
    base = TrainConfig.from_yaml(CONFIGS / "base_gpu.yaml")
    assert base.model.preset == "vit_b" and base.deepspeed_dict()["bf16"]["enabled"]
    large = TrainConfig.from_yaml(CONFIGS / "large_multinode.yaml")
    assert large.model.preset == "vit_h" and large.model.activation_checkpointing
    assert large.deepspeed_dict()["zero_optimization"]["stage"] == 3
    assert (CONFIGS / "hostfile").read_text().count("slots=") >= 2


def _write(tmp_path, data, ds=None):
    (tmp_path / "ds.json").write_text(json.dumps(ds or {"train_micro_batch_size_per_gpu": 1}))
    data.setdefault("run", {}).setdefault("deepspeed_config", "ds.json")
    data.setdefault("data", {}).setdefault("train", "shards")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data, message", [
    ({"modle": {}}, "unknown config key modle; did you mean model"),
    ({"data": {"batchsize": 2}}, "unknown config key data.batchsize"),
    ({"data": {"patch_size": [64, 60, 64]}}, "data.patch_size: need three positive multiples of 8"),
    ({"data": {"smoothness": [0.5, 0.2]}}, "data.smoothness"),
    ({"loss": {"lncc_kernel": 8}}, "loss.lncc_kernel must be an odd number"),
    ({"run": {"steps": 0}}, "run.steps must be >= 1"),
    ({"run": {"task": "intra | lvr"}}, "run.task: unknown organ 'lvr'"),
    ({"model": {"preset": "vit_xxl"}}, "unknown model size 'vit_xxl'"),
    ({"model": {"overrides": {"vit_depht": 3}}}, "unknown UniRegConfig keys"),
])
def test_bad_values_are_named(tmp_path, data, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        TrainConfig.from_yaml(_write(tmp_path, data))


def test_bad_deepspeed_json(tmp_path):
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        TrainConfig.from_yaml(_write(tmp_path, {}, ds={"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage must be 0-3"):
        TrainConfig.from_yaml(_write(tmp_path, {}, ds={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 5}}))
