"""One forward pass and loss for a batch of pairs — shared by the trainer, adaptation and tests.

A batch is the loader's dict (:func:`unireg.data.prepare_pair`): ``fixed``/``moving``
[B,1,D,H,W] in [0,1], ``fixed_seg``/``moving_seg`` [B,1,D,H,W] label ids, ``prompt`` (one parsed
:class:`~unireg.prompt.Prompt` per pair; its λ, or the type's default when it has none, weights
the smoothness term) and ``organs`` (per pair, the organs whose Dice is trained; default: the
prompt's). A prompt that names organs focuses the similarity on them (see ``unireg.losses``);
the whole-body prompt keeps it uniform. ``motion`` [B,3,4], the rigid motion the loader added,
teaches a model's affine head where the loss weighs it (``affine_weight``). ``anatomical`` [B] (bool, default
all true) marks pairs whose label ids name real organs: only those teach a model's organ map. Fields beyond
these are ignored.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..losses import RegistrationLoss
from ..organs import ORGAN_TO_ID, organ_phrase
from ..prompt import Prompt


def organ_masks(labels: torch.Tensor, organs: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Label ids [B,1,...] + organ names per sample -> one-hot masks [B,K,...] and validity [B,K]."""
    k = max(1, max((len(o) for o in organs), default=0))
    masks = labels.new_zeros((labels.shape[0], k, *labels.shape[2:]), dtype=torch.float32)
    valid = torch.zeros(labels.shape[0], k, device=labels.device)
    for b, names in enumerate(organs):
        for j, name in enumerate(names):
            masks[b, j] = (labels[b, 0] == ORGAN_TO_ID[name]).float()
            valid[b, j] = 1.0
    return masks, valid


def registration_step(model, batch: dict, loss_fn: RegistrationLoss, forward=None) -> dict:
    """Forward the pairs, warp images and prompted organ masks, return the loss terms.

    ``forward`` is what runs the network (a DeepSpeed engine wrapping ``model``), default ``model``.
    """
    fixed, moving = batch["fixed"], batch["moving"]
    prompts = batch["prompt"]
    if not all(isinstance(p, Prompt) for p in prompts):
        raise TypeError("batch['prompt'] must hold Prompt objects (unireg.prompt.parse_prompt turns text into one)")
    out = (forward or model)(fixed, moving, prompts)
    warped = model.warp(moving, out.displacement)
    lam = torch.tensor([model.condition.smoothness_of(p) for p in prompts], device=fixed.device)
    organs = batch.get("organs") or [list(p.organs) for p in prompts]
    fixed_masks = moving_masks = warped_masks = valid = None
    if "fixed_seg" in batch and any(organs):
        fixed_masks, valid = organ_masks(batch["fixed_seg"], organs)
        moving_masks, _ = organ_masks(batch["moving_seg"], organs)
        warped_masks = model.warp(moving_masks.to(fixed.dtype), out.displacement)
    focused = torch.tensor([bool(p.organs) for p in prompts], device=fixed.device)  # whole body: global objective
    terms = loss_fn(fixed, warped, out.velocity, lam, fixed_masks, warped_masks, valid, focused=focused,
                    affine=out.affine, affine_target=batch.get("motion"))
    if loss_fn.margin_weight:          # logged on every step (the training log's columns stay fixed)
        gap = terms["loss"].new_zeros(())
        if fixed_masks is not None and bool(focused.any()):
            gap = steering_margin(model, batch, prompts, moving_masks, warped_masks, fixed_masks, valid, focused,
                                  loss_fn)
        terms["loss"] = terms["loss"] + loss_fn.margin_weight * gap
        terms["margin"] = gap.detach()
    if out.organ_maps is not None and "fixed_seg" in batch and loss_fn.map_weight:
        error = organ_map_error(model, batch, out, prompts, loss_fn)
        if error is not None:
            terms["loss"] = terms["loss"] + loss_fn.map_weight * error
            terms["organ_map"] = error.detach()
    terms["displacement"] = out.displacement
    return terms


