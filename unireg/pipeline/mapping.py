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
    field = field_on_grid(world, grid.affine, fixed.shape[:3], fixed.affine)
    if matrix is None or np.allclose(matrix, np.eye(4)):
        return field
    linear = matrix[:3, :3].astype(np.float32)
    # (A - I) x + t is affine in the voxel index: add it one slab at a time to bound memory.
    offset = ((matrix[:3, :3] - np.eye(3)) @ fixed.affine[:3, :3]).astype(np.float32)
    origin = ((matrix[:3, :3] - np.eye(3)) @ fixed.affine[:3, 3] + matrix[:3, 3]).astype(np.float32)
    i, j = np.meshgrid(np.arange(field.shape[0], dtype=np.float32), np.arange(field.shape[1], dtype=np.float32),
                       indexing="ij")
    plane = i[..., None] * offset[:, 0] + j[..., None] * offset[:, 1] + origin
    for k in range(field.shape[2]):
        field[:, :, k] = field[:, :, k] @ linear.T + plane + k * offset[:, 2]
    return field
