"""Command line of the app: ``python -m app`` and ``unireg app`` share these two functions."""
from __future__ import annotations

import argparse

from unireg.hub import DEFAULT_MODEL


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="shipped model name or a local save_pretrained folder")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 for a network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    parser.add_argument("--max-upload-mb", type=float, default=512.0, help="largest accepted upload (default 512 MB)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def run_app(args) -> int:
    """Serve until interrupted; returns the exit status."""
    import torch
    from unireg.io import InputError
    from .ui import build_app, launch
    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")
    demo = build_app(args.model, max_upload_mb=args.max_upload_mb, device=device)
    launch(demo, server_name=args.host, server_port=args.port, share=args.share)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="UniReg Gradio app")
    add_app_arguments(parser)
    return run_app(parser.parse_args(argv))
