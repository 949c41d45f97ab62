"""Training throughput of ``tiny``: pairs/s on 1 vs 2 local CPU ranks, side by side in one run.

    DS_ACCELERATOR=cpu python bench/train_scaling.py [--steps 30] [--size 64] [--patch 48]

Both runs use the same phantom shards, the same model and per-rank micro-batch (so 2 ranks
process twice the pairs per step), one torch thread per rank, and report the mean of
``pairs_per_s`` from ``train_log.csv`` after dropping the first logging window (warm-up).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from data_tools.shards import make_phantom_shards  # noqa: E402
from training_utils import deepspeed_launcher, train  # noqa: E402  (same launcher and env as the 2-rank test)

DEEPSPEED = {"train_micro_batch_size_per_gpu": 1}   # over unireg/training/deepspeed_base.json


def pairs_per_second(folder: Path, shards: Path, ranks: int, steps: int, patch: int, spacing: float) -> float:
    folder.mkdir(parents=True)
    config = {"model": {"preset": "tiny", "overrides": {"working_spacing_mm": spacing}},
              "data": {"train": str(shards), "patch_size": [patch] * 3},
              "run": {"output_dir": "run", "steps": steps, "log_every": 5, "eval_every": 0,
                      "checkpoint_every": steps},
              "deepspeed": DEEPSPEED}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    train(folder / "config.yaml", "--resume", "none", "--no-export", launcher=deepspeed_launcher(ranks))
    with open(folder / "run" / "train_log.csv") as f:
        rates = [float(row["pairs_per_s"]) for row in csv.DictReader(f)][1:]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=48)
    args = parser.parse_args()
    spacing = 384.0 / args.size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_phantom_shards(tmp / "shards", n_subjects=8, shape=(args.size,) * 3, spacing=(spacing,) * 3, seed=0,
                            intra_per_subject=1, inter_pairs=8, max_shard_bytes=2_000_000)
        rates = {n: pairs_per_second(tmp / f"ranks{n}", tmp / "shards", n, args.steps, args.patch, spacing)
                 for n in (1, 2)}
    print(f"cores: {os.cpu_count()}  tiny, crop {args.patch}^3 of {args.size}^3, micro-batch 1 per rank, "
          f"{args.steps} steps, 1 thread per rank")
    for n, rate in rates.items():
        print(f"{n} rank{'s' if n > 1 else ' '}: {rate:6.2f} pairs/s")
    print(f"ratio 2 ranks / 1 rank: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
