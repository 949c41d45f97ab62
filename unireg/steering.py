"""How much the prompt steers: prompt specificity per organ and the response to ``smooth=λ``.

Prompt specificity of organ X on a pair is ``Dice(X | prompt "type | X") − Dice(X | whole body)``:
positive when naming X makes the network align X better than the global field does. Beside it, the
field change: how far (mm, mean over X's voxels) naming X moves the field there, which shows whether
the prompt acts at all when Dice does not move. Organs listed
as zero-shot (never named in training) are reported apart: their prompts reach the controller only
through the text embedding of their name. SDlogJ per λ shows whether ``smooth=`` acts, and acts
monotonically.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .evaluation import evaluate_pair, shard_list
from .organ_presence import organs_in_both
from .organs import ORGAN_TO_ID
from .prompt import Prompt

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def pair_steering(model, sample: dict, max_organs: int = 12, lambdas=LAMBDAS) -> dict:
    """One held-out pair -> {organ: specificity}, {λ: SDlogJ} and the Dice values behind them."""
    meta, spacing = sample["meta"], tuple(sample["meta"].get("spacing", (1.0, 1.0, 1.0)))
    args = (sample["fixed"], sample["moving"], sample["fixed_seg"], sample["moving_seg"])
    reg_type = meta.get("type", "inter")
    organs = organs_in_both(sample["fixed_seg"], sample["moving_seg"], min_voxels=125,
                            among=meta.get("organs", []))[:max_organs]
    whole = evaluate_pair(model, *args, Prompt(type=reg_type), spacing, with_hd95=False, keep_field=True)
    rows = {}
    for organ in organs:
        named = evaluate_pair(model, *args, Prompt(type=reg_type, organs=(organ,)), spacing, with_hd95=False,
                              keep_field=True)
        inside = whole["fixed_labels"] == ORGAN_TO_ID[organ]
        change = np.linalg.norm(named["field_mm"] - whole["field_mm"], axis=0)[inside]
        rows[organ] = {"named": named["dice"][organ], "whole_body": whole["dice"][organ],
                       "identity": whole["dice_identity"][organ],
                       "field_change_mm": float(change.mean()) if change.size else 0.0}
        if "organ_map_dice" in named:   # a model with an organ map: how well it found X in the fixed scan
            rows[organ]["map_dice"] = named["organ_map_dice"]
    sdlogj = {lam: evaluate_pair(model, *args, Prompt(type=reg_type, smoothness=lam), spacing,
                                 with_hd95=False)["sd_log_jacobian"] for lam in lambdas}
    return {"key": sample.get("key", ""), "type": reg_type, "organs": rows, "sd_log_jacobian": sdlogj}


def evaluate_steering(model, urls, max_pairs: int | None = None, zero_shot=()) -> dict:
    """Mean specificity per organ (seen and zero-shot apart) and mean SDlogJ per λ over held-out pairs."""
    from .data import iterate_pairs
    pairs = []
    for sample in iterate_pairs(shard_list(urls)):
        if max_pairs and len(pairs) >= max_pairs:
            break
        pairs.append(pair_steering(model, sample))
    return summarise_steering(pairs, zero_shot)


def summarise_steering(pairs: list[dict], zero_shot=()) -> dict:
    """:func:`pair_steering` results -> per-organ means, the mean specificity over seen and zero-shot
    organs, the same over seen organs per registration type (the prompt can steer breathing pairs and
    not inter-subject ones: the mixed mean hides that), and SDlogJ per λ."""
    per_organ: dict[str, list] = {}
    for p in pairs:
        for organ, r in p["organs"].items():
            per_organ.setdefault(organ, []).append(r)
    organs = {}
    for organ, rs in sorted(per_organ.items()):
        named, whole, ident, change = (float(np.mean([r[k] for r in rs]))
                                       for k in ("named", "whole_body", "identity", "field_change_mm"))
        organs[organ] = {"n": len(rs), "identity": ident, "whole_body": whole, "named": named,
                         "specificity": named - whole, "field_change_mm": change, "zero_shot": organ in zero_shot}
        if all("map_dice" in r for r in rs):
            organs[organ]["map_dice"] = float(np.mean([r["map_dice"] for r in rs]))
    lambdas = sorted({lam for p in pairs for lam in p["sd_log_jacobian"]})
    sdlogj = {lam: float(np.mean([p["sd_log_jacobian"][lam] for p in pairs])) for lam in lambdas}

    def mean_spec(zs: bool):
        vals = [o["specificity"] for o in organs.values() if o["zero_shot"] == zs]
        return float(np.mean(vals)) if vals else None

    by_type = {}
    for reg_type in sorted({p["type"] for p in pairs}):
        of_type = [p for p in pairs if p["type"] == reg_type]
        per = {}
        for p in of_type:
            for organ, r in p["organs"].items():
                if organ not in zero_shot:
                    per.setdefault(organ, []).append(r["named"] - r["whole_body"])
        by_type[reg_type] = {"pairs": len(of_type), "organs": len(per),
                             "mean_specificity_seen": float(np.mean([np.mean(v) for v in per.values()])) if per else None,
                             **_smoothness_per_pair(of_type)}
    return {"pairs": len(pairs), "organs": organs, "sd_log_jacobian": sdlogj,
            "mean_specificity_seen": mean_spec(False), "mean_specificity_zero_shot": mean_spec(True),
            "by_type": by_type,
            "smoothness_monotonic": all(a >= b for a, b in zip(list(sdlogj.values()), list(sdlogj.values())[1:]))}


#: The issue's bar for ``smooth=``: the largest λ gives at most this share of the smallest λ's SDlogJ, pair by pair.
SMOOTHNESS_RATIO_GOAL = 0.5


def _smoothness_per_pair(pairs: list[dict]) -> dict:
    """SDlogJ at the largest λ over SDlogJ at the smallest, pair by pair: the mean and largest ratio and how many
    pairs reach ``SMOOTHNESS_RATIO_GOAL`` (a mean over pairs hides the pairs that do not)."""
    ratios = []
    for p in pairs:
        sd = p["sd_log_jacobian"]
        if len(sd) >= 2 and sd[min(sd)] > 0:
            ratios.append(sd[max(sd)] / sd[min(sd)])
    if not ratios:
        return {}
    return {"sdlogj_ratio_mean": float(np.mean(ratios)), "sdlogj_ratio_max": float(np.max(ratios)),
            "pairs_at_most_half": int(sum(r <= SMOOTHNESS_RATIO_GOAL for r in ratios))}


def write_steering_report(summary: dict, out_dir: "str | Path") -> dict[str, Path]:
    """``steering.md`` (specificity per organ, SDlogJ per λ) and ``steering.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "steering.md", "csv": out / "steering.csv"}
    fmt = lambda v: "—" if v is None else f"{v:+.3f}"  # noqa: E731
    lines = [f"Prompt specificity = Dice(X | prompt X) − Dice(X | whole body), {summary['pairs']} held-out pairs; "
             f"mean over seen organs {fmt(summary['mean_specificity_seen'])}, "
             f"over zero-shot organs {fmt(summary['mean_specificity_zero_shot'])}", "",
             "Seen organs by registration type: " + "; ".join(
                 f"{t} {fmt(b['mean_specificity_seen'])} ({b['pairs']} pairs, {b['organs']} organs)"
                 for t, b in summary.get("by_type", {}).items()), "",
             "| organ | zero-shot | n | Dice identity | Dice whole body | Dice named | specificity | field change (mm) "
             "| organ map Dice |", "|---|---|---|---|---|---|---|---|---|"]
    for organ, o in summary["organs"].items():
        map_dice = f"{o['map_dice']:.3f}" if "map_dice" in o else "—"   # only a model with an organ map has one
        lines.append(f"| {organ} | {'yes' if o['zero_shot'] else ''} | {o['n']} | {o['identity']:.3f} | "
                     f"{o['whole_body']:.3f} | {o['named']:.3f} | {o['specificity']:+.3f} | "
                     f"{o['field_change_mm']:.2f} | {map_dice} |")
    lines += ["", "| smooth=λ | " + " | ".join(f"{lam:g}" for lam in summary["sd_log_jacobian"]) + " |",
              "|---|" + "---|" * len(summary["sd_log_jacobian"]),
              "| SDlogJ | " + " | ".join(f"{v:.4f}" for v in summary["sd_log_jacobian"].values()) + " |", "",
              f"SDlogJ falls monotonically with λ: {'yes' if summary['smoothness_monotonic'] else 'no'}"]
    ratios = {t: b for t, b in summary.get("by_type", {}).items() if "sdlogj_ratio_mean" in b}
    if ratios and summary["sd_log_jacobian"]:
        lams = list(summary["sd_log_jacobian"])
        lines += ["", f"SDlogJ at smooth={max(lams):g} over smooth={min(lams):g}, pair by pair: " + "; ".join(
            f"{t} mean {b['sdlogj_ratio_mean']:.2f} (largest {b['sdlogj_ratio_max']:.2f}), {b['pairs_at_most_half']} of "
            f"{b['pairs']} pairs at most {SMOOTHNESS_RATIO_GOAL:g}" for t, b in ratios.items())]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        keys = ("identity", "whole_body", "named", "specificity", "field_change_mm")
        writer.writerow(["organ", "zero_shot", "n", *keys, "map_dice"])
        for organ, o in summary["organs"].items():
            writer.writerow([organ, o["zero_shot"], o["n"], *(round(o[k], 4) for k in keys),
                             round(o["map_dice"], 4) if "map_dice" in o else ""])
    return paths
