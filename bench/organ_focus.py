"""Does naming an organ change the registration? Its Dice and TRE, named vs whole-body prompt.

Organ Dice and organ TRE with the prompt naming the organ against the whole-body prompt, on the
same pairs.

    python bench/organ_focus.py [--seeds N] [--organs NAME ...] [--cases NAME ...]
                                [--methods M ...] [--model NAME_OR_PATH] [--margin MM] [--gain G] [--json FILE]

Each organ X of each pair is registered twice, ``"<type> | X"`` and ``"<type>"``, by the network
(``refine=False``: the automatic pre-alignment, then the network's field), by the default pipeline, and by the pipeline with ``focus=True`` for the
named prompt and the fixed labels given to both runs (they place the focus region, as a fixed-image
mask does in ANTs or elastix); for a model with an organ map also with ``focus=True`` and no label map
(the map places the region). The optimiser never sees the moving labels: they are kept for
scoring, so Dice is an independent measure. Each run is scored on X alone: Dice, and the median TRE
over X's voxels where the true field is known (breathing phantoms, the real abdomen CT under a known
motion). Specificity = named - whole body. Cases are ``vs_optimisers``'s with label maps.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registration_scores import mapped_points, warp_labels  # noqa: E402
from vs_optimisers import CASES  # noqa: E402

DEFAULT_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach", "gallbladder",
                  "lung_lower_lobe_right", "heart", "duodenum")
#: register() keywords of each compared method for the named prompt (``+focus``: the fixed labels are
#: passed too, and the whole-body run gets them without the focus, which needs organs; ``+map_focus``: no
#: label map, the focus region comes from the model's organ map, for a model that has one).
METHODS = {"network": {"refine": False}, "pipeline": {}, "pipeline+focus": {"focus": True},
           "pipeline+map_focus": {"focus": True}}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def organ_scores(pair, field_mm, organ_id: int, organ_points) -> dict:
    warped = warp_labels(pair.moving_labels, pair.moving.affine, field_mm, pair.fixed.affine)
    row = {"dice": dice(pair.fixed_labels == organ_id, warped == organ_id)}
    if organ_points is not None:
        points, truth = organ_points
        row["tre"] = float(np.median(np.linalg.norm(mapped_points(field_mm, pair.fixed.affine, points) - truth,
                                                     axis=1)))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--organs", nargs="+", default=list(DEFAULT_ORGANS))
    parser.add_argument("--cases", nargs="+", default=["phantom_intra", "phantom_inter", "abdomen_native"],
                        choices=[c for c in CASES if c != "chest_native"])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help="default: all (pipeline+map_focus only for a model with an organ map)")
    parser.add_argument("--model", default="unireg-tiny-phantom")
    parser.add_argument("--margin", type=float, default=None, help="focus margin, mm (default: the pipeline's)")
    parser.add_argument("--gain", type=float, default=None, help="extra weight of a focus voxel (default: refine's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from unireg import UniReg
    from unireg.organs import ORGAN_TO_ID
    from unireg.pipeline import refine, register
    if args.margin is not None:
        register.FOCUS_MARGIN_MM = args.margin
    if args.gain is not None:
        refine.FOCUS_GAIN = args.gain
    model = UniReg.from_pretrained(args.model)
    if args.methods is None:
        args.methods = [m for m in METHODS if m != "pipeline+map_focus" or model.organ_map is not None]
    rows = []
    for case in args.cases:
        for seed in range(args.seeds):
            pair = CASES[case](seed, 20000)
            kind = pair.prompt
            if pair.fixed_labels is None:
                raise SystemExit(f"{case} has no label map: organ focus cannot be measured on it")
            fixed_labels = nib_like(pair.fixed, pair.fixed_labels)
            ids = {o: ORGAN_TO_ID[o] for o in args.organs
                   if (pair.fixed_labels == ORGAN_TO_ID[o]).sum() >= 27 and (pair.moving_labels == ORGAN_TO_ID[o]).any()}
            if not ids:
                print(f"{case} seed {seed}: none of {', '.join(args.organs)} in both label maps; skipped", flush=True)
            # network alone; pipeline with the prompt only (the network's steered start); pipeline with
            # focus=True and the fixed labels (the focus region).
            for method in args.methods:
                kw, labels = METHODS[method], fixed_labels if method.endswith("+focus") else None
                whole = model.register(pair.fixed, pair.moving, kind, fixed_labels=labels,
                                       **{k: v for k, v in kw.items() if k != "focus"})
                for organ, organ_id in ids.items():
                    organ_points = _organ_points(pair, organ_id)
                    named = model.register(pair.fixed, pair.moving, f"{kind} | {organ}", fixed_labels=labels, **kw)
                    w = organ_scores(pair, whole.displacement, organ_id, organ_points)
                    n = organ_scores(pair, named.displacement, organ_id, organ_points)
                    rows.append({"case": case, "seed": seed, "method": method, "organ": organ,
                                 **{f"whole_{k}": v for k, v in w.items()}, **{f"named_{k}": v for k, v in n.items()}})
                    print(f"{case} seed {seed} {method:15s} {organ:22s} Dice {w['dice']:.3f} -> {n['dice']:.3f}"
                          + (f"  TRE {w['tre']:.2f} -> {n['tre']:.2f} mm" if "tre" in w else ""), flush=True)
    print_summary(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def nib_like(image, array):
    import nibabel as nib
    return nib.Nifti1Image(np.asarray(array, dtype=np.int16), image.affine)


def _organ_points(pair, organ_id: int):
    """The breathing pair's evaluation points inside the organ and their true matches (None without truth)."""
    if pair.points is None:
        return None
    voxels = np.rint(np.linalg.solve(pair.fixed.affine, np.c_[pair.points, np.ones(len(pair.points))].T)[:3].T)
    voxels = voxels.astype(int)
    inside = pair.fixed_labels[tuple(voxels.T)] == organ_id
    return (pair.points[inside], pair.true_points[inside]) if inside.sum() >= 20 else None


def print_summary(rows) -> None:
    print("\n| case | method | organ | pairs | Dice whole body | Dice named | specificity | organ TRE whole | named |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["case"], r["method"], r["organ"]) for r in rows})
    means = {}
    for key in keys:
        sel = [r for r in rows if (r["case"], r["method"], r["organ"]) == key]
        m = lambda k: float(np.nanmean([r[k] for r in sel])) if all(k in r for r in sel) else float("nan")  # noqa: E731
        means.setdefault(key[:2], []).append(m("named_dice") - m("whole_dice"))
        tre = f"{m('whole_tre'):.2f} | {m('named_tre'):.2f}" if "whole_tre" in sel[0] else "- | -"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {len(sel)} | {m('whole_dice'):.3f} | {m('named_dice'):.3f} | "
              f"{m('named_dice') - m('whole_dice'):+.3f} | {tre} |")
    for (case, method), values in sorted(means.items()):
        print(f"mean specificity {case} {method}: {np.mean(values):+.3f} Dice over {len(values)} organs")


if __name__ == "__main__":
    sys.exit(main())
