"""UniReg against classical optimisers (ANTs SyN, Greedy, ConvexAdam) on the same pairs.

    python bench/vs_optimisers.py [--quick] [--cases NAME ...] [--methods NAME ...] [--seeds N]
                                  [--points N] [--model NAME_OR_PATH] [--device cpu|cuda] [--json FILE]
                                  [--smooth LAMBDA]

Prints one table - median and 95th-percentile TRE (mm), mean Dice, mean HD95 (mm), % of voxels
with det J <= 0, seconds per pair - then ratio lines of the default pipeline against the best
optimiser. Methods: ``identity``, ``aligned`` (UniReg's pre-alignment alone, ``align="auto"``: the
linear stage's share of the gain), ``network`` (UniReg, ``refine=False, align="none"``),
``network_aligned`` (pre-alignment + network, ``refine=False``: what the network adds to a rigid or
affine start), ``pipeline`` (UniReg defaults: pre-alignment + network + instance optimisation with
MIND-SSC), ``pipeline_fast`` (``refine="fast"``), ``pipeline_accurate`` (``refine="accurate"``),
``pipeline_lncc`` (``similarity="lncc"``), ``ants_syn``, ``greedy``,
``convexadam`` (see ``optimiser_methods``; install them with ``pip install -e ".[bench]"``).
``--smooth`` appends ``| smooth=LAMBDA`` to UniReg's prompts: the smoothness knob's trade-off on the same pairs.

Cases (see ``known_deformation`` for how the truth is made and ``real_ct`` for the scans):

* ``phantom_inter`` / ``phantom_intra``: CT-like phantoms (``data_tools.phantom``) of two subjects /
  two breathing phases, 96^3 at 4 mm, with labels; intra pairs carry the true field -> TRE too;
* ``chest_2mm`` / ``chest_native``: a real chest CT (1.5 mm native) at 2 mm / at 1.5 mm, warped by
  a rigid 3 deg + 4 mm motion and a smooth field up to 7 mm (a new draw per seed);
* ``chest_thick``: the moving scan with 5 mm slices (slice profile averaged);
* ``chest_crop``: the moving scan covers the central 70 % cranio-caudally (partial field of view);
* ``chest_large``: a larger rigid offset, 10 deg + 15 mm (plus the 7 mm field);
* ``chest_still``: the patient did not move: the 7 mm field alone, no rigid part;
* ``chest_rigid``: the rigid 3 deg + 4 mm alone, no field (what a network that never saw repositioning misses);
* ``abdomen_native``: a real abdomen-pelvis CT at its 3 mm, with 61 labelled structures.

The real scans are TotalSegmentator 2.18.0's test CTs (PyPI source distribution, Apache-2.0,
fetched once with pip into ``~/.cache/unireg-bench``; details and citation in ``real_ct``).

TRE is the distance between each method's fixed -> moving mapping and the true one at random
body voxels of the fixed scan (those whose true match lies inside the moving scan), in mm.
Errors are pooled over seeds; Dice, HD95, folding and seconds are means over pairs. Timings are
wall-clock on this machine with whatever else runs on it (the load average is printed).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import optimiser_methods as om  # noqa: E402
from known_deformation import (KnownDeformation, evaluation_points, inside_grid,  # noqa: E402
                               make_moving)
from registration_scores import (folding_pct, label_scores, mapped_points,  # noqa: E402
                                 warp_labels)

#: UniReg's rows: register() keywords (a method absent here is an optimiser or the identity).
UNIREG_METHODS = {"network": {"refine": False, "align": "none"}, "network_aligned": {"refine": False},
                  "pipeline": {}, "pipeline_fast": {"refine": "fast"},
                  "pipeline_accurate": {"refine": "accurate"}, "pipeline_lncc": {"similarity": "lncc"}}
ALL_METHODS = ("identity", "aligned", *UNIREG_METHODS, "ants_syn", "greedy", "convexadam")
OPTIMISERS = ("ants_syn", "greedy", "convexadam")


@dataclass
class Pair:
    """One registration problem with whatever truth it has (labels, true mapping at points)."""
    case: str
    seed: int
    fixed: nib.Nifti1Image
    moving: nib.Nifti1Image
    prompt: str
    fixed_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None
    points: np.ndarray | None = None        # [N, 3] fixed world RAS mm
    true_points: np.ndarray | None = None   # [N, 3] their true matches in the moving world


# ------------------------------------------------------------------------------------------- cases
def phantom_pair(kind: str, seed: int, n_points: int, shape=(96, 96, 96), spacing=(4.0, 4.0, 4.0)) -> Pair:
    from data_tools.phantom import make_intra_pair, make_subject
    fixed_s = make_subject(1000 + seed, shape=shape, spacing_mm=spacing)
    to_nib = lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0)))  # noqa: E731  [D,H,W] -> (i,j,k)
    affine = fixed_s.affine
    fixed = nib.Nifti1Image(to_nib(fixed_s.image), affine)
    if kind == "inter":
        moving_s = make_subject(2000 + seed, shape=shape, spacing_mm=spacing)
        return Pair("phantom_inter", seed, fixed, nib.Nifti1Image(to_nib(moving_s.image), affine), "inter",
                    to_nib(fixed_s.labels), to_nib(moving_s.labels))
    moving_s, d = make_intra_pair(fixed_s, 3000 + seed)
    true_field = np.transpose(d[::-1], (3, 2, 1, 0)) @ affine[:3, :3].T          # voxels (dz,dy,dx) -> mm RAS
    points = evaluation_points(fixed, n_points, seed, mask=to_nib(fixed_s.labels) > 0)
    return Pair("phantom_intra", seed, fixed, nib.Nifti1Image(to_nib(moving_s.image), affine), "intra",
                to_nib(fixed_s.labels), to_nib(moving_s.labels), points, mapped_points(true_field, affine, points))


def real_pair(case: str, scan: str, seed: int, n_points: int, spacing_mm=2.0, moving_spacing=None, crop=None,
              rotation_deg=3.0, translation_mm=4.0, field_mm=7.0) -> Pair:
    from real_ct import load_scan
    fixed, labels = load_scan(scan, spacing_mm)
    truth = KnownDeformation.random(fixed, seed, rotation_deg, translation_mm, field_mm)
    moving, moving_labels = make_moving(fixed, truth, spacing_mm=moving_spacing, crop=crop, seed=seed, labels=labels)
    points = evaluation_points(fixed, 4 * n_points, seed)
    true = truth.inverse(points)
    keep = inside_grid(true, moving.shape, moving.affine)
    points, true = points[keep][:n_points], true[keep][:n_points]
    has_labels = labels is not None and labels.any()
    return Pair(case, seed, fixed, moving, "intra", labels if has_labels else None,
                moving_labels if has_labels else None, points, true)


CASES = {
    "phantom_inter": lambda seed, n: phantom_pair("inter", seed, n),
    "phantom_intra": lambda seed, n: phantom_pair("intra", seed, n),
    "chest_2mm": lambda seed, n: real_pair("chest_2mm", "chest", seed, n),
    "chest_native": lambda seed, n: real_pair("chest_native", "chest", seed, n, spacing_mm=None),
    "chest_thick": lambda seed, n: real_pair("chest_thick", "chest", seed, n, moving_spacing=(2.0, 2.0, 5.0)),
    "chest_crop": lambda seed, n: real_pair("chest_crop", "chest", seed, n, crop=((0, 1), (0, 1), (0.15, 0.85))),
    "chest_large": lambda seed, n: real_pair("chest_large", "chest", seed, n, rotation_deg=10.0, translation_mm=15.0),
    "chest_still": lambda seed, n: real_pair("chest_still", "chest", seed, n, rotation_deg=0.0, translation_mm=0.0),
    "chest_rigid": lambda seed, n: real_pair("chest_rigid", "chest", seed, n, field_mm=0.0),
    "abdomen_native": lambda seed, n: real_pair("abdomen_native", "abdomen", seed, n, spacing_mm=None),
}
QUICK_CASES = ("phantom_inter", "phantom_intra", "chest_2mm")


# ----------------------------------------------------------------------------------------- methods
def build_methods(names, model_name: str, device: str = "cpu") -> tuple[dict, list[str]]:
    """Callables for the requested methods; notes for those that cannot run here. ``device`` is where
    UniReg's model and ConvexAdam run (ANTs and Greedy are CPU programs)."""
    methods, notes = {}, []
    model = None
    if set(UNIREG_METHODS) & set(names) or "aligned" in names:
        from unireg import UniReg
        model = UniReg.from_pretrained(model_name, device=device)
    for name in names:
        if name == "identity":
            methods[name] = om.identity
        elif name == "network":
            methods[name] = om.unireg_network(model)
        elif name == "aligned":
            methods[name] = om.unireg_alignment(model)
        elif name in UNIREG_METHODS:
            if om.pipeline_available(model):
                methods[name] = om.unireg_pipeline(model, **UNIREG_METHODS[name])
            else:
                notes.append(f"{name}: not available (UniReg.register has no refine=/align= yet)")
        else:
            module = {"ants_syn": "ants", "greedy": "picsl_greedy", "convexadam": "convexAdam"}[name]
            try:
                __import__(module)
                methods[name] = (functools.partial(om.convex_adam, device=device) if name == "convexadam"
                                 else om.OPTIMISERS[name])
            except ImportError as exc:
                notes.append(f"{name}: not installed ({exc.name}); pip install -e \".[bench]\"")
    return methods, notes


