"""The paper's efficiency claim, measured once: one unified model against task-specific models.

    DS_ACCELERATOR=cpu python bench/multitask_cost.py [--steps 300] [--eval-every 50] [--spacing 12]
                                                      [--size 32] [--out DIR]

Two tasks, intra-subject (breathing phantoms) and inter-subject (two phantom subjects), each with
its own training and validation shards (default 12 mm, 32^3: the scale a CPU trains in minutes;
the model works at ``--spacing``). A
task-specific model per task (``run.task``: one fixed prompt, only that task's pairs) trains
``--steps`` steps; the unified model trains on both tasks' pairs with sampled prompts for twice
that, the two task-specific budgets together. Every ``--eval-every`` steps each model is scored on
its tasks' held-out pairs with the task's prompt (mean Dice over the organs of each pair).

Prints the curves, then the claim as a number: the step at which the unified model first matches
*both* task-specific models' final Dice, as a fraction of their summed steps (below 1: the unified
model is cheaper than training one model per task). Everything runs in this process, one trainer
after the other (DeepSpeed's engine on the CPU, one rank); the trainers' progress bars go to stderr.
The held-out sets are small (6 intra, 4 inter pairs): read the curves, not only the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TASKS = {"intra": {"intra_per_subject": 2, "inter_pairs": 0}, "inter": {"intra_per_subject": 0, "inter_pairs": 16}}


def make_data(root: Path, size: int, spacing: float) -> None:
    """``train/<task>`` and ``val/<task>`` shards: 8 training and 3 held-out subjects per task."""
    from data_tools.shards import make_phantom_shards
    grid = dict(shape=(size,) * 3, spacing=(spacing,) * 3)
    for task, pairs in TASKS.items():
        make_phantom_shards(root / "train" / task, n_subjects=8, seed=1, max_shard_bytes=300_000, **grid, **pairs)
        held_out = dict(pairs, inter_pairs=4 if pairs["inter_pairs"] else 0)
        make_phantom_shards(root / "val" / task, n_subjects=3, seed=9, max_shard_bytes=10 ** 9, **grid, **held_out)


def write_config(root: Path, name: str, train: str, steps: int, task: str | None, size: int,
                 spacing: float) -> Path:
    run = {"output_dir": f"runs/{name}", "steps": steps, "log_every": 10, "eval_every": 0,
           "checkpoint_every": steps, "keep_last": 1}
    if task:
        run["task"] = task
    model = {"preset": "tiny", "overrides": {"vit_img_size": 64, "vit_depth": 1, "working_spacing_mm": spacing}}
    config = {"model": model, "data": {"train": train, "patch_size": [size] * 3, "augment": True},
              "run": run, "deepspeed": {"zero_optimization": {"stage": 0},
                                        "scheduler": {"params": {"warmup_num_steps": 10}}}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def curve(config: Path, tasks: list[str], root: Path, eval_every: int) -> list[dict]:
    """Train the run of ``config`` in chunks of ``eval_every`` steps; after each, Dice per task."""
    from unireg.evaluation import evaluate_shards
    from unireg.training.config import TrainConfig
    from unireg.training.trainer import Trainer
    trainer = Trainer(TrainConfig.from_yaml(config))
    rows, start = [], time.perf_counter()
    while trainer.step < trainer.total_steps:
        trainer.stop_at = min(trainer.step + eval_every, trainer.total_steps)
        trainer.train()
        module = trainer.engine.module
        module.eval()
        row = {"step": trainer.step, "seconds": time.perf_counter() - start}
        for task in tasks:
            summary = evaluate_shards(module, str(root / "val" / task), prompt=task, with_hd95=False)["mean"]
            row[task] = summary["dice"]
            row[f"{task}_identity"] = summary["dice_identity"]
        module.train()
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per task-specific model")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--spacing", type=float, default=12.0, help="mm per voxel of the data and the model")
    parser.add_argument("--size", type=int, default=32, help="voxels per side of the phantoms")
    parser.add_argument("--out", type=Path, help="new or empty work folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.out and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty: give a new folder (runs must not mix with an earlier one's)")
    import torch
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"command: python bench/multitask_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        print(f"machine: {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, "
              f"load average {os.getloadavg()[0]:.1f}")
        make_data(root, args.size, args.spacing)
        curves = {}
        for task in TASKS:
            print(f"task-specific model '{task}' ({args.steps} steps):")
            config = write_config(root, f"only_{task}", f"train/{task}", args.steps, task, args.size, args.spacing)
            curves[task] = curve(config, [task], root, args.eval_every)
        print(f"unified model, both tasks, sampled prompts ({len(TASKS) * args.steps} steps):")
        config = write_config(root, "unified", "train", len(TASKS) * args.steps, None, args.size, args.spacing)
        unified = curve(config, list(TASKS), root, args.eval_every)
    report(curves, unified, args.steps)
    return 0


def report(curves: dict, unified: list[dict], steps: int) -> None:
    targets = {task: rows[-1][task] for task, rows in curves.items()}
    print(f"\n{'step':>6}" + "".join(f"{'only ' + t:>12}{'unified ' + t:>15}" for t in targets))
    for row in unified:
        cells = ""
        for task in targets:
            own = next((r[task] for r in curves[task] if r["step"] == row["step"]), None)
            cells += f"{'' if own is None else f'{own:.3f}':>12}{row[task]:>15.3f}"
        print(f"{row['step']:>6}{cells}")
    total = steps * len(targets)
    print("\nidentity Dice: " + ", ".join(f"{t} {unified[-1][t + '_identity']:.3f}" for t in targets))
    print("task-specific final Dice: " + ", ".join(f"{t} {d:.3f}" for t, d in targets.items()))
    reached = next((r["step"] for r in unified if all(r[t] >= d for t, d in targets.items())), None)
    if reached is None:
        best = {t: max(r[t] for r in unified) for t in targets}
        print(f"ratio: the unified model did not match both within {total} steps (the task-specific "
              f"models' sum); its best: " + ", ".join(f"{t} {d:.3f}" for t, d in best.items()))
    else:
        print(f"ratio: the unified model matched both at step {reached} = {reached / total:.2f}x the "
              f"task-specific models' summed {total} steps")


if __name__ == "__main__":
    sys.exit(main())
