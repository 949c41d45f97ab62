"""`unireg adapt`: few-shot adaptation to a new structure from k labelled pairs (see unireg/adapt.py).

The arguments live here, not beside the adaptation code: building the command line must not import
torch and MONAI (``unireg --help`` and every other verb would wait seconds for them)."""
from __future__ import annotations

import argparse

from ..hub import DEFAULT_MODEL
from .common import add_verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True,
                        help="CSV with columns fixed,moving,fixed_labels,moving_labels, or a folder (pairs.csv or "
                             "one sub-folder per pair with fixed/moving/fixed_labels/moving_labels.nii.gz)")
    parser.add_argument("--prompt", required=True, help='the structure to adapt to, e.g. "inter | duodenum"')
    parser.add_argument("--model", default=DEFAULT_MODEL, help="shipped name, model folder or hub id")
    parser.add_argument("--steps", type=int, default=60, help="optimisation steps (default 60)")
    parser.add_argument("--rank", type=int, default=None,
                        help="LoRA rank of the controller updates (default: unireg.adapt.DEFAULT_RANK, 0, the "
                             "prompt embedding alone)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    parser.add_argument("--out", required=True, help="adapter file to write, e.g. duodenum.safetensors")
    parser.add_argument("--held-out", help="CSV or folder of held-out labelled pairs to measure Dice on")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-validate", action="store_true",
                        help="train all --steps steps; by default cross-validation over the pairs (one pair: "
                             "measured reversed) chooses how many to keep, none when no count beats zero-shot")


def add_parser(subparsers) -> None:
    add_arguments(add_verb(subparsers, "adapt", "adapt to a new structure from a few labelled pairs", run,
                           long_running=True))


def run(args) -> int:
    from ..adapt import run_adapt
    return run_adapt(args)
