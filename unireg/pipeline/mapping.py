"""Last stage: the total mapping on the fixed scan's own grid, in mm.

The pre-alignment ``A`` (4x4, fixed world -> moving world) and the deformable displacement
``u`` (voxels of a working grid, tensor order) compose as ``x -> A (x + u(x))``; users get
``d(x) = A (x + u(x)) - x`` in mm (RAS) on the fixed grid, so ``warped(x) = moving(x + d(x))``.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from ..io import WorkingGrid, field_on_grid, tensor_field_to_world


def total_displacement(displacement: torch.Tensor, grid: WorkingGrid, fixed: nib.Nifti1Image,
                       matrix: np.ndarray | None = None) -> np.ndarray:
    """Voxel field [1,3,D,H,W] on ``grid`` (+ affine ``matrix``) -> float32 mm field [X,Y,Z,3] on ``fixed``."""
    world = tensor_field_to_world(displacement[0].float().cpu().numpy(), grid.affine)
    if matrix is not None and np.allclose(matrix, np.eye(4)):
        matrix = None
    return field_on_grid(world, grid.affine, fixed.shape[:3], fixed.affine, matrix=matrix,
                         device=displacement.device)
