"""Held-out evaluation: per-organ Dice, HD95, Jacobian statistics and speed, against identity.

Pairs come from shards (``unireg.data.iterate_pairs``) with both scans on one grid; each is put on
the model's working grid by its preprocessing spec, exactly as training and ``register`` see a
scan, and scored there. The prompt is the pair's type and its organs (or a fixed task prompt).
Shards are named as files, folders, brace patterns, globs (also when the shell did not expand
them) or URLs; a local name that matches no readable tar is an error before any model runs, and
samples skipped as unreadable are counted in the report, so a score is never silently based on
fewer pairs than the data holds.
"""
from __future__ import annotations

import csv
import glob
import json
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .metrics import jacobian_stats, organ_dice, organ_hd95
from .organ_presence import organs_in_both
from .organs import ORGAN_TO_ID
from .prompt import Prompt, parse_prompt


def pair_prompt(meta: dict, fixed_labels: np.ndarray, moving_labels: np.ndarray, prompt: "str | None") -> Prompt:
    if prompt:
        return parse_prompt(prompt)
    organs = organs_in_both(fixed_labels, moving_labels, among=meta.get("organs", []))
    return Prompt(type=meta.get("type", "inter"), organs=tuple(organs))


@torch.no_grad()
def evaluate_pair(model, fixed_hu, moving_hu, fixed_lab, moving_lab, prompt: Prompt, spacing, with_hd95=True,
                  keep_field: bool = False) -> dict:
    """Arrays in tensor order [D,H,W] on one grid of ``spacing`` mm -> metrics after vs identity.
    ``keep_field`` adds the displacement (mm, [3,D,H,W] on the working grid) and the fixed labels there.

    The pair is put on the model's working grid first, as the training loader and ``register`` put
    a scan (``model.config.preprocessing``), and every metric is measured on that grid."""
    from .data import on_working_grid
    param = next(model.parameters())
    spec = model.config.preprocessing
    arrays, grid_mm = on_working_grid({"fixed": fixed_hu, "moving": moving_hu, "fixed_seg": fixed_lab,
                                       "moving_seg": moving_lab}, spacing, spec)
    fixed_lab, moving_lab = arrays["fixed_seg"], arrays["moving_seg"]
    spacing = (grid_mm,) * 3
    image = lambda name: spec.network_input(arrays[name])[None, None].to(param.device, param.dtype)  # noqa: E731

    start = time.perf_counter()
    out = model(image("fixed"), image("moving"), [prompt])
    disp = out.displacement.float()
    moving_seg = torch.from_numpy(np.ascontiguousarray(moving_lab, dtype=np.float32))[None, None].to(param.device)
    warped = model.warp(moving_seg, disp, nearest=True)[0, 0]
    seconds = time.perf_counter() - start
    warped = warped.round().cpu().numpy().astype(np.int64)
    names = {o: ORGAN_TO_ID[o] for o in prompt.organs} or {
        n: i for n, i in ORGAN_TO_ID.items() if i in set(np.unique(fixed_lab).tolist())}
    row = {"prompt": str(prompt), "seconds": seconds,
           "dice_identity": organ_dice(fixed_lab, moving_lab, names), "dice": organ_dice(fixed_lab, warped, names),
           **jacobian_stats(disp.cpu())}
    if with_hd95:
        row["hd95_identity"] = organ_hd95(fixed_lab, moving_lab, names, spacing)
        row["hd95"] = organ_hd95(fixed_lab, warped, names, spacing)
    if out.organ_maps is not None and prompt.organs:
        row["organ_map_dice"] = organ_map_dice(out.organ_maps[0], fixed_lab, names.values())
    if keep_field:
        row["field_mm"] = disp[0].cpu().numpy() * grid_mm
        row["fixed_labels"] = fixed_lab
    return row


def organ_map_dice(logits: torch.Tensor, labels: np.ndarray, ids) -> float:
    """How well a model's organ map of a scan (logits [1,1,...] on a coarser grid) finds the organs ``ids``:
    Dice of p > 0.5, brought to the label map's grid, against their union."""
    found = torch.sigmoid(F.interpolate(logits.float(), size=labels.shape, mode="trilinear", align_corners=False))
    found = found[0, 0].cpu().numpy() > 0.5
    truth = np.isin(labels, list(ids))
    total = found.sum() + truth.sum()
    return float(2 * (found & truth).sum() / total) if total else 1.0


def shard_list(specs) -> list[str]:
    """Files, folders (their ``*.tar``), brace patterns, globs or URLs -> shard URLs; UserError for a
    local name that is missing, matches nothing or is not a tar file."""
    import braceexpand
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    urls = []
    for spec in map(str, specs):
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", spec):
            urls.append(spec)
            continue
        for name in braceexpand.braceexpand(spec):
            if glob.has_magic(name):
                matches = sorted(glob.glob(name))
                if not matches:
                    raise UserError(f"--data {name!r} matches no file")
            elif Path(name).is_dir():
                matches = sorted(str(p) for p in Path(name).glob("*.tar"))
                if not matches:
                    raise UserError(f"--data {name}: no .tar shards in this folder")
            else:
                matches = [name]
            for path in matches:
                if not Path(path).is_file():
                    raise UserError(f"--data {path} not found")
                if not tarfile.is_tarfile(path):
                    raise UserError(f"--data {path} is not a .tar shard (write shards with `unireg prepare shards`)")
            urls.extend(matches)
    if not urls:
        raise UserError("--data names no shard")
    return urls


