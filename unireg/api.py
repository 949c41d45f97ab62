"""UniReg: the user-facing model - the network plus ``register`` for scans.

``UniReg`` *is* the network (:class:`~unireg.modeling.model.UniRegModel`: ``from_pretrained``,
``save_pretrained``, tensors in, field out) with one convenience: ``register`` hands the scans to
a :class:`~unireg.pipeline.register.RegistrationPipeline` built around it.
"""
from __future__ import annotations

from .config import UniRegConfig
from .modeling.model import UniRegModel
from .pipeline.register import RegistrationPipeline
from .prompt import Prompt, parse_prompt
from .result import RegistrationResult


class UniReg(UniRegModel):
    def register(self, fixed, moving, prompt: "str | Prompt | None" = None, moving_labels=None, fixed_labels=None,
                 *, refine="auto", align="auto", similarity="auto", focus=False, adapter=None, fixed_affine=None,
                 moving_affine=None, progress=None, fixed_mask=None, moving_mask=None) -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` (paths, nibabel images, (array, affine) or arrays).

        ``refine``: "auto" (instance optimisation from the network's field, the default), "fast" (about
        0.8x the time, a little less accurate), "accurate" (about 10 % lower error in 1.2x the time),
        False (the network alone) or a number of steps.
        ``align``: "auto" | "none" | "rigid" | "affine".
        ``similarity`` of instance optimisation: "auto" (the default: MIND-SSC plus local intensity,
        "mind_ncc", with refine="auto"; MIND-SSC alone with "fast"), "mind_ncc", "mind" (contrast-
        invariant: for scans whose intensities do not correspond) or "lncc" (see
        ``unireg.pipeline.register.REFINE_SIMILARITIES``).
        ``focus=True``: instance optimisation weights the similarity towards the prompt's organs, placed
        by ``fixed_labels`` (else ``moving_labels``; without either, by the model's organ map of the fixed
        scan, for a model that has one: ``config.organ_map``): for organs that move unlike their surroundings
        (another subject's anatomy, sliding organs); it costs accuracy where the whole scan moves
        smoothly (``bench/organ_focus.py``).
        ``adapter``: a few-shot adapter (path or :class:`unireg.adapt.Adapter`).
        ``fixed_mask`` / ``moving_mask`` (on their scans' grids, non-zero inside): pre-alignment and instance
        optimisation compare the scans only at fixed voxels inside the fixed mask that land inside the moving
        one (a table, metal artefacts, a lesion that changed left out); the network still sees both scans.
        """
        return RegistrationPipeline(self).register(
            fixed, moving, prompt, moving_labels=moving_labels, fixed_labels=fixed_labels, refine=refine,
            align=align, adapter=adapter, fixed_affine=fixed_affine, moving_affine=moving_affine,
            similarity=similarity, focus=focus, progress=progress, fixed_mask=fixed_mask, moving_mask=moving_mask)


__all__ = ["UniReg", "UniRegConfig", "Prompt", "parse_prompt"]
