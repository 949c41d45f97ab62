"""`unireg export`: a DeepSpeed training checkpoint (any ZeRO stage) -> a save_pretrained folder."""
from __future__ import annotations

from .common import add_verb, require_extra

TRUST_HELP = ("DeepSpeed checkpoints are pickles read with torch.load(weights_only=False), which can run code; "
              "export reads only a run folder written by `unireg train` unless --trust is given")


def add_parser(subparsers) -> None:
    p = add_verb(subparsers, "export", "DeepSpeed checkpoint -> save_pretrained model folder", run)
    p.add_argument("--run", required=True, dest="checkpoint", help="training run folder (or its checkpoints/ folder)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--tag", help="checkpoint tag (default: latest complete)")
    p.add_argument("--trust", action="store_true", help=TRUST_HELP)
    p.epilog = TRUST_HELP


def run(args) -> int:
    require_extra("deepspeed", "train", "export")
    from ..training.export import export_checkpoint
    out = export_checkpoint(args.checkpoint, args.out, tag=args.tag, trust=args.trust)
    print(f"exported {args.checkpoint} to {out}")
    return 0
