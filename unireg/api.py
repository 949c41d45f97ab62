"""UniReg: the user-facing model. ``from_pretrained`` / ``save_pretrained`` / ``register``.

``register`` is the whole data flow for one pair: load and check both scans, resample them
onto the fixed image's working grid, run the network, optionally refine the field by a few
steps of test-time optimisation, and map everything back onto the fixed image's own grid.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import UniRegConfig
from .hub import CONFIG_NAME, PROMPT_CACHE_NAME, WEIGHTS_NAME, resolve_model_dir
from .io import (InputError, WorkingGrid, fields_of_view_overlap, ijk_to_tensor_order, load_image, load_labels,
                 tensor_field_to_world, warp_volume)
from .losses import gradient_l2
from .metrics import jacobian_stats, organ_dice
from .modeling.condition import prompt_phrases
from .modeling.model import UniRegModel
from .modeling.text_encoder import WHOLE_BODY, TextEmbedder
from .modeling.transform import resize_field
from .organs import ORGANS, ORGAN_TO_ID, organ_phrase
from .preprocessing import normalize_ct
from .prompt import Prompt, parse_prompt
from .result import RegistrationResult, displacement_on_fixed_grid, label_names


class UniReg(UniRegModel):
    @classmethod
    def from_config(cls, config: "UniRegConfig | str" = "tiny") -> "UniReg":
        if isinstance(config, str):
            config = UniRegConfig.from_preset(config)
        return cls(config)

    @classmethod
    def from_pretrained(cls, name_or_path: "str | Path", device: "str | torch.device" = "cpu",
                        revision: str | None = None) -> "UniReg":
        folder = resolve_model_dir(name_or_path, revision)
        config = UniRegConfig.load(folder / CONFIG_NAME)
        cache_file = folder / PROMPT_CACHE_NAME
        cache = load_file(str(cache_file)) if cache_file.is_file() else {}
        model = cls(config, TextEmbedder(config.text_model, cache))
        state = load_file(str(folder / WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model.to(device).eval()

    def save_pretrained(self, folder: "str | Path", cache_vocabulary: bool = True) -> Path:
        """Write config, weights and the prompt cache (by default covering every organ name)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if cache_vocabulary:
            self.embedder.embed([organ_phrase(o) for o in ORGANS] + [WHOLE_BODY])
        self.config.save(folder / CONFIG_NAME)
        state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in self.state_dict().items()}  # fp32 on disk whatever the training precision
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in self.embedder.cache.items()}, str(folder / PROMPT_CACHE_NAME))
        return folder

    def load_sam_checkpoint(self, path: "str | Path"):
        """Initialise the backbone from an official SAM file (``sam_vit_b_01ec64.pth`` etc.)."""
        from .modeling.sam_checkpoint import load_sam_image_encoder
        return load_sam_image_encoder(self.backbone.image_encoder, path)

    # ----------------------------------------------------------------------------- registration
    def register(self, fixed, moving, prompt: "str | Prompt | None" = None, moving_labels=None,
                 fixed_labels=None, optimize_steps: int = 0, fixed_affine=None, moving_affine=None) -> RegistrationResult:
        """Register ``moving`` onto ``fixed``; inputs are paths, nibabel images, (array, affine) or arrays."""
        start = time.perf_counter()
        prompt = parse_prompt(prompt)
        fixed_img = load_image(fixed, "fixed image", fixed_affine)
        moving_img = load_image(moving, "moving image", moving_affine)
        moving_lab = load_labels(moving_labels, moving_img, "moving labels") if moving_labels is not None else None
        fixed_lab = load_labels(fixed_labels, fixed_img, "fixed labels") if fixed_labels is not None else None
        if not fields_of_view_overlap(fixed_img, moving_img):
            raise InputError("fixed and moving images do not overlap in physical space; their affines cannot be "
                             "related (check origins and orientation in the headers)")

        cfg = self.config
        grid = WorkingGrid.from_image(fixed_img, cfg.working_spacing_mm, cfg.max_working_size, cfg.size_divisor)
        device = next(self.parameters()).device
        f = self._to_tensor(grid.resample(fixed_img), device)
        m = self._to_tensor(grid.resample(moving_img), device)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self(f, m, [prompt])
        displacement = out.displacement
        if optimize_steps > 0:
            displacement = self.refine(f, m, out.velocity, prompt, optimize_steps)
        self.train(was_training)

        disp = displacement[0].float().cpu().numpy()
        world = tensor_field_to_world(disp, grid.affine)
        field_mm = displacement_on_fixed_grid(world, grid.affine, fixed_img)
        result = RegistrationResult(fixed=fixed_img, moving=moving_img, displacement=field_mm, prompt=prompt,
                                    jacobian=jacobian_stats(displacement.float().cpu()), seconds=0.0)
        if moving_lab is not None:
            warped = warp_volume(moving_lab, field_mm, fixed_img.affine, labels=True)
            result.warped_labels = type(fixed_img)(warped.astype(np.int16), fixed_img.affine)
            if fixed_lab is not None:
                result.metrics = self._label_metrics(fixed_lab, moving_lab, warped, fixed_img, prompt)
        result.seconds = time.perf_counter() - start
        return result

    def refine(self, fixed: torch.Tensor, moving: torch.Tensor, velocity: torch.Tensor, prompt: Prompt,
               steps: int, lr: float = 0.05) -> torch.Tensor:
        """Test-time optimisation: a few Adam steps on the predicted velocity (LNCC + smoothness)."""
        from monai.losses import LocalNormalizedCrossCorrelationLoss
        lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9, kernel_type="rectangular")
        lam = self.condition.smoothness_of(prompt)
        v = velocity.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([v], lr=lr)
        for _ in range(steps):
            disp = resize_field(self.integrate(v), fixed.shape[2:])
            loss = lncc(self.warp(moving, disp), fixed) + lam * gradient_l2(v).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return resize_field(self.integrate(v), fixed.shape[2:])

    def _to_tensor(self, array_ijk: np.ndarray, device) -> torch.Tensor:
        hu = torch.from_numpy(ijk_to_tensor_order(array_ijk))[None, None]
        dtype = next(self.parameters()).dtype
        return normalize_ct(hu, self.config.hu_min, self.config.hu_max).to(device=device, dtype=dtype)

    @staticmethod
    def _label_metrics(fixed_lab, moving_lab, warped: np.ndarray, fixed_img, prompt: Prompt) -> dict:
        fixed_arr = np.asanyarray(fixed_lab.dataobj)
        before_arr = warp_volume(moving_lab, np.zeros((*fixed_img.shape[:3], 3), np.float32), fixed_img.affine, labels=True)
        names = label_names(fixed_arr)
        if prompt.organs:
            names = {o: ORGAN_TO_ID[o] for o in prompt.organs if o in names}
        before, after = organ_dice(fixed_arr, before_arr, names), organ_dice(fixed_arr, warped, names)
        mean = lambda d: float(np.mean(list(d.values()))) if d else float("nan")  # noqa: E731
        return {"dice_before": before, "dice_after": after, "mean_dice_before": mean(before),
                "mean_dice_after": mean(after)}


__all__ = ["UniReg", "UniRegConfig", "Prompt", "parse_prompt", "prompt_phrases"]
