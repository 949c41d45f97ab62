"""Training configs: the shipped ones validate, mistakes are reported by key, paths follow the YAML."""
import json
import os
from pathlib import Path

import pytest
import yaml

from unireg.training.config import ConfigError, TrainConfig, command_line_overrides
from unireg.training.deepspeed_config import BASE_PATH, build_deepspeed_config

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"
SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    config = TrainConfig.from_yaml(CONFIGS / f"{name}.yaml")
    ds = config.deepspeed_dict()
    assert ds["train_micro_batch_size_per_gpu"] >= 1
    assert ds["scheduler"]["params"]["total_num_steps"] == config.run.steps   # the schedule is run.steps
    assert config.output_dir == CONFIGS.parent / "runs" / config.output_dir.name


def test_one_home_for_deepspeed_settings():
    assert not list(CONFIGS.glob("*.json")) and not list(BASE_PATH.parent.glob("*_ds.json"))
    base = json.loads(BASE_PATH.read_text())
    tiny = TrainConfig.from_yaml(CONFIGS / "tiny_cpu.yaml").deepspeed_dict()
    assert {k: v for k, v in tiny.items() if k != "scheduler"} == {k: v for k, v in base.items() if k != "scheduler"}


def test_shipped_configs_match_their_purpose():
    tiny = TrainConfig.from_yaml(CONFIGS / "tiny_cpu.yaml")
    assert tiny.deepspeed_dict()["zero_optimization"]["stage"] == 2 and not tiny.deepspeed_dict()["bf16"]["enabled"]
    base = TrainConfig.from_yaml(CONFIGS / "base_gpu.yaml")
    ds = base.deepspeed_dict()
    assert base.model.preset == "vit_b" and ds["bf16"]["enabled"] and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["overlap_comm"] and ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999]                  # merged, not replaced
    large = TrainConfig.from_yaml(CONFIGS / "large_multinode.yaml")
    assert large.model.preset == "vit_h" and large.model.activation_checkpointing
    assert large.deepspeed_dict()["zero_optimization"]["stage"] == 3
    assert (CONFIGS / "hostfile").read_text().count("slots=") >= 2