def steering_margin(model, batch: dict, prompts: list[Prompt], moving_masks, warped_masks, fixed_masks, valid,
                    focused, loss_fn: RegistrationLoss) -> torch.Tensor:
    """The pairs whose prompt names organs, run again with the whole-body prompt of the same type and λ (no
    gradient, the module itself rather than the engine), and their named organs scored under both fields
    (``RegistrationLoss.steering_margin``)."""
    keep = torch.nonzero(focused).flatten()
    whole = [replace(prompts[b], organs=(), text="") for b in keep.tolist()]
    with torch.no_grad():
        ref = model(batch["fixed"][keep], batch["moving"][keep], whole)
        ref_masks = model.warp(moving_masks[keep].to(batch["fixed"].dtype), ref.displacement)
    return loss_fn.steering_margin(warped_masks[keep], ref_masks, fixed_masks[keep], valid[keep])


def organ_map_error(model, batch: dict, out, prompts: list[Prompt], loss_fn: RegistrationLoss):
    """A model's organ maps of both scans against the prompt's organs, plus the atlas term, over the pairs
    whose label ids name real organs (``batch["anatomical"]``); None when there are none."""
    anatomical = batch.get("anatomical", torch.ones(len(prompts), dtype=torch.bool)).bool().tolist()
    keep = [b for b, a in enumerate(anatomical) if a]
    if not keep:
        return None
    kept_prompts = [prompts[b] for b in keep]
    errors = []
    for logits, voxels, key in zip(out.organ_maps, out.organ_voxels, ("fixed_seg", "moving_seg")):
        labels = batch[key][keep]
        errors.append(loss_fn.organ_map_error(logits[keep], prompt_region(labels, kept_prompts, logits.shape[2:])))
        errors.append(atlas_error(model, loss_fn, voxels[keep], labels))
    return sum(errors) / len(errors)


#: Organs the atlas term asks a scan's organ map about per step (a random choice among those it shows).
ATLAS_ORGANS = 16
#: ...among those with at least this many voxels (a rib or a vertebra is a few cells of the map's grid).
ATLAS_MIN_VOXELS = 64
_NAME_OF_ID = {i: name for name, i in ORGAN_TO_ID.items()}


def atlas_error(model, loss_fn: RegistrationLoss, voxels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The organ map asked about up to ATLAS_ORGANS organs each scan shows at once, each against its own
    mask: one prompt per step would teach it one organ per step (on phantoms the map then found only the
    liver, Dice 0.33, after 800 steps; docs/experiments/organ_map). Organs kept out of training prompts
    (``loss_fn.map_hidden_organs``, the zero-shot ones) are kept out here too."""
    errors = []
    for b in range(labels.shape[0]):
        counts = torch.bincount(labels[b].flatten().long().clamp(min=0))
        ids = [i for i in torch.nonzero(counts >= ATLAS_MIN_VOXELS).flatten().tolist() if i in _NAME_OF_ID
               and _NAME_OF_ID[i] not in loss_fn.map_hidden_organs]
        if not ids:
            continue
        ids = [ids[j] for j in torch.randperm(len(ids))[:ATLAS_ORGANS].tolist()]
        phrases = model.embedder.embed([organ_phrase(_NAME_OF_ID[i]) for i in ids]).to(voxels.device)
        logits = model.organ_map.logits(voxels[b:b + 1], phrases[None])
        masks = torch.stack([(labels[b, 0] == i).float() for i in ids])[None]
        errors.append(loss_fn.organ_map_error(logits, F.adaptive_avg_pool3d(masks, tuple(logits.shape[2:]))))
    return torch.stack(errors).mean() if errors else voxels.sum() * 0


def prompt_region(labels: torch.Tensor, prompts: list[Prompt], size) -> torch.Tensor:
    """What an organ map should show: per pair, the share of each cell of a ``size`` grid that the prompt's
    organs fill (every organ for the whole-body prompt), [B,1,...]."""
    regions = []
    for b, prompt in enumerate(prompts):
        ids = [ORGAN_TO_ID[o] for o in prompt.organs]
        region = torch.isin(labels[b], torch.tensor(ids, device=labels.device)) if ids else labels[b] > 0
        regions.append(region.float())
    return F.adaptive_avg_pool3d(torch.stack(regions), tuple(size))


def affine_step(model, batch: dict, loss_fn: RegistrationLoss) -> dict:
    """The affine head alone against the known ``motion``, the rest of the network not run: a head taught
    alone (``loss.affine_only``) gets the same gradient as in :func:`registration_step` at a fraction of
    its cost, since its encoder is its own."""
    affine = model.affine(batch["fixed"], batch["moving"])
    error = loss_fn.affine_error(affine, batch["motion"], batch["fixed"].shape[2:])
    return {"affine_error": error.detach(), "loss": loss_fn.affine_weight * error}
