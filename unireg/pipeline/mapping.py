"""Last stage: the total mapping on the fixed scan's own grid, in mm (and the network's affine, when it has one,
joined to the pre-alignment's matrix).

The pre-alignment ``A`` (4x4, fixed world -> moving world) and the deformable displacement
``u`` (voxels of a working grid, tensor order) compose as ``x -> A (x + u(x))``; users get
``d(x) = A (x + u(x)) - x`` in mm (RAS) on the fixed grid, so ``warped(x) = moving(x + d(x))``.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from ..io import WorkingGrid, field_on_grid, tensor_field_to_world
from ..modeling.affine_head import index_matrix
from .grids import tensor_affine


def total_displacement(displacement: torch.Tensor, grid: WorkingGrid, fixed: nib.Nifti1Image,
                       matrix: np.ndarray | None = None) -> np.ndarray:
    """Voxel field [1,3,D,H,W] on ``grid`` (+ affine ``matrix``) -> float32 mm field [X,Y,Z,3] on ``fixed``."""
    world = tensor_field_to_world(displacement[0].float().cpu().numpy(), grid.affine)
    if matrix is not None and np.allclose(matrix, np.eye(4)):
        matrix = None
    return field_on_grid(world, grid.affine, fixed.shape[:3], fixed.affine, matrix=matrix,
                         device=displacement.device)


def network_affine_matrix(affine: torch.Tensor, grid: WorkingGrid, matrix: np.ndarray) -> np.ndarray:
    """The network's affine (``[3,4]`` on ``grid``'s normalised coordinates, the moving scan already seen
    through the pre-alignment ``matrix``) composed into that matrix: fixed world -> moving world."""
    to_world = tensor_affine(grid)
    on_indices = index_matrix(affine, grid.shape).numpy()
    return matrix @ to_world @ on_indices @ np.linalg.inv(to_world)