def evaluate_shards(model, urls, max_pairs: int | None = None, prompt: str | None = None, with_hd95=True) -> dict:
    """Metrics of every readable pair (up to ``max_pairs``); ``skipped`` counts the samples that were not."""
    from .data import iterate_pairs, skip_stats
    urls = shard_list(urls)
    skipped_before = Counter(skip_stats.counts)
    rows = []
    for sample in iterate_pairs(urls):
        if max_pairs and len(rows) >= max_pairs:
            break
        meta = sample["meta"]
        p = pair_prompt(meta, sample["fixed_seg"], sample["moving_seg"], prompt)
        row = evaluate_pair(model, sample["fixed"], sample["moving"], sample["fixed_seg"], sample["moving_seg"], p,
                            meta["spacing"], with_hd95)
        row.update(key=sample.get("key", ""), type=p.type)
        rows.append(row)
    skipped = dict(Counter(skip_stats.counts) - skipped_before)
    if not rows:
        raise UserError(f"no pair could be read from {len(urls)} shard(s) ({', '.join(urls[:3])}"
                        f"{', ...' if len(urls) > 3 else ''}); skipped: {skipped or 'none'}")
    return {"pairs": rows, "mean": summarize(rows), "skipped": skipped}


def summarize(rows: list[dict]) -> dict:
    def mean_of(key):
        vals = [np.mean(list(r[key].values())) for r in rows if r.get(key)]
        return float(np.mean(vals)) if vals else float("nan")
    out = {"pairs": len(rows), "dice_identity": mean_of("dice_identity"), "dice": mean_of("dice"),
           "nonpositive_jacobian_pct": float(np.mean([r["nonpositive_jacobian_pct"] for r in rows])),
           "sd_log_jacobian": float(np.mean([r["sd_log_jacobian"] for r in rows])),
           "seconds_per_pair": float(np.mean([r["seconds"] for r in rows]))}
    if "hd95" in rows[0]:
        out.update(hd95_identity=mean_of("hd95_identity"), hd95=mean_of("hd95"))
    return out


def per_organ_table(rows: list[dict]) -> list[dict]:
    """One row per (type, organ): mean Dice/HD95 after registration and for identity."""
    groups: dict[tuple, dict[str, list]] = {}
    for r in rows:
        for organ in r["dice"]:
            g = groups.setdefault((r["type"], organ), {"dice": [], "dice_identity": [], "hd95": [], "hd95_identity": []})
            for key in g:
                if organ in r.get(key, {}):
                    g[key].append(r[key][organ])
    table = []
    for (reg_type, organ), g in sorted(groups.items()):
        table.append({"type": reg_type, "organ": organ, "n": len(g["dice"]),
                      **{k: round(float(np.mean(v)), 4) if v else float("nan") for k, v in g.items()}})
    return table


def write_report(summary: dict, out_dir: "str | Path") -> dict[str, Path]:
    """Markdown + CSV tables (per organ and per type, model vs identity) and the raw JSON."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    organ_rows = per_organ_table(summary["pairs"])
    by_type = {t: summarize([r for r in summary["pairs"] if r["type"] == t])
               for t in sorted({r["type"] for r in summary["pairs"]})}
    paths = {"csv": out / "eval_per_organ.csv", "markdown": out / "eval.md", "json": out / "eval.json"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(organ_rows[0]))
        writer.writeheader()
        writer.writerows(organ_rows)
    lines = ["| type | pairs | Dice identity | Dice UniReg | HD95 identity (mm) | HD95 UniReg (mm) | % det J ≤ 0 | SDlogJ | s/pair |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t, s in {**by_type, "all": summary["mean"]}.items():
        lines.append(f"| {t} | {s['pairs']} | {s['dice_identity']:.3f} | {s['dice']:.3f} | "
                     f"{s.get('hd95_identity', float('nan')):.2f} | {s.get('hd95', float('nan')):.2f} | "
                     f"{s['nonpositive_jacobian_pct']:.4f} | {s['sd_log_jacobian']:.3f} | {s['seconds_per_pair']:.2f} |")
    lines += ["", "| type | organ | n | Dice identity | Dice UniReg | HD95 identity | HD95 UniReg |", "|---|---|---|---|---|---|---|"]
    for r in organ_rows:
        lines.append(f"| {r['type']} | {r['organ']} | {r['n']} | {r['dice_identity']:.3f} | {r['dice']:.3f} | "
                     f"{r['hd95_identity']:.2f} | {r['hd95']:.2f} |")
    skipped = summary.get("skipped", {})
    lines += ["", f"Skipped samples: {sum(skipped.values())}" +
              (f" ({', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items()))}; see the log)" if skipped else "")]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    report = {"by_type": by_type, **summary, "skipped": skipped, "skipped_total": sum(skipped.values())}
    paths["json"].write_text(json.dumps(report, indent=1, default=float))
    return paths
