"""`unireg card`: write an exported model's card (training curve, held-out table) from measured files."""
from __future__ import annotations

from pathlib import Path

from .common import add_verb


def add_parser(subparsers) -> None:
    p = add_verb(subparsers, "card", "write the model card of an exported model from its run and eval files", run)
    # dest run_dir: ``run`` is the verb's handler (add_verb's set_defaults)
    p.add_argument("--run", dest="run_dir", required=True, type=Path, help="run folder with train_log.csv / eval_log.csv")
    p.add_argument("--model", required=True, type=Path, help="exported model folder (card written into it)")
    p.add_argument("--eval", required=True, type=Path, help="folder written by `unireg eval`")
    p.add_argument("--command", required=True, help="the exact training command")
    p.add_argument("--data", required=True, help="what the model was trained on")
    p.add_argument("--train-minutes", type=float)
    p.add_argument("--hardware", default="this machine's CPU", help="what it was trained on, for the card")


def run(args) -> int:
    from ..training.model_card import write_model_card
    print(write_model_card(args.run_dir, args.model, args.eval, args.command, args.data, args.train_minutes,
                            args.hardware))
    return 0
