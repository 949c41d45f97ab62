"""`unireg <verb>`: one command line for register, apply, prepare, train, eval, export, card, demo, adapt, app.

One parser module per verb, each with ``add_parser(subparsers)`` and ``run(args) -> int``.
One error path: a problem the user can fix (bad file, unknown organ, invalid config, missing
optional extra ...) prints one line ``unireg <verb>: error: ...`` and exits 2; anything else is
a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import sys

from . import adapt, app, apply, card, demo, evaluate, export, prepare, register, train
from .common import Parser, user_errors

#: Verbs in help order.
VERBS = (register, apply, prepare, train, evaluate, export, card, demo, adapt, app)


def build_parser() -> Parser:
    parser = Parser(prog="unireg", description="UniReg: prompt-controllable deformable registration of 3-D CT")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<verb>")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else args.log_level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        return int(args.run(args) or 0)
    except user_errors() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"unireg {args.command}: error: {message}", file=sys.stderr)
        return 2
