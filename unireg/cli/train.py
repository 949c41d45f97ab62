"""`unireg train` and its launcher-friendly alias `unireg-train` (what `deepspeed` launches).

    DS_ACCELERATOR=cpu unireg train --config train_configs/tiny_cpu.yaml
    deepspeed --num_gpus 2 $(which unireg-train) --config train_configs/tiny_cpu.yaml --resume auto
"""
from __future__ import annotations

import argparse
import sys

from .common import add_verb, require_extra


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="train_configs/<name>.yaml")
    parser.add_argument("--resume", default="auto", help="'auto' (latest complete checkpoint), a tag, or 'none'")
    parser.add_argument("--max-steps", type=int, help="stop after this global step (the schedule keeps run.steps)")
    parser.add_argument("--output-dir", help="override run.output_dir")
    parser.add_argument("--train-data", help="override data.train")
    parser.add_argument("--no-export", action="store_true", help="skip the save_pretrained export at the end")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def add_parser(subparsers) -> None:
    add_arguments(add_verb(subparsers, "train", "train with DeepSpeed from WebDataset shards", run, long_running=True))


def run(args) -> int:
    require_extra("deepspeed", "train", "train")
    from ..training.run import train_from_config
    outcome = train_from_config(args.config, resume=args.resume, max_steps=args.max_steps, output_dir=args.output_dir,
                                train_data=args.train_data, export=not args.no_export)
    if outcome.export_dir is not None:
        print(f"exported model to {outcome.export_dir}")
    if outcome.rank == 0:
        print(f"finished at step {outcome.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in outcome.metrics.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`unireg-train`: the same verb without the `unireg` prefix, for `deepspeed ... $(which unireg-train)`."""
    from . import main as unireg_main
    return unireg_main(["train", *(sys.argv[1:] if argv is None else argv)])


