"""`unireg eval`: Dice / HD95 / Jacobian statistics on held-out shards, against identity."""
from __future__ import annotations

from .common import add_model_flags, add_verb, resolve_device


def add_parser(subparsers) -> None:
    p = add_verb(subparsers, "eval", "evaluate a model on held-out pair shards vs identity", run, long_running=True)
    add_model_flags(p)
    p.add_argument("--data", required=True, nargs="+", help="shard files, a folder of shards or a brace pattern")
    p.add_argument("--out", default="eval_out", help="report folder (eval.md, eval.json, eval_per_organ.csv)")
    p.add_argument("--max-pairs", type=int)
    p.add_argument("--prompt", help="one prompt for every pair (default: each pair's type and organs)")
    p.add_argument("--no-hd95", action="store_true",
                   help="skip HD95 (distance transforms per organ: most of the time on large grids)")
    p.add_argument("--steering", action="store_true",
                   help="also prompt specificity per organ and SDlogJ per smooth=λ (steering.md / steering.csv)")
    p.add_argument("--zero-shot", nargs="*", default=[], metavar="ORGAN",
                   help="organs never named in training, reported apart in the steering table")


def run(args) -> int:
    from ..api import UniReg
    from ..evaluation import evaluate_shards, write_report
    model = UniReg.from_pretrained(args.model, device=resolve_device(args.device))
    summary = evaluate_shards(model, args.data, max_pairs=args.max_pairs, prompt=args.prompt,
                              with_hd95=not args.no_hd95)
    paths = write_report(summary, args.out)
    print(paths["markdown"].read_text())
    if args.steering:
        from ..prompt import parse_prompt
        from ..steering import evaluate_steering, write_steering_report
        zero_shot = tuple(o for name in args.zero_shot for o in parse_prompt(f"inter | {name}").organs)
        steering = evaluate_steering(model, args.data, max_pairs=args.max_pairs, zero_shot=zero_shot)
        print(write_steering_report(steering, args.out)["markdown"].read_text())
    return 0
