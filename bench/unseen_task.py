"""Unseen structures: no registration vs zero-shot prompt vs few-shot adapters (k = 1, 3, 5) vs the
full pipeline, next to the same organ when seen.

Two kinds of "unseen", on held-out phantom subjects (64^3 at 6 mm, the shipped model's grid):

* **held out of training** - organs present in the phantom's labels that the shipped model was
  never prompted with: training prompts only name organs with >= MIN_PROMPT_VOXELS voxels in
  both scans of a pair (unireg/data.py), and at 6 mm the duodenum, oesophagus, trachea and
  adrenal glands never reach it (``never_prompted`` below recounts it on training subjects).
  There is no "seen" version of these organs, so their seen column is empty.
* **unseen phrase** - a seen organ prompted with words the model never saw (free text with no
  organ name), next to the same organ prompted by its name: the "seen" reference. The gap is
  seen - zero-shot, and the table says which part of it the k = 5 adapter closes. Under the table,
  the name's own gain over the phrase on the k training pairs, with its standard error: the bar
  ``adapt``'s cross-validation sets, which even a perfectly learnt name must clear.

``--type inter`` (the default) uses inter-subject example pairs (two subjects), ``--type intra``
breathing pairs of one subject (``app.examples.intra_example_pair``), where the shipped model's
prompt moves organs most (docs/experiments/inter_steering/: held-out specificity +0.049 breathing,
+0.001 between subjects).

Dice is the mean over held-out pairs of the prompted structure on the working grid (for these
phantoms the scans' own grid). Few-shot pairs and held-out pairs share no subject.

    python bench/unseen_task.py                       # the table (about an hour on 2 busy cores)
    python bench/unseen_task.py --type intra          # the same on breathing pairs
    python bench/unseen_task.py --organs duodenum --k 1 --steps 10 --test-pairs 2   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.examples import example_pairs, intra_example_pair  # noqa: E402
from unireg.adapt import DEFAULT_RANK, adapt, mean_dice, pair_dice, prepare_pair  # noqa: E402
from unireg.api import UniReg  # noqa: E402
from unireg.data import MIN_PROMPT_VOXELS  # noqa: E402
from unireg.organs import ORGAN_TO_ID  # noqa: E402
from unireg.prompt import parse_prompt  # noqa: E402

HELD_OUT = ["duodenum"]     # also possible: esophagus, trachea (see never_prompted)
PHRASES = {  # seen organ -> words the model never saw for it (free text naming no organ)
    "pancreas": "align the elongated soft gland across the upper abdomen",
    "gallbladder": "align the small pear shaped sac in the upper right abdomen",
}
#: How a phrase says the registration type (``unireg.prompt``'s free-text rules).
TYPE_WORDS = {"inter": "between two patients", "intra": "of one patient breathing"}
TRAIN_START, TEST_START = 0, 10      # example pair indices: training pairs 0..4, held-out pairs 10..


def type_pairs(reg_type: str, n: int, start: int) -> list[dict]:
    """``n`` example pairs from index ``start``: two subjects ("inter") or two breathing phases ("intra")."""
    if reg_type == "inter":
        return example_pairs(n, start=start)
    return [intra_example_pair(start + i) for i in range(n)]


def never_prompted(n_subjects: int = 6) -> list[str]:
    """Organs of training-like subjects (seed 0 .., 64^3 at 6 mm) always below MIN_PROMPT_VOXELS."""
    from data_tools.phantom import make_subject
    counts: dict[str, list[int]] = {}
    for seed in range(n_subjects):
        labels = make_subject(seed, shape=(64, 64, 64), spacing_mm=(6.0, 6.0, 6.0)).labels
        sizes = np.bincount(labels.ravel(), minlength=len(ORGAN_TO_ID) + 1)
        for organ, idx in ORGAN_TO_ID.items():
            if sizes[idx]:
                counts.setdefault(organ, []).append(int(sizes[idx]))
    return sorted(o for o, c in counts.items() if max(c) < MIN_PROMPT_VOXELS)


def full_pipeline_dice(model, pairs: list[dict], prompt: str, organ: str, adapter=None) -> float:
    """Mean Dice after ``model.register`` with its defaults (alignment + refinement).

    The label maps are not given to ``register`` (its refinement would optimise Dice on them);
    the moving labels are warped afterwards with the result's field.
    """
    import nibabel as nib
    from unireg.metrics import organ_dice
    scores = []
    for pair in pairs:
        result = model.register(pair["fixed"], pair["moving"], prompt=prompt, adapter=adapter)
        warped = np.asanyarray(result.warp(pair["moving_labels"], labels=True).dataobj)
        fixed = np.asanyarray(nib.load(pair["fixed_labels"]).dataobj)
        scores.append(organ_dice(fixed, warped, {organ: ORGAN_TO_ID[organ]}).get(organ, float("nan")))
    return float(np.nanmean(scores))


def name_gain_on_training_pairs(model, organ: str, prompt: str, seen_prompt: str,
                                train_raw: list[dict]) -> tuple[float, float]:
    """The best a phrase's adapter could learn, measured the way ``adapt`` judges it: the organ's Dice
    under its own name minus under the phrase, on each of the k training pairs; mean and standard
    error. With k <= 5 each pair is one cross-validation fold, and ``adapt`` trusts a step count only
    when its mean gain over the folds exceeds this standard error, so when the name itself does not,
    no adapter can be trusted there, however well it learnt the name."""
    pairs = [prepare_pair(model, p) for p in train_raw]
    named, phrase = parse_prompt(seen_prompt), parse_prompt(prompt)
    gains = np.array([pair_dice(model, p, named, [organ]) - pair_dice(model, p, phrase, [organ]) for p in pairs])
    se = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else float("nan")
    return float(gains.mean()), se


def evaluate(model, organ: str, prompt: str, seen_prompt: str | None, ks, steps: int, train_raw, test_raw, test,
             full: bool, lr: float, rank: int = DEFAULT_RANK) -> dict:
    """One row of the table; adapters of k pairs train on ``train_raw[:k]``."""
    parsed = parse_prompt(prompt)
    row = {"organ": organ, "prompt": prompt,
           "no_registration": mean_dice(model, test, parsed, [organ], identity=True),
           "zero_shot": mean_dice(model, test, parsed, [organ])}
    if seen_prompt:
        row["seen"] = mean_dice(model, test, parse_prompt(seen_prompt), [organ])
    adapters = {}
    for k in ks:
        start = time.perf_counter()
        adapters[k] = adapt(model, train_raw[:k], prompt, steps=steps, lr=lr, structure=organ,
                            rank=rank, progress=False)
        row[f"seconds_k{k}"] = round(time.perf_counter() - start, 1)
        row[f"k{k}"] = mean_dice(model, test, parsed, [organ], adapter=adapters[k])
        print(f"  {organ}: k={k} -> {row[f'k{k}']:.3f} ({row[f'seconds_k{k}']:.0f} s)", flush=True)
    if full:
        row["full_zero_shot"] = full_pipeline_dice(model, test_raw, prompt, organ)
        if ks:
            row[f"full_k{max(ks)}"] = full_pipeline_dice(model, test_raw, prompt, organ, adapters[max(ks)])
    if seen_prompt and ks:
        row["name_gain_train"], row["name_gain_train_se"] = name_gain_on_training_pairs(
            model, organ, prompt, seen_prompt, train_raw[:max(ks)])
        gap = row["seen"] - row["zero_shot"]
        row["gap_closed_k%d" % max(ks)] = (row[f"k{max(ks)}"] - row["zero_shot"]) / gap if abs(gap) > 1e-6 else None
    return row


def print_table(rows: list[dict], ks) -> None:
    cols = ["no_registration", "zero_shot", *[f"k{k}" for k in ks], "full_zero_shot", f"full_k{max(ks)}", "seen"]
    names = {"no_registration": "no reg", "zero_shot": "zero-shot", "full_zero_shot": "full, zero-shot",
             f"full_k{max(ks)}": f"full + k={max(ks)}", "seen": "seen (name)", **{f"k{k}": f"k={k}" for k in ks}}
    header = f"{'organ':<12} {'unseen as':<14} " + " ".join(f"{names[c]:>15}" for c in cols)
    print(header)
    print("-" * len(header))
    for row in rows:
        kind = "held out" if "seen" not in row else "unseen phrase"
        cells = " ".join(f"{row[c]:>15.3f}" if isinstance(row.get(c), float) else f"{'—':>15}" for c in cols)
        print(f"{row['organ']:<12} {kind:<14} {cells}")
    for row in rows:
        key = f"gap_closed_k{max(ks)}"
        if "seen" not in row:
            continue
        gap = row["seen"] - row["zero_shot"]
        if abs(gap) < 0.02:
            print(f"{row['organ']}: seen - zero-shot gap {gap:+.3f} is within noise: the unseen words steer the "
                  f"model as well as the name, so there is no gap to close")
        elif gap < 0:
            print(f"{row['organ']}: seen - zero-shot gap {gap:+.3f}: on these held-out pairs the unseen words do "
                  f"better than the name, so there is no gap to close (k={max(ks)}: "
                  f"{row[f'k{max(ks)}'] - row['zero_shot']:+.3f} against zero-shot)")
        elif row.get(key) is not None:
            print(f"{row['organ']}: seen - zero-shot gap {gap:+.3f}; k={max(ks)} closes {100 * row[key]:.0f} % of it")
        if "name_gain_train" in row:
            gain, se = row["name_gain_train"], row["name_gain_train_se"]
            verdict = ("above it: an adapter that learns the name can be trusted" if gain > se else
                       "not above it: the cross-validation could not trust even an adapter that learnt the name "
                       "exactly; the model's prompt barely moves this organ on these pairs")
            print(f"{row['organ']}: on the k={max(ks)} training pairs the name itself gains {gain:+.3f} over the "
                  f"phrase, standard error {se:.3f} - {verdict}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unireg-tiny-phantom")
    parser.add_argument("--organs", nargs="*", default=HELD_OUT, help="held-out organs (default %(default)s)")
    parser.add_argument("--phrases", nargs="*", default=["pancreas"], choices=list(PHRASES),
                        help="seen organs prompted by unseen words (default %(default)s)")
    parser.add_argument("--k", nargs="*", type=int, default=[1, 3, 5])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK,
                        help="adapter LoRA rank (default %(default)s: the prompt embedding alone)")
    parser.add_argument("--test-pairs", type=int, default=3)
    parser.add_argument("--type", default="inter", choices=list(TYPE_WORDS),
                        help="inter-subject pairs or breathing pairs of one subject (default %(default)s)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-pipeline columns")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = UniReg.from_pretrained(args.model)
    unprompted = never_prompted()
    print(f"never prompted in training (< {MIN_PROMPT_VOXELS} voxels at 6 mm): {', '.join(unprompted)}")
    for organ in args.organs:
        if organ not in unprompted:
            print(f"warning: {organ} reaches {MIN_PROMPT_VOXELS} voxels in some training subject; it may have been seen")
    test_raw = type_pairs(args.type, args.test_pairs, TEST_START)
    train_raw = type_pairs(args.type, max(args.k, default=0), TRAIN_START)
    test = [prepare_pair(model, p) for p in test_raw]
    rows = []
    jobs = [(o, f"{args.type} | {o}", None) for o in args.organs] + \
        [(o, f"{PHRASES[o]} {TYPE_WORDS[args.type]}", f"{args.type} | {o}") for o in args.phrases]
    for organ, prompt, _ in jobs:
        if organ in args.phrases and parse_prompt(prompt).organs:
            raise SystemExit(f"the phrase for {organ} names an organ ({parse_prompt(prompt).organs}); reword it")
        if parse_prompt(prompt).type != args.type:
            raise SystemExit(f"the prompt {prompt!r} reads as {parse_prompt(prompt).type!r}, not {args.type!r}; "
                             "reword it")
    for organ, prompt, seen in jobs:
        print(f"{organ}: prompt {prompt!r}", flush=True)
        rows.append(evaluate(model, organ, prompt, seen, args.k, args.steps, train_raw, test_raw, test,
                             not args.no_full, args.lr, args.rank))
    print()
    print_table(rows, args.k)
    if args.k:
        k = max(args.k)
        times = [r[f"seconds_k{k}"] for r in rows]
        print(f"k={k} adaptation ({args.steps} steps, {args.threads} threads): {min(times):.0f}-{max(times):.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
