"""Where one training step's time goes: seconds per step and the top operators (torch.profiler).

A phantom pair at the model's working grid, the steering objective, Adam; run on the GPU when
there is one. ``--cudnn-benchmark`` lets cuDNN pick its convolution algorithms by timing them.

    python bench/train_step_profile.py --spacing 3 --shape 128 --batch 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from data_tools.shards import phantom_pairs
from unireg import UniReg, UniRegConfig
from unireg.losses import RegistrationLoss
from unireg.organ_presence import organs_in_both
from unireg.prompt import Prompt
from unireg.training.objective import registration_step


def batch_of(pair: dict, spec, batch: int, device: str, whole_body: bool) -> dict:
    image = lambda a: spec.network_input(a.astype(np.float32))[None, None]  # noqa: E731
    seg = lambda a: torch.from_numpy(a.astype(np.int64))[None, None]        # noqa: E731
    organs = organs_in_both(pair["fixed_seg"], pair["moving_seg"], 125)
    named = organs if whole_body else organs[:1]
    prompt = Prompt(type=pair["meta"]["type"], organs=() if whole_body else tuple(named), smoothness=0.3)
    one = {"fixed": image(pair["fixed"]), "moving": image(pair["moving"]),
           "fixed_seg": seg(pair["fixed_seg"]), "moving_seg": seg(pair["moving_seg"])}
    out = {k: v.repeat(batch, 1, 1, 1, 1).to(device) for k, v in one.items()}
    return {**out, "prompt": [prompt] * batch, "organs": [named] * batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--shape", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cudnn-benchmark", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    model = UniReg(UniRegConfig.from_preset("tiny", working_spacing_mm=args.spacing)).to(device).train()
    from unireg.hub import read_safetensors, resolve_model_dir
    model.embedder.cache.update(read_safetensors(resolve_model_dir("unireg-tiny-phantom") / "prompt_cache.safetensors"))
    shape, spacing = (args.shape,) * 3, (args.spacing,) * 3
    (_, pair), = list(phantom_pairs(1, shape, spacing, seed=0, intra_per_subject=1, inter_pairs=0))
    loss_fn = RegistrationLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for whole_body in (False, True):
        batch = batch_of(pair, model.config.preprocessing, args.batch, device, whole_body)

        def step():
            terms = registration_step(model, batch, loss_fn)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
        step()
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        label = "whole body (%d organs)" % len(batch["organs"][0]) if whole_body else "one organ"
        print(f"{device} {label}: {(time.perf_counter() - t) / args.steps:.3f} s/step, batch {args.batch}, "
              f"{args.shape}^3 at {args.spacing} mm")
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            step()
            sync()
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=48))


if __name__ == "__main__":
    main()
