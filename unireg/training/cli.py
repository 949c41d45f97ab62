"""`unireg-train` (also `unireg train`) and `unireg export`.

    deepspeed --num_gpus 2 $(which unireg-train) --config train_configs/tiny_cpu.yaml --resume auto
    unireg-train --config train_configs/tiny_cpu.yaml           # one plain process
"""
from __future__ import annotations

import argparse
import logging
import sys


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="train_configs/<name>.yaml")
    parser.add_argument("--resume", default="auto", help="'auto' (latest complete checkpoint), a tag, or 'none'")
    parser.add_argument("--max-steps", type=int, help="stop after this global step (the schedule keeps run.steps)")
    parser.add_argument("--output-dir", help="override run.output_dir")
    parser.add_argument("--train-data", help="override data.train")
    parser.add_argument("--no-export", action="store_true", help="skip the save_pretrained export at the end")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def run_training(args) -> int:
    from .run import train_from_config
    outcome = train_from_config(args.config, resume=args.resume, max_steps=args.max_steps, output_dir=args.output_dir,
                                train_data=args.train_data, export=not args.no_export)
    if outcome.export_dir is not None:
        print(f"exported model to {outcome.export_dir}")
    if outcome.rank == 0:
        print(f"finished at step {outcome.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in outcome.metrics.items()))
    return 0


def _export(args) -> int:
    from .export import export_checkpoint
    out = export_checkpoint(args.checkpoint, args.out, tag=args.tag)
    print(f"exported {args.checkpoint} to {out}")
    return 0


def add_train_parsers(subparsers) -> None:
    train = subparsers.add_parser("train", help="train with DeepSpeed (same as unireg-train)")
    add_train_arguments(train)
    train.set_defaults(func=run_training)
    export = subparsers.add_parser("export", help="DeepSpeed checkpoint -> save_pretrained folder")
    export.add_argument("checkpoint", help="run folder (or its checkpoints/ folder)")
    export.add_argument("out", help="output model folder")
    export.add_argument("--tag", help="checkpoint tag (default: latest complete)")
    export.set_defaults(func=_export)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unireg-train", description="Train UniReg with DeepSpeed")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .config import ConfigError
    try:
        return run_training(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"unireg-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
