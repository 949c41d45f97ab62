"""Seconds per pair for the network on this machine: tiny at 128^3 and vit_b at a smaller size.

    python bench/register_speed.py [--repeats 3] [--vit-b-size 64] [--device cpu]

Times ``UniReg.register(refine=False, align="none")`` end to end (resampling, network, mapping back
to the fixed grid) on generated volumes, after one warm-up call, and prints the core count beside
the figures. The full pipeline's seconds (pre-alignment and instance optimisation on top) are
``bench/vs_optimisers.py``'s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import blob_volume  # noqa: E402

from unireg import UniReg, UniRegConfig  # noqa: E402


def seconds_per_pair(model: UniReg, size: int, repeats: int, spacing: float) -> tuple[float, float]:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    fixed, _ = blob_volume((size,) * 3, seed=0)
    moving, _ = blob_volume((size,) * 3, shift=(3, -2, 1), seed=1)
    network_only = dict(refine=False, align="none")
    model.register((fixed, affine), (moving, affine), "inter | liver", **network_only)  # warm-up (text model, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            model.register((fixed, affine), (moving, affine), "inter | liver", **network_only)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vit-b-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}  torch threads: {torch.get_num_threads()}  device: {args.device}")
    rows = []
    # tiny: working grid 128^3 (1 mm voxels on a 128 mm field of view)
    tiny = UniReg(UniRegConfig.from_preset("tiny", working_spacing_mm=1.0)).to(args.device).eval()
    rows.append(("tiny", 128, sum(p.numel() for p in tiny.parameters()), *seconds_per_pair(tiny, 128, args.repeats, 1.0)))
    size = args.vit_b_size
    vit_b = UniReg(UniRegConfig.from_preset("vit_b", working_spacing_mm=1.0, max_working_size=size)).to(args.device).eval()
    rows.append(("vit_b", size, sum(p.numel() for p in vit_b.parameters()), *seconds_per_pair(vit_b, size, args.repeats, 1.0)))
    print(f"{'model':<8}{'grid':>8}{'params':>12}{'median s/pair':>16}{'best s/pair':>14}")
    for name, grid, params, median, best in rows:
        print(f"{name:<8}{grid:>7}³{params / 1e6:>11.1f}M{median:>16.2f}{best:>14.2f}")
    print(f"ratio vit_b({size}³) / tiny(128³): {rows[1][3] / rows[0][3]:.2f}")


if __name__ == "__main__":
    main()
