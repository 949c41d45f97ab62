"""`unireg app`: the Gradio web app (prompted and few-shot registration), on 127.0.0.1 by default."""
from __future__ import annotations

from .common import add_verb, require_extra


def add_parser(subparsers) -> None:
    p = add_verb(subparsers, "app", "start the Gradio web app", run)
    try:
        from app.cli import add_app_arguments
    except ImportError:  # the app package ships with the source tree; its flags appear once it imports
        p.add_argument("rest", nargs="*", help="app flags")
        return
    add_app_arguments(p)


def run(args) -> int:
    require_extra("gradio", "app", "app")
    from app.cli import run_app
    return run_app(args)
