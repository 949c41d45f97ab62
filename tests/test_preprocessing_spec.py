"""One preprocessing spec (the model config's): training, evaluation and `register` give the network
the same input for the same scan, in the model's HU window, whatever spacing the shard was written at."""
import logging

import numpy as np
import pytest
import torch

from data_tools.prepare import PreparationError
from data_tools.shards import phantom_pairs, write_shards
from unireg import UniReg, UniRegConfig
from unireg.data import iterate_pairs
from unireg.evaluation import evaluate_shards
from unireg.preprocessing import normalize_ct
from unireg.training.config import TrainConfig
from unireg.training.trainer import Trainer

WORKING_MM = 4.0


def _model(**window) -> UniReg:
    config = UniRegConfig.from_preset("tiny", vit_img_size=64, vit_depth=1, working_spacing_mm=WORKING_MM, **window)
    return UniReg(config).eval()


def _one_pair_shard(folder, shape, spacing_mm: float) -> tuple[list[str], dict]:
    """One intra phantom pair written by the project's shard writer; returns (urls, the pair)."""
    key, pair = next(phantom_pairs(1, shape, (spacing_mm,) * 3, seed=3, intra_per_subject=1))
    write_shards(iter([(key, pair)]), folder)
    return sorted(str(p) for p in folder.glob("*.tar")), pair


def _capture_network_inputs(model: UniReg) -> list:
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((args[0].float(), args[1].float())))
    return seen


def _training_input(model: UniReg, urls: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's own loader (its spec from the model it trains), one pair as the network gets it."""
    config = TrainConfig.from_dict({"data": {"train": urls, "patch_size": None, "augment": False}})
    trainer = Trainer.__new__(Trainer)       # the data path only: no process group, no DeepSpeed engine
    trainer.config, trainer.run, trainer.model = config, config.run, model
    trainer.train_urls, trainer.batch_size = urls, 1
    batch = next(iter(trainer._loader(epoch=0)))
    return batch["fixed"], batch["moving"]


def _eval_input(model: UniReg, urls: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    seen = _capture_network_inputs(model)
    evaluate_shards(model, urls, max_pairs=1, with_hd95=False)
    return seen[0]


def _register_input(model: UniReg, pair: dict, spacing_mm: float, origin=(0.0, 0.0, 0.0)):
    """`register` on the same voxels given as NIfTI-style (i, j, k) arrays with an affine."""
    seen = _capture_network_inputs(model)
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = origin
    scan = lambda name: (pair[name].transpose(2, 1, 0), affine)  # noqa: E731
    model.register(scan("fixed"), scan("moving"), "intra", refine=False, align="none")
    return seen[-1]


@pytest.mark.parametrize("window", [{}, {"hu_min": -200.0, "hu_max": 300.0}], ids=["default window", "soft tissue"])
def test_training_eval_and_register_give_the_network_the_same_input(tmp_path, window):
    model = _model(**window)
    urls, pair = _one_pair_shard(tmp_path, (32, 32, 32), WORKING_MM)
    train, evaluation, register = (_training_input(model, urls), _eval_input(model, urls),
                                   _register_input(model, pair, WORKING_MM, origin=(-163.7, 20.3, 1001.9)))
    for i, name in enumerate(("fixed", "moving")):
        expected = normalize_ct(torch.from_numpy(pair[name].astype(np.float32)), model.config.hu_min,
                                model.config.hu_max)[None, None]
        assert train[i].shape == (1, 1, 32, 32, 32)
        assert torch.equal(train[i], expected), name       # the model's window, not a module default
        assert torch.equal(evaluation[i], expected), name
        assert torch.equal(register[i], expected), name
    if window:                                             # and it is not the default window's input
        assert not torch.equal(train[0], normalize_ct(torch.from_numpy(pair["fixed"].astype(np.float32)))[None, None])


@pytest.mark.parametrize("shape, spacing_mm", [((16, 16, 16), 8.0), ((30, 30, 30), WORKING_MM)],
                         ids=["another spacing", "sizes not a multiple of the stride"])
def test_shards_off_the_working_grid_are_resampled_as_register_resamples(tmp_path, caplog, monkeypatch, shape,
                                                                         spacing_mm):
    monkeypatch.setattr("unireg.data._warned_spacings", set())   # the warning comes once per spacing and process
    model = _model()
    urls, pair = _one_pair_shard(tmp_path, shape, spacing_mm)
    with caplog.at_level(logging.WARNING, logger="unireg.data"):
        train = _training_input(model, urls)
    assert train[0].shape == (1, 1, 32, 32, 32)           # 128 mm at 4 mm, sizes a multiple of 8
    assert f"shards at {spacing_mm:g}x{spacing_mm:g}x{spacing_mm:g} mm" in caplog.text
    assert f"working grid ({WORKING_MM:g} mm" in caplog.text
    # At the origin: elsewhere, rounding in io.WorkingGrid.resample can turn the scan's edge voxels into air.
    register = _register_input(model, pair, spacing_mm)
    evaluation = _eval_input(model, urls)
    for i in range(2):
        assert torch.equal(train[i], register[i])
        assert torch.equal(evaluation[i], register[i])


def test_shards_record_their_spacing_and_a_sample_without_it_is_refused(tmp_path):
    key, pair = next(phantom_pairs(1, (16, 16, 16), (8.0,) * 3, seed=1))
    write_shards(iter([(key, pair)]), tmp_path / "good")
    sample = next(iterate_pairs(sorted(str(p) for p in (tmp_path / "good").glob("*.tar"))))
    assert sample["meta"]["spacing"] == [8.0, 8.0, 8.0]
    del pair["meta"]["spacing"]
    with pytest.raises(PreparationError, match="needs 'spacing'"):
        write_shards(iter([(key, pair)]), tmp_path / "bad")


def test_config_rejects_an_empty_window():
    with pytest.raises(ValueError, match="hu_max"):
        UniRegConfig(hu_min=500.0, hu_max=500.0)
    spec = UniRegConfig.from_preset("vit_b").preprocessing
    assert (spec.spacing_mm, spec.max_size, spec.divisor, spec.hu_min, spec.hu_max) == (1.5, 256, 16, -1000.0, 1000.0)