def score(pair: Pair, field_mm: np.ndarray, seconds: float) -> dict:
    row = {"case": pair.case, "seed": pair.seed, "seconds": seconds,
           "folding_pct": folding_pct(field_mm, pair.fixed.affine)}
    if pair.points is not None:
        estimated = mapped_points(field_mm, pair.fixed.affine, pair.points)
        row["errors"] = np.linalg.norm(estimated - pair.true_points, axis=1)
    if pair.fixed_labels is not None:
        warped = warp_labels(pair.moving_labels, pair.moving.affine, field_mm, pair.fixed.affine)
        row.update(label_scores(pair.fixed_labels, warped, pair.fixed.header.get_zooms()[:3]))
    return row


def summarise(rows: list[dict]) -> dict:
    errors = [r["errors"] for r in rows if "errors" in r]
    pooled = np.concatenate(errors) if errors else None
    mean = lambda k: float(np.mean([r[k] for r in rows])) if rows and k in rows[0] else float("nan")  # noqa: E731
    return {"pairs": len(rows),
            "tre_median": float(np.median(pooled)) if pooled is not None else float("nan"),
            "tre_p95": float(np.percentile(pooled, 95)) if pooled is not None else float("nan"),
            "dice": mean("dice"), "hd95": mean("hd95"), "folding_pct": mean("folding_pct"), "seconds": mean("seconds")}


