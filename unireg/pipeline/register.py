"""RegistrationPipeline: register two scans with a UniReg network, stage by stage.

    load + check → working grid → pre-alignment → network → instance optimisation
      → total mapping on the fixed grid → metrics → RegistrationResult

The default call runs it all (``align="auto"``, ``refine="auto"``); ``refine="fast"`` trades some
accuracy for time (about 0.8x), ``refine="accurate"`` some time for accuracy (about 1.2x);
``refine=False`` gives the network's field alone.
Each stage's time (and loss, where it optimises) goes to
``result.metrics["stages"]`` and so to ``metrics.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..io import warp_volume
from ..memory import release_freed_memory
from ..metrics import dice_before_after, jacobian_stats
from ..modeling.model import UniRegModel
from ..organs import ORGAN_TO_ID
from ..prompt import Prompt, parse_prompt
from ..result import RegistrationResult
from .grids import (label_tensor, lattice_grid, lattice_offset, moving_coverage, refinement_grid, scan_tensor,
                    tensor_affine, working_grid)
from .inputs import ScanPair, load_pair
from .mapping import network_affine_matrix, total_displacement
from .network import predict_field
from .refine import INTENSITY_WEIGHT, STEP_PRESETS, refine_velocity, step_preset

ALIGN_MODES = ("auto", "none", "rigid", "affine")
#: Most label channels the Dice term of instance optimisation carries (the largest organs win).
MAX_DICE_ORGANS = 12
#: Share of the fixed scan (on the working grid) the moving scan must cover for a model's affine head to act.
AFFINE_HEAD_MIN_COVERAGE = 0.95
#: Instance optimisation levels (downsampling factors of the refinement grid, coarse to fine; the
#: step budget drops the finest it cannot afford) and the velocity grid's spacing. A velocity on a
#: ~16 mm grid keeps scaling and squaring cheap while the similarity is still measured at each
#: level's resolution; on a real chest CT (2 mm) it scored 0.82 mm median TRE against 0.91 mm with
#: an 8 mm velocity grid, in less time. ``rigid=`` needs a velocity fine enough to hold a
#: structure's boundary, so it uses half each level's resolution instead.
REFINE_LEVELS = (8, 4, 2, 1)
#: Levels coarser than this are left out: a 32 mm level of a 4 mm phantom (12^3 voxels) let the
#: similarity slide a whole breathing field by 28 mm (organ Dice 0.82 -> 0.32 from a steering-tuned
#: network's start, 0.858 -> 0.876 from the stage-2 shipped network's when left out); coarse motion is the
#: pre-alignment's and the network's job.
COARSEST_LEVEL_MM = 16.0
#: Pre-alignment sees both scans at this spacing at the finest (or the model's working spacing, when
#: coarser): a linear transform needs no finer grid, and "auto"'s rule (gain and bone checks, tuned at
#: 6 mm) must not change with the model. Seen at a 3 mm model's grid, a real abdomen pair was
#: rigidly pre-aligned where at 6 mm it was left alone, and ended 0.54 instead of 0.44 mm median TRE.
ALIGN_SPACING_MM = 6.0
VELOCITY_SPACING_MM = 16.0
#: Between subjects (prompt type "inter") organs differ in shape, not only in place: instance optimisation
#: then works on a finer velocity grid and weighs the standardised intensity, which marks organ boundaries
#: that MIND-SSC's self-similarity blurs, three times more (``refine.INTENSITY_WEIGHT``). Phantom
#: inter-subject pairs (96^3 at 4 mm, six seeds, mean organ Dice; 2-core CPU): 16 mm / weight 1 0.793 in
#: 1.8 s; 8 mm 0.829 (three seeds); weight 3 at 16 mm 0.815 (smooth=0, three seeds); both 0.851 in 3.5 s
#: (Greedy 0.848 on the first three, 4.2 s). Breathing and repositioning (intra) keep 16 mm and weight 1:
#: there 8 mm cost the real chest 0.04 and the abdomen 0.03 mm median TRE in 1.3-1.8x the seconds
#: (docs/experiments/refine_speed/), and weight 3 took the abdomen from 0.43 to 0.71 mm. ``refine="fast"``
#: keeps 16 mm between subjects too: with its MIND-SSC alone 8 mm gave 0.781 against 0.767 in 1.6x the seconds.
INTER_VELOCITY_SPACING_MM = 8.0
INTER_INTENSITY_WEIGHT = 3.0
#: ``focus=True``: instance optimisation weights the similarity towards the prompt's organs, found in a
#: label map, grown by this margin (refine's ``focus``), so that their boundaries and a band of what
#: slides along them are in the region. Three seeds each (bench/organ_focus.py, docs/experiments/
#: organ_focus/), named organ vs whole-body prompt, both with the fixed labels: phantom inter-subject
#: Dice +0.026 over 10 organs (pancreas +0.067, duodenum +0.111); phantom breathing organ TRE 2.02 ->
#: 1.86 mm, Dice +0.003; the real abdomen CT under a smooth known motion organ TRE 0.43 -> 0.51 mm,
#: Dice -0.002. Where every organ moves with one smooth field, the whole scan is the better witness,
#: hence off by default.
FOCUS_MARGIN_MM = 10.0
#: Similarity of instance optimisation: "auto" (the refine preset's: "mind_ncc" for "auto" and a number
#: of steps, "mind" for "fast"), "mind_ncc" (MIND-SSC plus the locally standardised intensity, see
#: ``refine.INTENSITY_WEIGHT``), "mind" (MIND-SSC alone: contrast-invariant, for scans whose intensities
#: do not correspond) or "lncc". On five real CT pairs with known fields (bench/vs_optimisers.py: chest
#: at 2 mm, thick slices, cropped, 10 deg + 15 mm, abdomen at 3 mm) MIND on every voxel of the levels
#: the CPU budget allowed gave 0.47-0.67 mm median TRE against LNCC's 0.85-1.23 mm; with its large
#: levels on 2^17 sampled voxels, which lets the full-resolution level in, 0.33 mm (chest) and 0.45 mm
#: (abdomen), at 2-2.5x LNCC's seconds; the intensity channel then raised the abdomen's Dice past Greedy's,
#: and a new sample of 2^15 voxels per step kept that accuracy in 0.65-0.75x the seconds (refine.STEP_PRESETS).
REFINE_SIMILARITIES = ("auto", "mind_ncc", "mind", "lncc")


class RegistrationPipeline:
    """Wraps a network (as ``SamPredictor(sam)`` wraps ``Sam``); holds no per-pair state."""

    def __init__(self, model: UniRegModel, refine_spacing_mm: float | None = None):
        self.model = model
        self.refine_spacing_mm = refine_spacing_mm

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def register(self, fixed, moving, prompt: "str | Prompt | None" = None, *, moving_labels=None,
                 fixed_labels=None, refine: "str | int | bool" = "auto", align: str = "auto", adapter=None,
                 fixed_affine=None, moving_affine=None, similarity: str = "auto", focus: bool = False,
                 progress: "Callable[[int, int, float], None] | None" = None, fixed_mask=None,
                 moving_mask=None) -> RegistrationResult:
        with torch.inference_mode(False):  # the optimisation stages need autograd even under a caller's inference_mode
            return self._register(fixed, moving, prompt, moving_labels, fixed_labels, refine, align, adapter,
                                  fixed_affine, moving_affine, similarity, focus, progress, fixed_mask, moving_mask)

    def _register(self, fixed, moving, prompt, moving_labels, fixed_labels, refine, align, adapter, fixed_affine,
                  moving_affine, similarity, focus, progress, fixed_mask, moving_mask) -> RegistrationResult:
        start = time.perf_counter()
        refine_steps = check_refine(refine)
        align = check_align(align)
        similarity = check_similarity(similarity)
        prompt = parse_prompt(prompt)
        pair = load_pair(fixed, moving, fixed_labels, moving_labels, fixed_affine, moving_affine, fixed_mask,
                         moving_mask)
        if prompt.rigid and pair.fixed_labels is None and pair.moving_labels is None:
            raise UserError(f"rigid={', '.join(prompt.rigid)} needs a label map that contains it: "
                            f"pass fixed_labels (or moving_labels)")
        if prompt.rigid and refine_steps == 0:
            raise UserError("rigid= acts during instance optimisation; it cannot be used with refine=False")
        if focus:
            _check_focus(prompt, pair, refine_steps, self.model.organ_map is not None)
        if (pair.fixed_mask is not None or pair.moving_mask is not None) and refine_steps == 0 and align == "none":
            raise UserError("masks shape the similarity of pre-alignment and instance optimisation; with align='none' "
                            "and refine=False neither runs (the network sees the scans whole)")
        stages: list[dict] = []
        cfg, device = self.model.config, self.device
        dtype = next(self.model.parameters()).dtype

        with _stage(stages, "load"):
            grid = working_grid(pair.fixed, cfg)
            fixed_t = scan_tensor(pair.fixed, grid, cfg, device)
        matrix, align_info = self._align(pair, grid, fixed_t, align, prompt, stages)

        with _stage(stages, "network") as info:
            moving_t = scan_tensor(pair.moving, grid, cfg, device, matrix=matrix)
            with_affine = self._network_affine_applies(pair, grid, align_info, matrix, info)
            with _adapter_applied(adapter, self.model):
                out = predict_field(self.model, fixed_t.to(dtype), moving_t.to(dtype), prompt, with_affine=with_affine)
            info["grid"] = list(grid.shape)
            info["spacing_mm"] = round(grid.spacing, 3)
            displacement, field_grid = out.displacement.float(), grid
            if out.affine is not None:   # the network's own affine joins the pre-alignment's: one matrix
                matrix = network_affine_matrix(out.affine[0], grid, matrix)
                displacement = out.deformation.float()
                info["affine"] = np.round(matrix, 6).tolist()

        if refine_steps != 0:
            organ_map = out.organ_maps[0].float() if focus and out.organ_maps is not None else None
            displacement, field_grid = self._refine(pair, grid, out.velocity.float(), matrix, prompt,
                                                    refine_steps, similarity, focus, progress, stages, organ_map)

        with _stage(stages, "mapping"):
            field_mm = total_displacement(displacement, field_grid, pair.fixed, matrix)
            jacobian = jacobian_stats(displacement.cpu())
        result = RegistrationResult(fixed=pair.fixed, moving=pair.moving, displacement=field_mm, prompt=prompt,
                                    jacobian=jacobian, seconds=0.0, affine_matrix=matrix, fixed_labels=pair.fixed_labels)
        if pair.moving_labels is not None:
            with _stage(stages, "labels"):
                result.warped_labels, dice = _warp_labels(pair, field_mm, prompt,
                                                          device if device.type == "cuda" else None)
                result.metrics.update(dice)
        refine_info = next((s for s in stages if s["stage"] == "refine"), {})
        if "dice_term_label_ids" in refine_info and "dice_after" in result.metrics:
            result.metrics["dice_note"] = ("instance optimisation used these label maps (Dice term), so dice_after "
                                           "is not an independent score; pass only moving_labels to measure it")
        result.metrics["alignment"] = align_info
        result.metrics["stages"] = stages
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------------------- stages
    def _network_affine_applies(self, pair, grid, align_info: dict, matrix, info: dict) -> bool:
        """Whether a model's affine head acts: only where the pre-alignment moved nothing (its intensity
        optimisation is the more precise of the two), and only where the moving scan covers the fixed scan
        on the working grid. The head's keypoints are centres of mass over the grid: a moving scan cut short is air
        there, which shifts them and gives an affine no anatomy asked for (through it, a moving scan with 60 % of
        the fixed scan's slices seemed to cover 75 %)."""
        if self.model.affine is None or align_info["mode"] != "none":
            return False
        covered = moving_coverage(pair.fixed, pair.moving, grid, self.device, matrix)[2]
        if covered < AFFINE_HEAD_MIN_COVERAGE:
            info["affine_head"] = f"not used: the moving scan covers {100 * covered:.0f} % of the fixed scan"
            return False
        return True

    def _align(self, pair: ScanPair, grid, fixed_t, mode: str, prompt: Prompt, stages) -> tuple[np.ndarray, dict]:
        if mode == "none":
            return np.eye(4), {"mode": "none"}
        from .align import align_pair
        with _stage(stages, "align") as info:
            # Always on the CPU: on grids of a few ten thousand voxels a GPU spends its time launching kernels
            # and solving 4x4 matrices (the real abdomen: 0.99 s on an H100, 0.32 s on two CPU cores).
            cfg, cpu = self.model.config, torch.device("cpu")
            if cfg.working_spacing_mm < ALIGN_SPACING_MM:
                cfg = dataclasses.replace(cfg, working_spacing_mm=ALIGN_SPACING_MM)
                grid = working_grid(pair.fixed, cfg)
                fixed_t = scan_tensor(pair.fixed, grid, cfg, cpu)
            else:
                fixed_t = fixed_t.cpu()
            moving_grid = working_grid(pair.moving, cfg)
            moving_own = scan_tensor(pair.moving, moving_grid, cfg, cpu)
            masks = {name: None if mask is None else label_tensor(mask, on, cpu).float()
                     for name, mask, on in (("fixed_mask", pair.fixed_mask, grid),
                                            ("moving_mask", pair.moving_mask, moving_grid))}
            res = align_pair(fixed_t, tensor_affine(grid), moving_own, tensor_affine(moving_grid), mode=mode,
                             same_subject=prompt.type == "intra", **masks)
            info.update(mode=res.mode, bone_check=res.bone_check, loss_before=res.loss_before,
                        loss_after=res.loss_after)
        return res.matrix, {"mode": res.mode, "matrix": np.round(res.matrix, 6).tolist()}

    def _refine(self, pair: ScanPair, grid, velocity, matrix, prompt: Prompt, steps, similarity: str, focus: bool,
                progress, stages, organ_map: torch.Tensor | None = None):
        with _stage(stages, "refine") as info:
            cfg, device = self.model.config, self.device
            fine = refinement_grid(grid, pair.fixed, device, self.refine_spacing_mm)
            fixed_f = scan_tensor(pair.fixed, fine, cfg, device)
            moving_f, fixed_to_moving = _moving_for_refinement(pair.fixed, pair.moving, fine, cfg, device, matrix)
            # where refinement reads the moving scan: the fixed grid, or its own one (read once, through the map)
            info["moving_grid"] = "fixed" if fixed_to_moving is None else list(moving_f.shape[2:])
            coverage, fixed_coverage, covered = moving_coverage(pair.fixed, pair.moving, fine, device, matrix)
            if bool((coverage >= fixed_coverage).all()):
                coverage = None        # the moving scan covers the fixed one: nothing to mask
            else:
                info["moving_coverage_pct"] = round(100 * covered, 1)
            region = _similarity_region(pair, fine, device, matrix, coverage, fixed_coverage, info)
            fixed_masks = moving_masks = rigid_mask = focus_mask = None
            if pair.fixed_labels is not None and pair.moving_labels is not None:
                fixed_lab = label_tensor(pair.fixed_labels, fine, device)
                moving_lab = label_tensor(pair.moving_labels, fine, device, matrix)
                ids = _dice_ids(fixed_lab, moving_lab, prompt)
                if ids:  # the reported Dice then scores labels the optimiser saw: metrics.json says so
                    info["dice_term_label_ids"] = ids
                    fixed_masks = torch.cat([(fixed_lab == i).float() for i in ids], 1)
                    moving_masks = torch.cat([(moving_lab == i).float() for i in ids], 1)
            if prompt.rigid:
                rigid_mask = _rigid_mask(pair, fine, device, matrix, prompt)
            if focus and (pair.fixed_labels is not None or pair.moving_labels is not None):
                focus_mask, info["focus"] = _focus_mask(pair, fine, device, matrix, prompt)
            elif focus:
                focus_mask, info["focus"] = _predicted_focus_mask(organ_map, fine, prompt)
            if similarity == "auto":
                similarity = step_preset(steps).similarity
            between_subjects = prompt.type == "inter" and step_preset(steps) is not STEP_PRESETS["fast"]
            res = refine_velocity(fixed_f, moving_f, velocity, smoothness=self.model.condition.smoothness_of(prompt),
                                  spacing_mm=fine.spacing, steps=steps,
                                  levels=refine_levels(fine.spacing), similarity=similarity,
                                  velocity_factor=_velocity_factor(prompt, fine.spacing, between_subjects),
                                  fixed_masks=fixed_masks, focus=focus_mask,
                                  moving_masks=moving_masks, rigid_mask=rigid_mask, moving_coverage=coverage,
                                  region=region,
                                  fixed_to_moving=fixed_to_moving, progress=progress,
                                  intensity_weight=INTER_INTENSITY_WEIGHT if between_subjects else INTENSITY_WEIGHT)
            release_freed_memory()     # before the caller's full-size outputs (see unireg.memory)
            info.update(grid=list(fine.shape), spacing_mm=round(fine.spacing, 3), similarity=similarity,
                        levels=res.history, **res.check)
        return res.displacement, fine


def _similarity_region(pair: ScanPair, fine, device, matrix, coverage, fixed_coverage,
                       info: dict) -> torch.Tensor | None:
    """The user's masks on the refinement grid (None: no mask given): the fixed mask, and the moving mask
    seen through the pre-alignment (the deformation moves the moving scan by millimetres beyond it, so
    its mask is read where the alignment puts it, as the moving scan's coverage is)."""
    if pair.fixed_mask is None and pair.moving_mask is None:
        return None
    region = torch.ones((1, 1, *fine.shape[::-1]), device=device)
    if pair.fixed_mask is not None:
        region = region * (label_tensor(pair.fixed_mask, fine, device) > 0)
    if pair.moving_mask is not None:
        region = region * (label_tensor(pair.moving_mask, fine, device, matrix) > 0)
    compared = region if coverage is None else region * coverage
    if not bool((compared > 0).any()):
        raise UserError("the masks leave no voxel where both scans can be compared (check that they mark the "
                        "anatomy to register, on the right scans)")
    # the share of the fixed scan's own voxels compared (the refinement grid may reach past the scan)
    info["similarity_region_pct"] = round(100 * float((compared * fixed_coverage).sum() / fixed_coverage.sum()), 1)
    return region.float()


#: The moving scan is refined on its own grid unless that grid would hold more than this many times the
#: fixed refinement grid's voxels (a whole-body moving scan for an abdominal fixed one): then it is
#: resampled onto the fixed grid as before, which bounds memory by the fixed scan.
MAX_MOVING_GRID_RATIO = 2.0


def _moving_for_refinement(fixed, moving, fine, cfg, device, matrix):
    """The moving scan for instance optimisation, and the voxel map from ``fine`` into its grid.

    Resampling the moving scan through the pre-alignment onto the fixed grid, then warping it, would
    interpolate it twice: a blur the fixed scan does not have. So it is put on a grid of its own
    (its field of view and axes, the refinement spacing; no interpolation at all when that is its
    own voxel grid), and refinement reads it once, through the composed mapping. Beyond its edge a
    read repeats the edge (border padding); the moving-coverage mask keeps such voxels out of the
    similarity. Air there instead (a margin of 2-8 air voxels) cost the abdomen's p95 2.43 -> 3.08 mm.
    Real CT, 3 deg + 4 mm, the rigid motion found (three seeds, bench/vs_optimisers.py), median / p95
    TRE mm: chest 0.30 / 0.84 -> 0.26 / 0.60, abdomen 0.51 / 2.68 -> 0.42 / 2.43
    (docs/experiments/align_skeleton/).
    Returns ``(tensor, None)`` when the moving scan is resampled onto ``fine`` instead (no alignment
    and the same grid, or a moving grid over ``MAX_MOVING_GRID_RATIO`` times larger).
    """
    # Both scans sampled alike: the moving grid sits between the moving voxels as the refinement grid
    # sits between the fixed ones (a scan interpolated half a voxel off is blurred; only one of them
    # blurred is a mismatch the optimiser would chase).
    own = lattice_grid(moving, fine.spacing, lattice_offset(fine, fixed))
    to_moving = np.linalg.inv(tensor_affine(own)) @ matrix @ tensor_affine(fine)
    same = own.shape == fine.shape and np.allclose(to_moving, np.eye(4), atol=1e-6)
    if same or math.prod(own.shape) > MAX_MOVING_GRID_RATIO * math.prod(fine.shape):
        return scan_tensor(moving, fine, cfg, device, matrix=matrix), None
    return scan_tensor(moving, own, cfg, device), to_moving


def refine_levels(spacing_mm: float) -> tuple[int, ...]:
    """REFINE_LEVELS no coarser than COARSEST_LEVEL_MM on a refinement grid of ``spacing_mm`` (the finest always)."""
    return tuple(f for f in REFINE_LEVELS if f == 1 or f * spacing_mm <= COARSEST_LEVEL_MM + 1e-6)


def _velocity_factor(prompt: Prompt, spacing_mm: float, between_subjects: bool = False) -> int:
    """How much coarser than the refinement grid the optimised velocity is (see VELOCITY_SPACING_MM and
    INTER_VELOCITY_SPACING_MM)."""
    spacing = INTER_VELOCITY_SPACING_MM if between_subjects else VELOCITY_SPACING_MM
    return 2 if prompt.rigid else max(2, round(spacing / spacing_mm))


def check_refine(refine) -> "str | int":
    """A preset name (``"auto"``/``True`` -> "auto", ``"fast"``, ``"accurate"``), ``False``/``None``/0 -> 0,
    or a positive number of steps."""
    if refine is True:
        return "auto"
    if refine is False or refine is None:
        return 0
    if isinstance(refine, str):
        name = refine.strip().lower()
        if name in STEP_PRESETS:
            return name
        if name in ("false", "none", "off", "no", "0"):
            return 0
        if name.isdigit():
            refine = int(name)
    if isinstance(refine, (int, np.integer)) and not isinstance(refine, bool) and refine >= 0:
        return int(refine)
    raise UserError(f"refine must be {', '.join(repr(p) for p in STEP_PRESETS)}, False or a number of steps >= 0, "
                    f"got {refine!r}")


def check_similarity(similarity) -> str:
    name = str(similarity).strip().lower()
    if name not in REFINE_SIMILARITIES:
        raise UserError(f"similarity must be one of {', '.join(REFINE_SIMILARITIES)}, got {similarity!r}")
    return name


def check_align(align) -> str:
    mode = str(align).strip().lower() if align is not None else "none"
    if mode not in ALIGN_MODES:
        raise UserError(f"align must be one of {', '.join(ALIGN_MODES)}, got {align!r}")
    return mode


@contextlib.contextmanager
def _stage(stages: list, name: str):
    info = {"stage": name}
    start = time.perf_counter()
    yield info
    info["seconds"] = round(time.perf_counter() - start, 3)
    stages.append(info)


@contextlib.contextmanager
def _adapter_applied(adapter, model):
    if adapter is None:
        yield
        return
    from ..adapter import Adapter
    if not isinstance(adapter, Adapter):
        adapter = Adapter.load(adapter)
    adapter.check_compatible(model)
    with adapter.applied(model):
        yield


def _dice_ids(fixed_lab: torch.Tensor, moving_lab: torch.Tensor, prompt: Prompt) -> list[int]:
    """Label ids for the Dice term: the prompted organs present in both maps, else the largest shared ones."""
    counts_f = torch.bincount(fixed_lab.flatten().clamp(min=0))
    counts_m = torch.bincount(moving_lab.flatten().clamp(min=0))
    n = min(len(counts_f), len(counts_m))
    shared = torch.minimum(counts_f[:n], counts_m[:n])
    shared[0] = 0
    if prompt.organs:
        ids = [ORGAN_TO_ID[o] for o in prompt.organs if ORGAN_TO_ID[o] < n and shared[ORGAN_TO_ID[o]] > 0]
        if ids:
            return ids
    order = torch.argsort(shared, descending=True)
    return [int(i) for i in order[:MAX_DICE_ORGANS] if shared[i] > 0]


def _labels_on(pair: ScanPair, grid, device, matrix) -> tuple[torch.Tensor, str]:
    """The fixed label map on ``grid``, else the moving one where the pre-alignment puts it, and which."""
    if pair.fixed_labels is not None:
        return label_tensor(pair.fixed_labels, grid, device), "fixed labels"
    return label_tensor(pair.moving_labels, grid, device, matrix), "moving labels"


def _rigid_mask(pair: ScanPair, grid, device, matrix, prompt: Prompt) -> torch.Tensor:
    ids = [ORGAN_TO_ID[o] for o in prompt.rigid]
    labels, source = _labels_on(pair, grid, device, matrix)  # from the moving map: refinement moves it only rigidly
    mask = torch.zeros_like(labels, dtype=torch.float32)
    for organ, idx in zip(prompt.rigid, ids):
        part = labels == idx
        if not part.any():
            raise UserError(f"rigid={organ}: the {source} contain no {organ} (id {idx})")
        mask[part] = 1.0
    return mask


def _check_focus(prompt: Prompt, pair: ScanPair, refine_steps, model_maps_organs: bool) -> None:
    if refine_steps == 0:
        raise UserError("focus acts during instance optimisation; it cannot be used with refine=False")
    if not prompt.organs:
        raise UserError("focus=True needs organs in the prompt, e.g. \"inter | pancreas\"")
    if pair.fixed_labels is None and pair.moving_labels is None and not model_maps_organs:
        raise UserError(f"focus=True needs a label map that shows {', '.join(prompt.organs)}: "
                        f"pass fixed_labels (or moving_labels); this model has no organ map to find them itself")


def _predicted_focus_mask(organ_map: torch.Tensor, grid, prompt: Prompt) -> tuple[torch.Tensor | None, dict]:
    """Without label maps, the region comes from the model's organ map of the fixed scan (the network's grid
    has the refinement grid's extent): where it says the prompt's organs are (p > 0.5), grown by
    FOCUS_MARGIN_MM. A map that finds none of them gives no focus, and metrics.json says so."""
    probability = F.interpolate(torch.sigmoid(organ_map), size=tuple(grid.shape), mode="trilinear",
                                align_corners=False)
    mask = (probability > 0.5).float()
    info = {"organs": list(prompt.organs), "source": "organ map", "margin_mm": FOCUS_MARGIN_MM}
    if not bool(mask.any()):
        info["not_found"] = "the organ map finds none of them in the fixed scan: refined without focus"
        return None, info
    radius = max(1, round(FOCUS_MARGIN_MM / grid.spacing))
    mask = F.max_pool3d(mask, 2 * radius + 1, stride=1, padding=radius)
    info["voxels_pct"] = round(100 * float(mask.mean()), 2)
    return mask, info


def _focus_mask(pair: ScanPair, grid, device, matrix, prompt: Prompt) -> tuple[torch.Tensor, dict]:
    """The prompt's organs grown by FOCUS_MARGIN_MM on the refinement grid (from the fixed labels, else the
    moving ones where the pre-alignment puts them), and what metrics.json says of it (organs the map
    lacks are named there; with none of them in it, an error)."""
    labels, source = _labels_on(pair, grid, device, matrix)
    present = [o for o in prompt.organs if bool((labels == ORGAN_TO_ID[o]).any())]
    info = {"organs": present, "source": source, "margin_mm": FOCUS_MARGIN_MM}
    missing = [o for o in prompt.organs if o not in present]
    if missing:
        info["not_in_labels"] = missing
    if not present:
        raise UserError(f"focus: the {source} contain none of {', '.join(prompt.organs)} "
                        f"(ids {', '.join(str(ORGAN_TO_ID[o]) for o in prompt.organs)})")
    mask = torch.zeros_like(labels, dtype=torch.float32)
    for organ in present:
        mask[labels == ORGAN_TO_ID[organ]] = 1.0
    radius = max(1, round(FOCUS_MARGIN_MM / grid.spacing))
    mask = F.max_pool3d(mask, 2 * radius + 1, stride=1, padding=radius)
    info["voxels_pct"] = round(100 * float(mask.mean()), 2)
    return mask, info


def _warp_labels(pair: ScanPair, field_mm: np.ndarray, prompt: Prompt, device=None):
    """The moving label map through the total mapping (gathered on ``device`` when one is named), and Dice
    before / after where the fixed labels are given."""
    import nibabel as nib
    fixed_aff = pair.fixed.affine
    warped = warp_volume(pair.moving_labels, field_mm, fixed_aff, labels=True, device=device)
    image = nib.Nifti1Image(warped, fixed_aff, dtype=warped.dtype)
    if pair.fixed_labels is None:
        return image, {}
    before = warp_volume(pair.moving_labels, None, fixed_aff, labels=True, shape=pair.fixed.shape[:3])
    fixed_arr = np.asanyarray(pair.fixed_labels.dataobj)
    organs = tuple(o for o in prompt.organs)
    return image, dice_before_after(fixed_arr, before, warped, organs)
