"""Helpers for the training tests: small shards, a small config, running unireg-train."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from data_tools.shards import make_phantom_shards
from unireg.training.trainer import free_port


def small_shards(out: Path) -> Path:
    make_phantom_shards(out / "train", n_subjects=6, shape=(32, 32, 32), spacing=(12.0, 12.0, 12.0), seed=1,
                        intra_per_subject=1, inter_pairs=6, max_shard_bytes=300_000)
    make_phantom_shards(out / "val", n_subjects=2, shape=(32, 32, 32), spacing=(12.0, 12.0, 12.0), seed=9,
                        intra_per_subject=1, inter_pairs=1, max_shard_bytes=10 ** 9)
    return out


def write_config(folder: Path, shards: Path, steps: int, checkpoint_every: int, zero_stage: int = 2, **run) -> Path:
    """A tiny run's YAML in ``folder`` (run folder ``folder/run``, relative to the YAML like every path)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model": {"preset": "tiny", "overrides": {"vit_img_size": 64, "vit_depth": 1, "working_spacing_mm": 12.0}},
        "data": {"train": str(shards / "train"), "val": str(shards / "val"), "patch_size": [32, 32, 32],
                 "augment": True},
        "run": {"output_dir": "run", "steps": steps, "log_every": 1, "eval_every": 0,
                "checkpoint_every": checkpoint_every, "keep_last": 3, "record_data_order": True, **run},
        "deepspeed": {"zero_optimization": {"stage": zero_stage}, "scheduler": {"params": {"warmup_num_steps": 2}}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def training_env(**extra: str) -> dict:
    """Environment for a training subprocess: CPU DeepSpeed, one OpenMP thread, and no rank variables
    inherited from a launcher (the child starts its own single-rank or launched run)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train(config: Path, *args: str, launcher: list[str] | None = None, timeout: int = 600,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run ``unireg train`` (or ``launcher``) on a config; AssertionError with its output if it fails and ``check``."""
    env = training_env()
    command = (launcher or [sys.executable, "-m", "unireg.cli", "train"]) + ["--config", str(config), *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def deepspeed_launcher(n: int) -> list[str]:
    exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    script = shutil.which("unireg-train") or str(Path(sys.executable).parent / "unireg-train")
    return [exe, "--num_gpus", str(n), "--master_port", str(free_port()), script]


def data_order(run: Path, rank: int = 0) -> list[tuple[int, int, str]]:
    """(step, epoch, pair key) for every pair a rank trained on."""
    return [(int(a), int(b), c) for a, b, c, _ in _records(run, rank)]


def trained_prompts(run: Path, rank: int = 0) -> list[str]:
    """The prompt of every pair a rank trained on, in order."""
    return [prompt for *_, prompt in _records(run, rank)]


def _records(run: Path, rank: int) -> list[list[str]]:
    lines = (run / "data_order" / f"rank{rank}.txt").read_text().split("\n")
    return [line.split("\t") for line in lines if line]