def _write(tmp_path, data):
    data.setdefault("data", {}).setdefault("train", "shards")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data, message", [
    ({"modle": {}}, "unknown config key modle; did you mean model"),
    ({"data": {"batchsize": 2}}, "unknown config key data.batchsize"),
    ({"data": {"patch_size": [64, 60, 64]}}, "data.patch_size: need three positive multiples of 8"),
    ({"data": {"patch_size": [64, 64.5, 64]}}, "data.patch_size: need three positive multiples of 8"),
    ({"data": {"smoothness": [0.5, 0.2]}}, "data.smoothness"),
    ({"data": {"augment": "no"}}, r"data.augment: expected true or false, got 'no' \(str\)"),
    ({"data": {"train": [1, 2]}}, "data.train: expected shard paths"),
    ({"loss": {"lncc_kernel": 8}}, "loss.lncc_kernel must be an odd number"),
    ({"loss": {"lncc_kernel": 9.5}}, r"loss.lncc_kernel: expected an integer, got 9.5 \(float\)"),
    ({"loss": {"dice_weight": "1e-3"}}, "loss.dice_weight: expected a number.*write it with a decimal point"),
    ({"run": {"steps": 0}}, "run.steps must be >= 1"),
    ({"run": {"max_minutes": 0}}, "run.max_minutes must be > 0"),
    ({"model": {"controller_gain": -1.0}}, "model.controller_gain must be > 0"),
    ({"model": {"train_only": "affine"}}, r"model.train_only: expected a list or null, got .affine. \(str\)"),
    ({"model": {"train_only": [""]}}, "model.train_only must be a non-empty list of parameter-name prefixes"),
    ({"model": {"train_only": []}}, "model.train_only must be a non-empty list"),
    ({"loss": {"lncc_eps": 0.0}}, "loss.lncc_eps must be > 0"),
    ({"loss": {"affine_weight": -1.0}}, "loss.affine_weight must be >= 0"),
    ({"loss": {"affine_only": True, "affine_weight": 1.0}},
     r"loss.affine_only trains the affine head alone .* model.train_only: \[affine\] \(got 1.0 and None\)"),
    ({"loss": {"affine_only": True}, "model": {"train_only": ["affine"]}}, "needs loss.affine_weight > 0"),
    ({"loss": {"smoothness_range": [10.0, 1.0]}}, r"loss.smoothness_range must be two weights \[low, high\]"),
    ({"loss": {"smoothness_range": [0.1]}}, "loss.smoothness_range must be two weights"),
    ({"data": {"rigid_motion_prob": 1.5}}, r"data.rigid_motion_prob must be in \[0, 1\], got 1.5"),
    ({"data": {"rigid_motion": [5.0]}}, r"data.rigid_motion must be \[peak rotation in degrees, peak shift in mm\]"),
    ({"data": {"rigid_motion": [5.0, -1.0]}}, "data.rigid_motion must be .* both >= 0"),
    ({"run": {"steps": "four"}}, r"run.steps: expected an integer, got 'four' \(str\)"),
    ({"run": {"eval_hd95": 1}}, "run.eval_hd95: expected true or false"),
    ({"run": {"task": "intra | lvr"}}, "run.task: unknown organ 'lvr'"),
    ({"run": {"deepspeed_config": "ds.json"}}, "run.deepspeed_config: DeepSpeed settings are now the `deepspeed:`"),
    ({"model": {"preset": "vit_xxl"}}, "unknown model size 'vit_xxl'"),
    ({"model": {"overrides": {"vit_depht": 3}}}, "unknown UniRegConfig keys"),
    ({"deepspeed": {"optimizer": {"params": {"lr": -0.001}}}}, r"deepspeed.optimizer.params.lr must be > 0"),
    ({"deepspeed": {"zero_optimization": {"stage": 5}}}, "deepspeed.zero_optimization.stage must be 0, 1, 2 or 3"),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 0}}, "train_micro_batch_size_per_gpu must be >= 1"),
    ({"deepspeed": {"gradient_accumulation_steps": 1.5}}, "gradient_accumulation_steps: expected an integer"),
    ({"deepspeed": {"bf16": {"enabled": "yes"}}}, "deepspeed.bf16.enabled: expected true or false"),
    ({"deepspeed": {"train_micro_batch_size": 2}}, "did you mean deepspeed.train_micro_batch_size_per_gpu"),
    ({"deepspeed": {"scheduler": {"params": {"total_num_steps": 9}}}}, "set by the trainer from run.steps"),
    ({"deepspeed": [1]}, "deepspeed: expected a mapping"),
])
def test_bad_values_are_named(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(_write(tmp_path, data))


def test_yaml_overrides_merge_over_the_base_json():
    ds = build_deepspeed_config({"zero_optimization": {"stage": 3, "overlap_comm": True}, "bf16": {"enabled": True}}, 7)
    base = json.loads(BASE_PATH.read_text())
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True} and ds["bf16"]["enabled"]
    assert ds["optimizer"] == base["optimizer"] and ds["scheduler"]["params"]["total_num_steps"] == 7