# -------------------------------------------------------------------------------------------- print
def _fmt(value, digits=2, suffix=""):
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}f}{suffix}"


def print_table(summary: dict, methods: list[str]) -> None:
    width = max(15, *(len(m) + 1 for m in methods))
    print(f"\n{'case':<16}{'method':<{width}}{'pairs':>6}{'TRE med':>9}{'TRE p95':>9}{'Dice':>7}{'HD95':>7}"
          f"{'detJ<=0 %':>11}{'s/pair':>9}")
    for case, by_method in summary.items():
        for m in methods:
            s = by_method.get(m)
            if s is None:
                continue
            if "error" in s:
                print(f"{case:<16}{m:<{width}}  failed: {s['error']}")
                continue
            print(f"{case:<16}{m:<{width}}{s['pairs']:>6}{_fmt(s['tre_median']):>9}{_fmt(s['tre_p95']):>9}"
                  f"{_fmt(s['dice'], 3):>7}{_fmt(s['hd95'], 1):>7}{_fmt(s['folding_pct'], 3):>11}"
                  f"{_fmt(s['seconds'], 1):>9}")


def print_ratios(summary: dict) -> None:
    """Each pipeline row (or the network when there is none) against the best / fastest optimiser per case."""
    print()
    for case, by_method in summary.items():
        opts = {m: s for m, s in by_method.items() if m in OPTIMISERS and "error" not in s}
        ok = [m for m in ("pipeline", "pipeline_fast", "pipeline_accurate")
              if m in by_method and "error" not in by_method[m]]
        if not ok and "network" in by_method and "error" not in by_method["network"]:
            ok = ["network"]
        if not opts:
            continue
        for ours_name in ok:
            print(f"ratio {case} {ours_name}: " + "; ".join(_ratio_parts(by_method[ours_name], opts)))


