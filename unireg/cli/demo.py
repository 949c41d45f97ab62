"""`unireg demo`: the embedded default end to end (phantom pair -> shipped model -> outputs)."""
from __future__ import annotations

from pathlib import Path

from ..hub import DEFAULT_MODEL
from .common import add_verb


def add_parser(subparsers) -> None:
    p = add_verb(subparsers, "demo", "register generated phantom pairs with the shipped model", run, long_running=True)
    p.add_argument("--out", default="unireg_out/demo")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--train", action="store_true", help="a short train -> export -> register run first")
    p.add_argument("--steps", type=int, default=40, help="training steps for --train")


def run(args) -> int:
    from ..demo import run_demo, run_train_demo
    out = Path(args.out)
    if args.train:
        from .common import require_extra
        require_extra("deepspeed", "train", "demo --train")
        run_train_demo(out, steps=args.steps)
    else:
        run_demo(out, model_name=args.model)
    return 0
