"""Shared pieces of the command line: the parser class, flags, devices, extras, user errors."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import UserError
from ..hub import DEFAULT_MODEL


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``unireg register: error: ...``, exit 2), like every other user error."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def add_verb(subparsers, name: str, help: str, run, long_running: bool = False) -> Parser:
    """A verb's parser; long-running verbs (train, prepare, eval) log progress at INFO by default."""
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.set_defaults(run=run, log_level=logging.INFO if long_running else logging.WARNING)
    return parser


def add_model_flags(parser: Parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="shipped model name, save_pretrained folder or Hugging Face hub id")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def resolve_device(name: str) -> str:
    import torch
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA device is available (use --device auto or cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def require_extra(module: str, extra: str, verb: str):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"'unireg {verb}' needs the {extra!r} extra ({exc.name or module} is not installed): "
                        f"pip install 'unireg[{extra}]'") from None


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes printed as one line; the optional parts' classes join when those parts import."""
    from ..io import InputError
    errors: list[type[BaseException]] = [UserError, InputError, FileNotFoundError, NotADirectoryError,
                                         PermissionError, IsADirectoryError]
    for module, names in (("unireg.training.config", ("ConfigError",)),
                          ("unireg.training.checkpoint", ("CheckpointError",)),
                          ("data_tools.prepare", ("PreparationError",)),
                          ("data_tools.shards", ("ShardError",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(errors)
