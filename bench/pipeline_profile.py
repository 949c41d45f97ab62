"""Where the default pipeline's seconds go, per stage and per function, on the benchmark's pairs.

    python bench/pipeline_profile.py [--cases abdomen_native chest_native ...] [--device cpu|cuda] [--top 25]

For each case (``bench/vs_optimisers.py``'s, seed 0) ``register`` runs once untimed (CUDA kernels,
allocator, text model), then once timed with its stages (``metrics["stages"]``, the instance
optimisation's levels from its stage's ``levels``), then once under cProfile: the functions with the
most own time (``--sort cumulative``: including what they call). On a GPU, time spent waiting for kernels shows up at the points that read results
back (``.item()``, ``float()``, ``.cpu()``): a Python-bound loop shows as many small calls instead.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_optimisers import CASES  # noqa: E402


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["abdomen_native", "chest_native"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="unireg-tiny-phantom")
    parser.add_argument("--top", type=int, default=25, help="functions listed per case")
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"],
                        help="list functions by their own time or by time including what they call")
    args = parser.parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    warnings.filterwarnings("ignore", category=FutureWarning)

    from unireg import UniReg
    model = UniReg.from_pretrained(args.model, device=args.device)
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}")
    for case in args.cases:
        pair = CASES[case](0, 100)
        call = lambda: model.register(pair.fixed, pair.moving, pair.prompt)  # noqa: E731
        call()
        _sync(args.device)
        start = time.perf_counter()
        result = call()
        _sync(args.device)
        total = time.perf_counter() - start
        stages = ", ".join(f"{s['stage']} {s['seconds']:.2f}" for s in result.metrics.get("stages", []))
        print(f"\n== {case}: fixed {pair.fixed.shape}, register {total:.2f} s (stages, s: {stages})")
        refine = next((s for s in result.metrics.get("stages", []) if s["stage"] == "refine"), {})
        for level in refine.get("levels", []):
            print(f"   refine level {level.get('level')}: shape {level.get('shape')}, {level.get('steps')} steps, "
                  f"{level.get('seconds', float('nan')):.2f} s")
        profiler = cProfile.Profile()
        profiler.enable()
        call()
        _sync(args.device)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(args.sort).print_stats(args.top)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
