"""`unireg adapt`: few-shot adaptation to a new structure from k labelled pairs (see unireg/adapt.py)."""
from __future__ import annotations

from .common import add_verb


def add_parser(subparsers) -> None:
    p = add_verb(subparsers, "adapt", "adapt to a new structure from a few labelled pairs", run, long_running=True)
    from ..adapt import add_adapt_arguments
    add_adapt_arguments(p)


def run(args) -> int:
    from ..adapt import run_adapt
    return run_adapt(args)
