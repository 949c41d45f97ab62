"""Checkpoint rotation and the errors of resuming / exporting from broken or foreign folders.

A stand-in engine writes what DeepSpeed writes (a tag folder with a ``.pt``), so the bookkeeping
of :class:`CheckpointManager` is tested in milliseconds; the real DeepSpeed round trip is in
``test_training.py``.
"""
import json

import pytest

from unireg.training.checkpoint import LATEST, STATE_FILE, CheckpointError, CheckpointManager, tag_for
from unireg.training.config import ConfigError


class FakeEngine:
    def __init__(self, fail_load: Exception | None = None):
        self.fail_load = fail_load
        self.loaded = []

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        folder = __import__("pathlib").Path(directory) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights")

    def load_checkpoint(self, directory, tag):
        if self.fail_load:
            raise self.fail_load
        self.loaded.append(tag)
        return f"{directory}/{tag}", {}


def _state(step):
    return {"step": step, "epoch": 0, "batch_in_epoch": step, "world_size": 1, "torch_rng": [0]}


def test_keep_last_prunes_old_complete_checkpoints_and_dead_saves(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    engine = FakeEngine()
    for step in (1, 2, 3):
        manager.save(engine, step, _state(step))
    assert manager.valid_tags() == [tag_for(2), tag_for(3)] and not (tmp_path / tag_for(1)).exists()
    (tmp_path / tag_for(4)).mkdir()                              # a save that died: no trainer state
    assert manager.latest() == tag_for(3)
    manager.save(engine, 5, _state(5))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [tag_for(3), tag_for(5)]
    assert (tmp_path / LATEST).read_text() == tag_for(5)
    assert manager.load(engine, tag_for(5))["step"] == 5 and engine.loaded == [tag_for(5)]


def test_unknown_tag_and_corrupt_state_are_named(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    engine = FakeEngine()
    manager.save(engine, 2, _state(2))
    with pytest.raises(CheckpointError, match=r"no complete checkpoint 'step_9' in .*; complete ones: step_00000002"):
        manager.load(engine, "step_9")
    assert isinstance(CheckpointError("x"), ConfigError)         # the command line prints it as one line, exit 2
    (tmp_path / tag_for(2) / STATE_FILE).write_text('{"step": 2, "epo')
    with pytest.raises(CheckpointError, match=r"trainer_state.json is unreadable .*--resume none"):
        manager.load(engine, tag_for(2))
    (tmp_path / tag_for(2) / STATE_FILE).write_text(json.dumps({"step": 2}))
    with pytest.raises(CheckpointError, match="lacks epoch, batch_in_epoch, torch_rng"):
        manager.load(engine, tag_for(2))
    assert engine.loaded == []                                   # nothing was half-restored


def test_unreadable_checkpoint_files_are_named(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(FakeEngine(), 2, _state(2))
    with pytest.raises(CheckpointError, match=r"step_00000002 cannot be loaded \(EOFError: Ran out of input\)"):
        manager.load(FakeEngine(fail_load=EOFError("Ran out of input")), tag_for(2))


def test_export_reads_only_run_folders_unless_trusted(tmp_path):
    pytest.importorskip("deepspeed")
    from unireg.training.export import export_checkpoint
    with pytest.raises(CheckpointError, match="is not a folder"):
        export_checkpoint(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(CheckpointError, match="model_config.json not found"):
        export_checkpoint(tmp_path, tmp_path / "out")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "model_config.json").write_text("{}")
    (run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):   # no trainer_state.json: not ours
        export_checkpoint(run, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no complete checkpoint 'step_00000002'"):
        export_checkpoint(run, tmp_path / "out", tag="step_00000002")
    with pytest.raises(CheckpointError, match=r"step_00000002 cannot be read \(UnpicklingError"):
        export_checkpoint(run, tmp_path / "out", tag="step_00000002", trust=True)
    assert not (tmp_path / "out").exists()
