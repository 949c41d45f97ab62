"""`unireg` command line: register, prepare, train, eval, export, demo.

Errors a user can fix (bad file, unknown organ, ...) print one clear line and exit with
status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _register(args) -> int:
    import torch
    from .api import UniReg
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    model = UniReg.from_pretrained(args.model, device=device)
    result = model.register(args.fixed, args.moving, prompt=args.prompt, moving_labels=args.moving_labels,
                            fixed_labels=args.fixed_labels, optimize_steps=args.optimize_steps)
    paths = result.save(args.out)
    print(json.dumps({"outputs": {k: str(v) for k, v in paths.items()}, **result.summary()}, indent=2))
    return 0


class UserError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unireg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register a moving CT onto a fixed CT")
    reg.add_argument("--fixed", required=True, help="fixed image (.nii/.nii.gz/.mha/.nrrd)")
    reg.add_argument("--moving", required=True, help="moving image")
    reg.add_argument("--prompt", default="", help='e.g. "intra-subject | liver, spleen | smooth=0.3"')
    reg.add_argument("--out", required=True, help="output folder")
    reg.add_argument("--model", default="unireg-tiny-phantom", help="shipped name, model folder or hub id")
    reg.add_argument("--moving-labels", help="label map on the moving image's grid, warped with the field")
    reg.add_argument("--fixed-labels", help="label map on the fixed grid; Dice before/after is reported")
    reg.add_argument("--optimize-steps", type=int, default=0, help="test-time optimisation steps")
    reg.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    reg.set_defaults(func=_register)

    for module, name in (("data_tools.cli", "add_prepare_parser"), ("unireg.training.cli", "add_train_parsers"),
                         ("unireg.evaluation", "add_eval_parser"), ("unireg.demo", "add_demo_parser")):
        try:
            mod = __import__(module, fromlist=[name])
        except ImportError as exc:  # an optional extra (e.g. deepspeed) is missing
            logging.getLogger(__name__).debug("%s unavailable: %s", module, exc)
            continue
        getattr(mod, name)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .io import InputError
    from .prompt import PromptError
    try:
        return int(args.func(args) or 0)
    except (UserError, InputError, PromptError, FileNotFoundError) as exc:
        print(f"unireg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
