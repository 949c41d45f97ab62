"""Model folders: every way a folder can be broken gives one clear ModelLoadError; hub ids resolve offline."""
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from unireg import UniReg
from unireg.errors import ModelLoadError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    UniReg.from_config("tiny").save_pretrained(folder, cache_vocabulary=False)
    return folder


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "m")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _pickle(path):
    path.write_bytes(pickle.dumps({"w": torch.zeros(2)}))


def _unknown_key(path):
    path.write_text(json.dumps({**json.loads(path.read_text()), "vit_colour": 3}))


def _wrong_type(path):
    path.write_text(json.dumps({**json.loads(path.read_text()), "vit_depth": "four"}))


def _not_json(path):
    path.write_text("{ not json")


def _other_size(path):
    save_file({"backbone.stray": torch.zeros(1)}, str(path))


def _wrong_shapes(path):
    model = UniReg.from_config("tiny")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("weight") and state[k].dim() == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(path))


@pytest.mark.parametrize("file, corrupt, message", [
    ("model.safetensors", _truncate, "not a readable safetensors file"),
    ("model.safetensors", _pickle, "never pickles"),
    ("config.json", _unknown_key, "unknown UniRegConfig keys"),
    ("config.json", _wrong_type, "'vit_depth' must be int"),
    ("config.json", _not_json, "not a readable JSON config"),
    ("model.safetensors", _other_size, "does not match its config"),
    ("model.safetensors", _wrong_shapes, "does not match its config"),
    ("prompt_cache.safetensors", _truncate, "not a readable safetensors file"),
])
def test_broken_model_folders_are_named(saved, tmp_path, file, corrupt, message):
    folder = _copy(saved, tmp_path)
    corrupt(folder / file)
    with pytest.raises(ModelLoadError, match=message) as info:
        UniReg.from_pretrained(folder)
    assert str(folder / file) in str(info.value) or "UniRegConfig" in str(info.value)


def test_missing_weights_and_unknown_names(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="is not a UniReg model folder"):
        UniReg.from_pretrained(folder)
    with pytest.raises(ModelLoadError, match="no UniReg model 'no-such-model'"):
        UniReg.from_pretrained("no-such-model")


def test_hub_id_and_revision_resolve_from_an_offline_cache(saved, tmp_path, monkeypatch):
    """A Hugging Face cache laid out as huggingface_hub writes it: refs/<branch> -> snapshots/<commit>/."""
    commit_a, commit_b = "a" * 40, "b" * 40
    repo = tmp_path / "hub" / "models--unireg--tiny-test"
    for commit in (commit_a, commit_b):
        shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit_b)
    config = json.loads((repo / "snapshots" / commit_a / "config.json").read_text())
    (repo / "snapshots" / commit_a / "config.json").write_text(json.dumps({**config, "integration_steps": 5}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    latest = UniReg.from_pretrained("unireg/tiny-test")
    pinned = UniReg.from_pretrained("unireg/tiny-test", revision=commit_a)
    assert latest.config.integration_steps == 7 and pinned.config.integration_steps == 5
    with pytest.raises(ModelLoadError, match="cannot fetch 'unireg/not-cached'"):
        UniReg.from_pretrained("unireg/not-cached")