def _ratio_parts(ours: dict, opts: dict) -> list[str]:
    parts = []
    tre = {m: s["tre_median"] for m, s in opts.items() if np.isfinite(s["tre_median"])}
    if tre and np.isfinite(ours["tre_median"]):
        best = min(tre, key=tre.get)
        parts.append(f"median TRE {ours['tre_median'] / tre[best]:.2f}x best ({best} {tre[best]:.2f} mm)")
    dice = {m: s["dice"] for m, s in opts.items() if np.isfinite(s["dice"])}
    if dice and np.isfinite(ours["dice"]):
        best = max(dice, key=dice.get)
        parts.append(f"Dice {ours['dice'] - dice[best]:+.3f} vs best ({best} {dice[best]:.3f})")
    fastest = min(opts, key=lambda m: opts[m]["seconds"])
    parts.append(f"time {ours['seconds'] / opts[fastest]['seconds']:.2f}x fastest ({fastest} "
                 f"{opts[fastest]['seconds']:.1f} s; goal <= 0.33x)")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"1 seed, cases {', '.join(QUICK_CASES)}, 5000 points")
    parser.add_argument("--cases", nargs="+", choices=list(CASES))
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    parser.add_argument("--seeds", type=int, help="pairs per case (default 3, quick 1)")
    parser.add_argument("--points", type=int, help="TRE points per pair (default 20000, quick 5000)")
    parser.add_argument("--model", default="unireg-tiny-phantom")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where UniReg and ConvexAdam run (the goals are set on the 2-core CPU)")
    parser.add_argument("--json", help="also write every pair's scores here")
    parser.add_argument("--smooth", type=float, metavar="LAMBDA",
                        help="UniReg's prompts end in '| smooth=LAMBDA' (0-1; default: the type's own smoothness)")
    args = parser.parse_args(argv)
    if args.smooth is not None and not 0.0 <= args.smooth <= 1.0:
        parser.error(f"--smooth must lie in [0, 1], got {args.smooth}")
    cases = args.cases or (list(QUICK_CASES) if args.quick else list(CASES))
    seeds = args.seeds or (1 if args.quick else 3)
    n_points = args.points or (5000 if args.quick else 20000)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    warnings.filterwarnings("ignore", category=FutureWarning)      # MONAI's deprecation notes in HD95
    print("command: python bench/vs_optimisers.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"machine: {os.cpu_count()} cores, torch {torch.get_num_threads()} threads{gpu}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    methods, notes = build_methods(args.methods, args.model, args.device)
    for note in notes:
        print("note:", note)
    ours = [m for m in UNIREG_METHODS if m in methods]
    warm = ([*ours, "convexadam"] if args.device == "cuda" else ours[-1:])
    pair = phantom_pair("inter", 99, 10, shape=(48, 48, 48))
    for name in (m for m in warm if m in methods):   # warm-up: text model, allocator, CUDA kernels (not timed)
        methods[name](pair.fixed, pair.moving, "inter")

    rows: dict = {c: {m: [] for m in methods} for c in cases}
    errors: dict = {}
    traced: set = set()
    for case in cases:
        for seed in range(seeds):
            start = time.perf_counter()
            pair = CASES[case](seed, n_points)
            print(f"[{case} seed {seed}] fixed {pair.fixed.shape} {tuple(float(z) for z in pair.fixed.header.get_zooms()[:3])} mm, "
                  f"moving {pair.moving.shape} {tuple(round(float(z), 2) for z in pair.moving.header.get_zooms()[:3])} mm "
                  f"({time.perf_counter() - start:.1f} s to make)", flush=True)
            for name, run in methods.items():
                try:
                    prompt = pair.prompt if args.smooth is None else f"{pair.prompt} | smooth={args.smooth:g}"
                    field_mm, seconds = run(pair.fixed, pair.moving, prompt)
                    row = score(pair, field_mm, seconds)
                    rows[case][name].append(row)
                    tre = f"TRE median {np.median(row['errors']):.2f} mm, " if "errors" in row else ""
                    dice = f"Dice {row['dice']:.3f}, " if "dice" in row else ""
                    print(f"    {name:<17} {tre}{dice}{row['folding_pct']:.3f} % folded, {seconds:.1f} s", flush=True)
                except Exception as exc:  # one failing tool must not stop the comparison
                    errors[(case, name)] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    print(f"    {name:<17} failed: {errors[(case, name)]}", flush=True)
                    if name not in traced:                       # the first failure of a method in full
                        traced.add(name)
                        traceback.print_exc(limit=-3, file=sys.stdout)

    summary = {c: {m: ({"error": errors[(c, m)]} if not r and (c, m) in errors else summarise(r))
                   for m, r in by_m.items() if r or (c, m) in errors} for c, by_m in rows.items()}
    print_table(summary, list(methods))
    print_ratios(summary)
    if args.json:
        flat = [{k: (v.tolist() if isinstance(v, np.ndarray) and k != "errors" else v) for k, v in r.items() if k != "errors"}
                | {"method": m} for c in rows for m in rows[c] for r in rows[c][m]]
        Path(args.json).write_text(json.dumps({"command": sys.argv, "summary": summary, "pairs": flat}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
