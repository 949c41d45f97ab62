"""DeepSpeed training: 2 CPU ranks, resume equals a straight run, crash mid-checkpoint, ZeRO-3 export, resume errors."""
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from training_utils import data_order, deepspeed_launcher, small_shards, train, trained_prompts, write_config
from unireg import UniReg
from unireg.training.checkpoint import STATE_FILE

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return small_shards(tmp_path_factory.mktemp("train_shards"))


@pytest.mark.distributed
def test_two_cpu_ranks_train_on_different_shards_and_export(shards, tmp_path):
    config = write_config(tmp_path, shards, steps=4, checkpoint_every=2)
    train(config, "--resume", "none", launcher=deepspeed_launcher(2))
    run = tmp_path / "run"
    keys = [{k for _, epoch, k in data_order(run, rank) if epoch == 0} for rank in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]           # both ranks trained, on different shards
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run / "checkpoints" / "step_00000004" / STATE_FILE).is_file()
    assert (run / "train_log.csv").read_text().count("\n") >= 4
    model = UniReg.from_pretrained(run / "export")
    affine = np.diag([12.0, 12.0, 12.0, 1.0])
    from data_tools.phantom import make_subject
    a, b = make_subject(1, (32, 32, 32), (12, 12, 12)), make_subject(2, (32, 32, 32), (12, 12, 12))
    result = model.register((a.image.transpose(2, 1, 0), affine), (b.image.transpose(2, 1, 0), affine), "inter | liver")
    assert result.warped.shape == (32, 32, 32) and np.isfinite(result.displacement).all()


def _weights(run):
    return load_file(str(run / "export" / "model.safetensors"))


def test_resume_matches_a_straight_run(shards, tmp_path):
    straight = write_config(tmp_path / "straight", shards, steps=6, checkpoint_every=3)
    train(straight, "--resume", "none")
    split = write_config(tmp_path / "split", shards, steps=6, checkpoint_every=3)
    train(split, "--resume", "none", "--max-steps", "3")
    assert not (tmp_path / "split" / "run" / "export").exists()
    proc = train(split, "--resume", "auto")
    assert "resumed from step_00000003" in proc.stderr
    a, b = _weights(tmp_path / "straight" / "run"), _weights(tmp_path / "split" / "run")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert data_order(tmp_path / "straight" / "run") == data_order(tmp_path / "split" / "run")


def test_time_box_ends_the_run_with_a_checkpoint_and_an_export(shards, tmp_path):
    """run.max_minutes stops long before run.steps, checkpoints, exports, and the schedule followed
    the clock (the learning rate decayed as if the steps had been run)."""
    config = write_config(tmp_path, shards, steps=100000, checkpoint_every=100000, max_minutes=0.15)
    proc = train(config, "--resume", "none")
    run = tmp_path / "run"
    assert "time box of 0.1 min spent" in proc.stderr or "time box of 0.2 min spent" in proc.stderr, proc.stderr[-2000:]
    rows = (run / "train_log.csv").read_text().strip().split("\n")
    step, lr = int(rows[-1].split(",")[0]), float(rows[-1].split(",")[1])
    assert 1 <= step < 1000
    assert lr < 0.5e-3                                              # base lr 1e-3: decayed by the clock
    assert (run / "export" / "model.safetensors").is_file()
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step_{step:08d}"
    state = yaml.safe_load((run / "checkpoints" / tag / STATE_FILE).read_text())
    assert state["train_seconds"] >= 9.0
    again = train(config, "--resume", "auto")                       # resumed: the box is spent, nothing more to do
    assert f"resumed from {tag}" in again.stderr


def test_run_killed_mid_checkpoint_resumes_from_the_last_good_one(shards, tmp_path):
    straight = write_config(tmp_path / "straight", shards, steps=4, checkpoint_every=2)
    train(straight, "--resume", "none")
    crashed = write_config(tmp_path / "crashed", shards, steps=4, checkpoint_every=2)
    train(crashed, "--resume", "none", "--max-steps", "4", "--no-export")
    ckpts = tmp_path / "crashed" / "run" / "checkpoints"
    # What a kill during the step-4 save leaves: DeepSpeed files half written, no trainer state.
    broken = ckpts / "step_00000004"
    (broken / STATE_FILE).unlink()
    for f in broken.glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    proc = train(crashed, "--resume", "auto")
    assert "resumed from step_00000002" in proc.stderr
    a, b = _weights(tmp_path / "straight" / "run"), _weights(tmp_path / "crashed" / "run")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_zero3_export_gives_the_engine_outputs(shards, tmp_path):
    config = write_config(tmp_path, shards, steps=2, checkpoint_every=2, zero_stage=3)
    train(config, "--resume", "none", "--no-export")
    from unireg.training.export import export_checkpoint
    out = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    exported = UniReg.from_pretrained(out)
    # the engine's own view of the weights: a run that exports from the live (gathered) engine
    train(config, "--resume", "auto")
    live = UniReg.from_pretrained(tmp_path / "run" / "export")
    x = torch.rand(1, 1, 32, 32, 32)
    y = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        a = exported(x, y, "intra | liver").displacement
        b = live(x, y, "intra | liver").displacement
    assert torch.allclose(a, b, atol=1e-6)
    assert a.abs().max() > 0


def test_task_specific_mode_trains_every_pair_on_the_one_task(shards, tmp_path):
    unified = write_config(tmp_path / "unified", shards, steps=3, checkpoint_every=3)
    train(unified, "--resume", "none", "--no-export")
    task = write_config(tmp_path / "task", shards, steps=3, checkpoint_every=3, task="intra | liver")
    train(task, "--resume", "none", "--no-export")
    sampled = trained_prompts(tmp_path / "unified" / "run")
    fixed = trained_prompts(tmp_path / "task" / "run")
    assert len(set(sampled)) > 1                                   # prompts sampled per pair by default
    assert len(fixed) == len(sampled) and set(fixed) == {"intra | liver"}
    assert data_order(tmp_path / "task" / "run") == data_order(tmp_path / "unified" / "run")  # same pairs, same order


def test_resume_from_a_broken_checkpoint_is_one_clear_line(shards, tmp_path):
    config = write_config(tmp_path, shards, steps=2, checkpoint_every=2)
    train(config, "--resume", "none", "--no-export")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"

    def fails(*args, message):
        proc = train(config, *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]

    fails("--resume", "step_00000009", message="no complete checkpoint 'step_00000009'")
    state = (ckpt / STATE_FILE).read_text()
    (ckpt / STATE_FILE).write_text(state[:15])
    fails("--resume", "auto", message="trainer_state.json is unreadable")
    (ckpt / STATE_FILE).write_text(state)
    for f in ckpt.glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    fails("--resume", "auto", message="step_00000002 cannot be loaded")
    bad = yaml.safe_load(config.read_text())
    bad["run"]["steps"] = "two"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    bad = tmp_path / "bad.yaml"
    proc = train(bad, check=False)
    assert proc.returncode == 2 and "run.steps: expected an integer, got 'two'" in proc.stderr
