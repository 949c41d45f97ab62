"""Few-shot adaptation: tune an adapter on k labelled pairs for a structure or task the model
was not trained on (``unireg adapt``).

Only the adapter learns (see :mod:`unireg.adapter`): the projected prompt embedding (by default
alone, ``DEFAULT_RANK``) and, with ``rank`` > 0, LoRA updates of the controllers - at most a few
thousand numbers, so a handful of pairs and a few minutes of CPU suffice and the base model stays
shared. The loss is the training loss
(:class:`unireg.losses.RegistrationLoss`: LNCC + Dice on the prompted structure + smoothness) on
the pairs resampled onto the model's working grid exactly as registration resamples them.

Pairs are given as

* a CSV with columns ``fixed,moving,fixed_labels,moving_labels`` (paths relative to the CSV);
* a folder holding such a ``pairs.csv``, or one sub-folder per pair with ``fixed.nii.gz``,
  ``moving.nii.gz``, ``fixed_labels.nii.gz`` and ``moving_labels.nii.gz`` (``.nii`` works too);
* in Python, a list of dicts with those keys (paths, nibabel images or (array, affine)).
"""
from __future__ import annotations

import contextlib
import csv
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .adapter import Adapter, AdapterError
from .io import InputError, load_image, load_labels
from .losses import RegistrationLoss
from .metrics import organ_dice
from .organs import ORGAN_TO_ID
from .prompt import Prompt, parse_prompt
from .training.objective import registration_step

logger = logging.getLogger(__name__)

PAIR_KEYS = ("fixed", "moving", "fixed_labels", "moving_labels")


# ---------------------------------------------------------------------------------------- pairs
@dataclass
class PairTensors:
    """One pair on the model's working grid: images in [0, 1] and label ids, [1,1,D,H,W]."""
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_seg: torch.Tensor
    moving_seg: torch.Tensor
    name: str = ""