def test_every_relative_path_follows_the_yaml_not_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = _write(folder, {"run": {"output_dir": "../runs/a", "export_dir": "exported"},
                           "data": {"train": "../shards/train", "val": ["../shards/v1.tar"]}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = TrainConfig.from_yaml(os.path.relpath(path, elsewhere))
    assert config.output_dir == tmp_path / "runs" / "a"
    assert config.export_dir == folder / "exported"
    assert config.resolve("../shards/train") == tmp_path / "shards" / "train"
    # flags typed on the command line mean the working directory's paths
    flags = command_line_overrides(output_dir="out", train_data="pipe:cat x.tar")
    config = TrainConfig.from_yaml(path, flags)
    assert config.output_dir == elsewhere / "out" and config.shard_urls("train") == ["pipe:cat x.tar"]
    large = TrainConfig.from_yaml(CONFIGS / "large_multinode.yaml")         # object-store URLs: one per shard
    urls = large.shard_urls("train")
    assert len(urls) == 4096 and urls[1] == "pipe:aws s3 cp s3://your-bucket/unireg/train/pairs-000001.tar -"


def test_data_paths_are_checked_when_the_run_starts(tmp_path):
    from data_tools.shards import make_phantom_shards
    make_phantom_shards(tmp_path / "shards" / "train", n_subjects=2, shape=(16, 16, 16), spacing=(24.0,) * 3,
                        inter_pairs=1)
    config = TrainConfig.from_yaml(_write(tmp_path, {"data": {"train": "shards/train", "val": "shards/val"}}))
    with pytest.raises(ConfigError, match=r"data.val: .*shards/val not found"):
        config.check_data()
    (tmp_path / "shards" / "val").mkdir()
    with pytest.raises(ConfigError, match=r"data.val: no .tar shards in .*unireg prepare shards"):
        config.check_data()
    (tmp_path / "shards" / "val" / "pairs-000000.tar").write_text("not a tar file")
    with pytest.raises(ConfigError, match="data.val: .*pairs-000000.tar is not a readable .tar shard"):
        config.check_data()
    staging = tmp_path / "shards" / "val" / "job0" / ".writing-x1"         # a `prepare shards` job still running
    staging.mkdir(parents=True)
    (staging / "pairs-000000.tar").write_bytes(b"half a tar")
    with pytest.raises(ConfigError, match="data.val: .*val/pairs-000000.tar is not a readable"):
        config.check_data()                                                 # the staged shard is not read at all
    config.data.val = "shards/train/pairs-{000000..000001}.tar"
    with pytest.raises(ConfigError, match="pairs-000001.tar not found"):
        config.check_data()
    config.data.val = "shards/train/pairs-{000000..000000}.tar"
    config.check_data()
    assert config.shard_urls("train") == [str(p) for p in sorted((tmp_path / "shards" / "train").glob("*.tar"))]
    config.model.from_pretrained = "../runs/nothing/export"
    with pytest.raises(ConfigError, match="model.from_pretrained: model folder .*nothing/export not found"):
        config.check_data()


def test_prompt_cache_is_a_file_or_a_model_that_holds_one(tmp_path):
    """A GPU node without the text model trains on embeddings made ahead: a shipped model's cache."""
    from unireg.hub import PROMPT_CACHE_NAME, resolve_model_dir
    config = TrainConfig.from_yaml(_write(tmp_path, {"model": {"prompt_cache": "unireg-tiny-phantom"}}))
    assert config.prompt_cache_file() == resolve_model_dir("unireg-tiny-phantom") / PROMPT_CACHE_NAME
    missing = TrainConfig.from_yaml(_write(tmp_path, {"model": {"prompt_cache": "no_such_cache.safetensors"}}))
    with pytest.raises(ConfigError, match="model.prompt_cache: 'no_such_cache.safetensors' is neither a file nor a model"):
        missing.prompt_cache_file()


def test_train_only_freezes_the_rest_and_names_a_prefix_that_matches_nothing(tmp_path):
    from unireg.training.trainer import build_model
    config = TrainConfig.from_yaml(_write(tmp_path, {"model": {"from_pretrained": "unireg-tiny-phantom",
                                                               "affine_head": True, "train_only": ["affine"]}}))
    model = build_model(config)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("affine.") for n in trained) and model.config.affine_head
    config.model.train_only = ["afine"]
    with pytest.raises(ConfigError, match=r"model.train_only: no parameter starts with \['afine'\]; .*'affine'"):
        build_model(config)
    config.model.from_pretrained = "unireg-tiny-3mm"                   # a shipped model without a head
    config.model.train_only, config.model.affine_head, config.loss.affine_weight = None, False, 1.0
    with pytest.raises(ConfigError, match="loss.affine_weight teaches an affine head, and this model has none"):
        build_model(config)
