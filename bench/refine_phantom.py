"""TRE and seconds of the instance-optimisation stage on a phantom intra-subject pair.

    python bench/refine_phantom.py --size 128 [--threads 2] [--model unireg-tiny-phantom]

The pair is ``data_tools.phantom.make_intra_pair`` (breathing motion, true field known) on an
isotropic grid of ``size`` voxels over the phantom's 384 mm; TRE is the mean over body voxels of
the distance between the recovered and the true field. Rows: identity, the network alone (its
velocity at the model's working grid), refine from zero and refine started from the network.
Wall seconds depend on what else runs on the machine; CPU seconds (this process) much less.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.phantom import make_intra_pair, make_subject
from unireg.metrics import jacobian_stats
from unireg.modeling.transform import VelocityIntegrator, resize_field
from unireg.pipeline.refine import refine_velocity
from unireg.preprocessing import normalize_ct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model", default="unireg-tiny-phantom", help="model for the network rows ('' to skip)")
    parser.add_argument("--smoothness", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spacing = 384.0 / args.size
    fixed_s = make_subject(1, shape=(args.size,) * 3, spacing_mm=(spacing,) * 3)
    moving_s, truth = make_intra_pair(fixed_s, seed=2, amplitude_mm=15.0)
    fixed = torch.from_numpy(normalize_ct(fixed_s.image))[None, None]
    moving = torch.from_numpy(normalize_ct(moving_s.image))[None, None]
    body = torch.from_numpy(fixed_s.image > -500)
    truth = torch.from_numpy(truth)

    def row(name, displacement, seconds, history=None):
        wall, cpu = seconds
        tre = (displacement[0] - truth).norm(dim=0)[body] * spacing
        stats = jacobian_stats(displacement)
        steps = "/".join(str(h["steps"]) for h in history) if history else "-"
        print(f"| {name} | {float(tre.mean()):.2f} | {float(tre.quantile(0.95)):.2f} | {wall:.1f} | {cpu:.1f} | "
              f"{stats['nonpositive_jacobian_pct']:.3f} | {stats['sd_log_jacobian']:.3f} | {steps} |", flush=True)

    print(f"{args.size}^3 at {spacing:g} mm, {args.threads} thread(s), smoothness {args.smoothness}")
    print("| method | mean TRE mm | p95 TRE mm | wall s | CPU s | % det J <= 0 | SD log J | steps per level |")
    print("|---|---|---|---|---|---|---|---|")
    row("identity", torch.zeros(1, 3, *fixed.shape[2:]), (0.0, 0.0))
    start = None
    if args.model:
        from unireg.modeling.model import UniRegModel
        model = UniRegModel.from_pretrained(args.model)
        work = tuple(round(n * spacing / model.config.working_spacing_mm) for n in fixed.shape[2:])
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model(F.interpolate(fixed, size=work, mode="area"), F.interpolate(moving, size=work, mode="area"),
                        "intra-subject")
        start = out.velocity
        seconds = (time.perf_counter() - t, time.process_time() - c)
        row("network alone", resize_field(VelocityIntegrator()(start), fixed.shape[2:]), seconds)
    runs = [("refine auto from zero", None, {}), ("refine auto from network", start, {}),
            ("refine 4-2-1, 300 steps, from network", start, {"steps": 300})]
    for name, velocity, extra in runs:
        if "network" in name and start is None:
            continue
        t, c = time.perf_counter(), time.process_time()
        result = refine_velocity(fixed, moving, velocity, smoothness=args.smoothness, spacing_mm=spacing, **extra)
        row(name, result.displacement, (time.perf_counter() - t, time.process_time() - c), result.history)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