def read_pair_list(source) -> list[dict]:
    """CSV file / folder / list of dicts -> list of dicts with the four ``PAIR_KEYS``."""
    if isinstance(source, (list, tuple)):
        pairs = [dict(p) if isinstance(p, dict) else dict(zip(PAIR_KEYS, p)) for p in source]
    else:
        path = Path(source)
        if path.is_dir():
            pairs = _read_folder(path)
        elif path.is_file():
            pairs = _read_csv(path)
        else:
            raise InputError(f"pairs not found: {path} (give a CSV of {','.join(PAIR_KEYS)} or a folder)")
    if not pairs:
        raise InputError(f"no labelled pairs in {source if not isinstance(source, (list, tuple)) else 'the list'}")
    for i, pair in enumerate(pairs):
        missing = [k for k in PAIR_KEYS if pair.get(k) in (None, "")]
        if missing:
            raise InputError(f"pair {i + 1} lacks {', '.join(missing)}; few-shot adaptation needs both label maps")
    return pairs


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not set(PAIR_KEYS) <= {f.strip() for f in reader.fieldnames}:
            raise InputError(f"{path} must be a CSV with a header row {','.join(PAIR_KEYS)}; "
                             f"got {reader.fieldnames}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    return [{k: str((path.parent / row[k]).resolve()) if row[k] else "" for k in PAIR_KEYS} for row in rows]


def _read_folder(path: Path) -> list[dict]:
    if (path / "pairs.csv").is_file():
        return _read_csv(path / "pairs.csv")
    pairs = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        found = {k: next((sub / f"{k}{s}" for s in (".nii.gz", ".nii") if (sub / f"{k}{s}").is_file()), None)
                 for k in PAIR_KEYS}
        if all(found.values()):
            pairs.append({k: str(v) for k, v in found.items()})
    if not pairs:
        raise InputError(f"{path} holds neither pairs.csv nor sub-folders with fixed/moving/fixed_labels/"
                         f"moving_labels.nii.gz")
    return pairs


def prepare_pair(model, pair: dict, name: str = "") -> PairTensors:
    """Load, check and resample one labelled pair onto the model's working grid.

    The same steps as registration (``unireg.pipeline.grids``): the fixed image's working grid,
    linear resampling of both scans, nearest of both label maps, the model's HU window. No
    pre-alignment: the adapter learns the network-only task.
    """
    from .pipeline.grids import label_tensor, scan_tensor, working_grid
    fixed = load_image(pair["fixed"], f"{name} fixed image".strip())
    moving = load_image(pair["moving"], f"{name} moving image".strip())
    fixed_lab = load_labels(pair["fixed_labels"], fixed, f"{name} fixed labels".strip())
    moving_lab = load_labels(pair["moving_labels"], moving, f"{name} moving labels".strip())
    grid = working_grid(fixed, model.config)
    param = next(model.parameters())
    image = lambda img: scan_tensor(img, grid, model.config, param.device, dtype=param.dtype)  # noqa: E731
    return PairTensors(image(fixed), image(moving), label_tensor(fixed_lab, grid, param.device),
                       label_tensor(moving_lab, grid, param.device), name)


def structure_organs(prompt: Prompt, structure=None) -> list[str]:
    """The organs whose Dice the adaptation optimises: ``structure`` (names) or the prompt's organs.

    ``structure`` lets a prompt in free words ("align the pear-shaped sac under the liver between
    two patients") be tied to the label it means.
    """
    if structure:
        names = [structure] if isinstance(structure, str) else list(structure)
        organs = []
        for name in names:
            parsed = parse_prompt(f"inter | {name}")
            organs.extend(parsed.organs)
        return list(dict.fromkeys(organs))
    if not prompt.organs:
        raise InputError(f"prompt {prompt.text or str(prompt)!r} names no structure; few-shot adaptation needs "
                         f"one whose labels are in the pairs, e.g. 'inter | duodenum', or a structure name")
    return list(prompt.organs)


# ------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def pair_dice(model, pair: PairTensors, prompt: Prompt, organs: list[str], identity: bool = False) -> float:
    """Mean Dice of the prompt's organs after registering ``pair`` (working grid)."""
    if identity:
        warped = pair.moving_seg
    else:
        out = model(pair.fixed, pair.moving, [prompt])
        warped = model.warp(pair.moving_seg.to(out.displacement.dtype), out.displacement, nearest=True).round().long()
    names = {o: ORGAN_TO_ID[o] for o in organs}
    scores = organ_dice(pair.fixed_seg[0, 0].cpu().numpy(), warped[0, 0].cpu().numpy(), names)
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def mean_dice(model, pairs: list[PairTensors], prompt: Prompt, organs: list[str], adapter: Adapter | None = None,
              identity: bool = False) -> float:
    context = adapter.applied(model, check=False) if adapter is not None else contextlib.nullcontext()
    with context:
        return float(np.nanmean([pair_dice(model, p, prompt, organs, identity) for p in pairs]))


# ---------------------------------------------------------------------------------------- adapt
#: LoRA rank of the controller updates by default: 0, the prompt embedding alone. Cross-validation
#: trusts a step count only when the folds agree, and a few pairs agree on a learned word more often
#: than on bent controllers. bench/unseen_task.py (60 steps, six held-out pairs), rank 4 -> rank 0,
#: Dice at k = 1 / 3 / 5: held-out duodenum 0.361 / 0.374 / 0.361 -> 0.392 / 0.375 / 0.392 (zero-shot
#: 0.361); pancreas by an unseen phrase 0.611 at every k with both (no step count trusted); gallbladder
#: by an unseen phrase, rank 0, 0.535 / 0.549 / 0.549 (zero-shot 0.549). Without the cross-validation
#: (one pair, 60 steps, three held-out pairs) rank 4 fits more: duodenum 0.217 -> 0.292, rank 0 -> 0.268;
#: but on five pancreas-phrase pairs rank 4 fell to 0.544 where rank 0 rose to 0.630 (zero-shot 0.611).
DEFAULT_RANK = 0
#: AdamW's decoupled weight decay pulls the LoRA factors and the prompt offset back to zero, i.e.
#: towards the base model, which is the sensible prior with k = 1..5 pairs.
WEIGHT_DECAY = 1e-2


def adapt(model, pairs, prompt: "str | Prompt", steps: int = 60, rank: int = DEFAULT_RANK, lr: float = 1e-2,
          held_out=None, progress: bool = True, seed: int = 0, callback=None, batch_size: int = 1,
          structure=None, dice_weight: float = 2.0, weight_decay: float = WEIGHT_DECAY,
          validate: bool = True) -> Adapter:
    """Train an adapter for ``prompt`` on labelled ``pairs`` (CSV / folder / list, see module doc).

    ``held_out`` pairs (same forms) are only measured: mean Dice of the prompted structure on the
    working grid with no registration, zero-shot and with the adapter, stored in the metadata.
    ``callback(step, total, loss)`` is called after every step, over all runs (e.g. a UI progress bar).
    ``structure``: organ name(s) whose labels the Dice term uses, default the prompt's organs.
    ``dice_weight``: the structure's Dice against LNCC (weight 1) - the task is the structure, so
    it weighs more than in training. ``batch_size``: pairs per step. One is the default: on the
    held-out duodenum (k = 5, 40 steps) all five per step fitted the training pairs better (Dice 0.61
    vs 0.51) but scored no better on held-out pairs (0.206 vs 0.222) in 6x the time. The learning
    rate decays on a cosine to a tenth of ``lr`` so the last steps settle instead of jumping between
    pairs.
    ``validate``: how many steps to keep is chosen by cross-validation. Each of up to MAX_FOLDS
    folds trains a fresh adapter without its pairs and measures their Dice before the first step
    and VALIDATION_CHECKS times on the way (one pair: trained on, and measured reversed). The final
    adapter is trained on every pair for the step count whose mean over the folds is best among
    those whose gain over the zero-shot prompt exceeds its standard error across the folds - none
    at all (the fresh adapter, which changes nothing) when no step count clears that bar. Adapters learn their training pairs'
    own motion: one pair lifted its own pancreas Dice 0.09 -> 0.77 and took the held-out pairs' from
    0.63 to 0.12, and a single kept-out pair was no guard (its Dice rose 0.62 -> 0.70 while six
    held-out pairs fell 0.61 -> 0.52).
    Returns the :class:`~unireg.adapter.Adapter`; the model's weights are left unchanged.
    """
    if steps < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    parsed = parse_prompt(prompt)
    organs = structure_organs(parsed, structure)
    train = [prepare_pair(model, p, f"pair {i + 1}") for i, p in enumerate(read_pair_list(pairs))]
    test = [prepare_pair(model, p, f"held-out pair {i + 1}") for i, p in enumerate(read_pair_list(held_out))] \
        if held_out is not None else []
    _check_structure_present(train, organs)

    dice_test = {}
    if test:
        dice_test["identity"] = mean_dice(model, test, parsed, organs, identity=True)
        dice_test["zero_shot"] = mean_dice(model, test, parsed, organs)
    n_folds = min(len(train), MAX_FOLDS) if validate else 0
    single = n_folds == 1      # one pair: its fold trains the final adapter itself (see _cross_validate)
    run = _Run(model, parsed, organs, steps, lr, weight_decay, batch_size, seed, dice_weight, rank,
               total=(n_folds + (0 if single else 1)) * steps, callback=callback, progress=progress)
    start = time.perf_counter()
    with _frozen(model):
        validation, kept_run = _cross_validate(run, train, n_folds) if n_folds else (None, None)
        chosen = validation["chosen_step"] if validation else steps
        if kept_run is not None:
            adapter, losses, dice_terms = kept_run.at(chosen)
        else:
            adapter, losses, dice_terms = run.fit(train, stop_at=chosen, desc=f"adapting to {parsed}")
    seconds = time.perf_counter() - start
    if test:
        dice_test["adapted"] = mean_dice(model, test, parsed, organs, adapter=adapter)
    adapter.metadata.update(structure=organs, dice_weight=dice_weight, weight_decay=weight_decay)
    adapter.metadata.update(_training_summary(train, chosen, lr, seed, batch_size, losses, dice_terms, seconds,
                                              dice_test, len(test)))
    if validation:
        adapter.metadata.update(steps_asked=steps, validation=validation)
    return adapter


#: Folds of the cross-validation that picks the step count (k pairs: min(k, MAX_FOLDS) folds).
MAX_FOLDS = 5
#: How many times during each fold the kept-out pairs are measured (besides before the first step).
VALIDATION_CHECKS = 6
#: With one pair there is nothing to keep out but the pair itself reversed (moving <-> fixed): an
#: adapter that learnt the structure registers both ways, one that learnt this pair's motion does
#: not. With a single fold there is no spread to measure, so a step count must gain this much Dice
#: on the reversed pair. On three single pairs per structure (60 steps, six held-out pairs), the
#: reversed pair's Dice fell wherever the held-out pairs' fell badly (pancreas phrase 0.611 -> 0.099,
#: duodenum 0.361 -> 0.264 / 0.315) and also where they gained a little (duodenum 0.361 -> 0.385).
SINGLE_PAIR_MARGIN = 0.02


def _reversed(pair: PairTensors) -> PairTensors:
    return PairTensors(pair.moving, pair.fixed, pair.moving_seg, pair.fixed_seg, f"{pair.name} reversed".strip())


def _cross_validate(run: "_Run", pairs: list[PairTensors], n_folds: int) -> dict:
    """Mean kept-out Dice by step over ``n_folds`` folds (fold i keeps out pairs i, i + n_folds, ...),
    and, for a single pair, its fold's run: it trained on that very pair with the final adapter's seed
    and schedule, so its state at the chosen step is the final adapter (no second run)."""
    every = max(1, run.steps // VALIDATION_CHECKS)
    at = sorted({0, run.steps, *range(every, run.steps + 1, every)})
    per_fold, kept_run = [], None
    for fold in range(n_folds):
        kept = pairs[fold::n_folds]
        fitted = [p for i, p in enumerate(pairs) if i % n_folds != fold]
        if not fitted:      # one pair: train on it, keep out its reverse (see SINGLE_PAIR_MARGIN)
            fitted, kept = kept, [_reversed(p) for p in kept]
        dice: dict[int, float] = {}
        states: dict[int, dict] = {}

        def measure(step, adapter):
            if step in at:
                dice[step] = mean_dice(run.model, kept, run.prompt, run.organs)   # the adapter is applied
                if n_folds == 1:
                    states[step] = {k: v.detach().clone() for k, v in adapter.weights.state_dict().items()}
        fitted_run = run.fit(fitted, stop_at=run.steps, desc=f"fold {fold + 1}/{n_folds}", on_step=measure)
        per_fold.append(dice)
        if n_folds == 1:
            kept_run = _FoldRun(*fitted_run, states)
    mean = {step: float(np.mean([d[step] for d in per_fold])) for step in at}
    # A step count must beat the zero-shot prompt by more than the standard error of its gain over
    # the folds: with a handful of pairs one pair's big gain can lift the mean while most pairs lose.
    margin = {}
    for step in at[1:]:
        gains = np.array([d[step] - d[0] for d in per_fold])
        spread = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else SINGLE_PAIR_MARGIN
        margin[step] = float(gains.mean() - spread)
    trusted = [step for step in at[1:] if margin[step] > 0]
    chosen = max(trusted, key=lambda step: (mean[step], -step)) if trusted else 0
    return {"folds": n_folds, "pairs": len(pairs), "dice_by_step": {k: round(v, 4) for k, v in mean.items()},
            "gain_minus_se_by_step": {k: round(v, 4) for k, v in margin.items()},
            "dice_by_fold": [{k: round(v, 4) for k, v in d.items()} for d in per_fold], "chosen_step": chosen}, \
        kept_run


@dataclass
class _FoldRun:
    """A fold's trained adapter with its weights at each check, to be rewound to one of them."""
    adapter: Adapter
    losses: list
    dice_terms: list
    states: dict

    def at(self, step: int):
        """(adapter, losses, dice terms) as a run stopped after ``step`` steps would have left them."""
        self.adapter.weights.load_state_dict(self.states[step])
        return self.adapter, self.losses[:step], self.dice_terms[:step]


@contextlib.contextmanager
def _frozen(model):
    """The base model in eval mode with no gradients, restored afterwards (also on errors)."""
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
        model.train(was_training)


@dataclass
class _Run:
    """One adaptation recipe; ``fit`` trains a fresh adapter with it on some pairs."""
    model: object
    prompt: Prompt
    organs: list
    steps: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    dice_weight: float
    rank: int
    total: int
    callback: object = None
    progress: bool = True
    done: int = 0

    def fit(self, pairs: list[PairTensors], stop_at: int, desc: str, on_step=None):
        """A fresh adapter trained on ``pairs`` for ``stop_at`` of the schedule's ``steps`` steps (the
        learning rate follows the full schedule, so step s here is step s of a cross-validation fold).
        ``on_step(step, adapter)`` runs before the first step and after each, with the adapter applied."""
        from tqdm.auto import tqdm
        adapter = Adapter.create(self.model, self.prompt, rank=self.rank, seed=self.seed)
        loss_fn = RegistrationLoss(dice_weight=self.dice_weight)
        optimizer = torch.optim.AdamW(adapter.weights.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps, eta_min=0.1 * self.lr)
        rng = random.Random(self.seed)
        order: list[int] = []
        losses, dice_terms = [], []
        adapter.weights.train()
        with adapter.applied(self.model, check=False):
            if on_step is not None:
                on_step(0, adapter)
            bar = tqdm(range(stop_at), desc=desc, disable=not self.progress, leave=False)
            for step in bar:
                chosen = []
                while len(chosen) < min(self.batch_size, len(pairs)):
                    if not order:
                        order = rng.sample(range(len(pairs)), len(pairs))
                    chosen.append(pairs[order.pop()])
                batch = {"fixed": torch.cat([p.fixed for p in chosen]), "moving": torch.cat([p.moving for p in chosen]),
                         "fixed_seg": torch.cat([p.fixed_seg for p in chosen]),
                         "moving_seg": torch.cat([p.moving_seg for p in chosen]),
                         "prompt": [self.prompt] * len(chosen), "organs": [self.organs] * len(chosen)}
                terms = registration_step(self.model, batch, loss_fn)
                optimizer.zero_grad()
                terms["loss"].backward()
                optimizer.step()
                schedule.step()
                losses.append(float(terms["loss"].detach()))
                dice_terms.append(float(terms.get("dice", float("nan"))))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", dice=f"{1 - dice_terms[-1]:.3f}")
                if on_step is not None:
                    with torch.no_grad():
                        on_step(step + 1, adapter)
                self.done += 1
                if self.callback is not None:
                    self.callback(self.done, self.total, losses[-1])
        adapter.weights.eval()
        return adapter, losses, dice_terms


def _check_structure_present(pairs: list[PairTensors], organs: list[str]) -> None:
    for pair in pairs:
        for organ in organs:
            idx = ORGAN_TO_ID[organ]
            if not (pair.fixed_seg == idx).any() or not (pair.moving_seg == idx).any():
                raise InputError(f"{pair.name}: {organ} (label {idx}) is missing from a label map on the working "
                                 f"grid; every training pair must contain the prompted structure")


def _training_summary(train, steps, lr, seed, batch_size, losses, dice_terms, seconds, dice_test, n_test) -> dict:
    summary = {"k": len(train), "steps": steps, "lr": lr, "seed": seed, "batch_size": batch_size,
               "seconds": round(seconds, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if losses:
        window = max(1, min(10, len(losses) // 5))
        curve = [round(float(np.mean(losses[i:i + window])), 5) for i in range(0, len(losses), window)]
        summary.update(loss_first=round(float(np.mean(losses[:window])), 5),
                       loss_last=round(float(np.mean(losses[-window:])), 5), loss_curve=curve,
                       loss_curve_window=window,
                       train_dice_last=round(1.0 - float(np.nanmean(dice_terms[-window:])), 4))
    else:                   # cross-validation chose the fresh adapter: nothing was trained
        summary.update(loss_first=None, loss_last=None, loss_curve=[], loss_curve_window=1, train_dice_last=None)
    if dice_test:
        summary["held_out"] = {"pairs": n_test, "grid": "working", **{k: round(v, 4) for k, v in dice_test.items()}}
    return summary


# ----------------------------------------------------------------------------------- command line
def run_adapt(args) -> int:
    import json
    from .api import UniReg
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise InputError(f"--out must name a .safetensors file, got {out}")
    model = UniReg.from_pretrained(args.model, device=device)
    if not getattr(model, "name_or_path", None):
        model.name_or_path = str(args.model)
    adapter = adapt(model, args.pairs, args.prompt, steps=args.steps, rank=DEFAULT_RANK if args.rank is None else args.rank, lr=args.lr,
                    held_out=args.held_out, seed=args.seed, progress=True, validate=not args.no_validate)
    adapter.save(out)
    print(json.dumps({"adapter": str(out), **adapter.summary()}, indent=2))
    return 0


__all__ = ["adapt", "Adapter", "AdapterError", "PairTensors", "prepare_pair", "read_pair_list", "mean_dice",
           "run_adapt"]
