"""CT preprocessing: one spec, owned by the model config, from a scan in HU to the network's input.

Training, evaluation and ``register`` must hand the network identical tensors for the same scan,
so everything between Hounsfield units and the input lives here, in :class:`PreprocessingSpec`
(built by ``UniRegConfig.preprocessing``): the HU window, the working spacing and the grid rule
(isotropic voxels over the scan's field of view, sizes a multiple of the coarsest level's stride,
at most ``max_size``). Every path is ``spec.grid`` -> :func:`on_grid` -> ``spec.network_input``;
training only crops a patch of the grid and jitters HU in between. A shard array is a scan too
(:func:`shard_image`): one at another spacing than the model's goes through the same rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

#: HU window mapped to [0, 1] by default (air .. dense bone); a model's own window is in its config.
HU_MIN = -1000.0
HU_MAX = 1000.0
#: Value used outside the field of view (air).
HU_OUTSIDE = -1024.0
#: Range of stored CT (phantoms, prepared scans, shards): int16 HU as scanners write them (12-bit).
HU_STORED_MIN, HU_STORED_MAX = -1024, 3071


def to_stored_hu(hu) -> np.ndarray:
    """Hounsfield units (any float array) -> int16 HU in the stored range, rounded to the nearest unit."""
    return np.clip(np.rint(np.asarray(hu)), HU_STORED_MIN, HU_STORED_MAX).astype(np.int16)


def normalize_ct(hu, hu_min: float = HU_MIN, hu_max: float = HU_MAX):
    """Clamp Hounsfield units to a window and scale to [0, 1] (numpy or torch).

    Model code calls :meth:`PreprocessingSpec.network_input`, which passes the model's window."""
    scale = 1.0 / (hu_max - hu_min)
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - hu_min) * scale).clamp_(0.0, 1.0)
    return np.clip((np.asarray(hu, dtype=np.float32) - hu_min) * scale, 0.0, 1.0)


@dataclass(frozen=True)
class PreprocessingSpec:
    """How a model sees a CT; ``UniRegConfig.preprocessing`` builds it from the model's config."""
    hu_min: float
    hu_max: float
    spacing_mm: float      # working spacing: isotropic voxels of this size ...
    max_size: int          # ... coarsened so that the field of view fits this many voxels along any axis
    divisor: int           # grid sizes are multiples of this (the coarsest level stride)

    def grid(self, img: nib.Nifti1Image, capped: bool = True):
        """The working grid over ``img``'s field of view (a :class:`~unireg.io.WorkingGrid`).

        ``capped=False`` keeps the working spacing however large the field of view: the training
        loader crops a patch of the grid instead, which bounds memory as the cap does."""
        from .io import WorkingGrid  # io imports this module (HU_OUTSIDE)
        return WorkingGrid.from_image(img, self.spacing_mm, self.max_size if capped else 1 << 30, self.divisor)

    def network_input(self, hu) -> torch.Tensor:
        """HU on the working grid, tensor order [..., D, H, W] -> float32 tensor in [0, 1] (the model's window)."""
        hu = hu if isinstance(hu, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
        return normalize_ct(hu, self.hu_min, self.hu_max)


def on_grid(img: nib.Nifti1Image, grid, labels: bool = False, device=None) -> "np.ndarray | torch.Tensor":
    """``img`` on a working ``grid`` in tensor order [D, H, W]: trilinear HU (air outside) or nearest labels.

    A scan already on the grid is returned as it is stored (no interpolation, no copy): shards
    written at the working spacing cost nothing here. With a CUDA ``device`` the resampling runs
    there (same rules) and the result is a tensor on it."""
    if is_on_grid(img, grid):
        return np.asanyarray(img.dataobj).transpose(2, 1, 0)
    out = grid.resample(img, labels=labels, device=device)
    if isinstance(out, torch.Tensor):
        return out.permute(2, 1, 0).contiguous()
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def is_on_grid(img: nib.Nifti1Image, grid) -> bool:
    """Whether ``img``'s voxels are ``grid``'s voxels (same shape, same affine to a micrometre)."""
    return tuple(img.shape[:3]) == tuple(grid.shape) and np.allclose(img.affine, grid.affine, rtol=0, atol=1e-3)


def shard_image(array: np.ndarray, spacing) -> nib.Nifti1Image:
    """A shard array (tensor order [D, H, W], ``spacing`` (sd, sh, sw) mm) as a scan for the grid rule.

    Shards carry no position, so the image sits at the origin with RAS axes; the grid rule only
    uses its field of view, and :func:`on_grid` returns it untouched when it
    already is a working grid (working spacing, sizes a multiple of the divisor)."""
    sd, sh, sw = (float(s) for s in spacing)
    array = np.asanyarray(array)
    return nib.Nifti1Image(array.transpose(2, 1, 0), np.diag([sw, sh, sd, 1.0]), dtype=array.dtype)
