"""Grids the pipeline works on, all over the fixed scan's field of view.

The network sees both scans on the model's *working grid*, made by the model's preprocessing spec
(``config.preprocessing``: the same rule and HU window as the training loader and evaluation);
instance optimisation runs on a *refinement grid* with the same extent and centre but finer
voxels, so a field on one resizes exactly onto the other (``resize_field`` assumes equal extent).
"""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import torch

from ..config import UniRegConfig
from ..io import WorkingGrid, grid_points
from ..preprocessing import on_grid

#: Largest refinement grid (voxels) by device: instance optimisation holds ~30 float32 copies of it.
MAX_REFINE_VOXELS = {"cpu": 160 ** 3, "cuda": 320 ** 3}


def working_grid(fixed: nib.Nifti1Image, config: UniRegConfig) -> WorkingGrid:
    return config.preprocessing.grid(fixed)


def refinement_grid(grid: WorkingGrid, fixed: nib.Nifti1Image, device: torch.device,
                    spacing_mm: float | None = None) -> WorkingGrid:
    """Same extent as ``grid``, voxels down to the fixed scan's own spacing where memory allows."""
    extent = np.array(grid.shape) * grid.spacing
    if spacing_mm is None:
        native = float(min(nib.affines.voxel_sizes(fixed.affine)))
        budget = MAX_REFINE_VOXELS["cuda" if device.type == "cuda" else "cpu"]
        spacing_mm = max(native, float(np.prod(extent) / budget) ** (1 / 3))
    spacing_mm = min(spacing_mm, grid.spacing)
    shape = tuple(max(1, int(math.ceil(e / spacing_mm - 1e-6))) for e in extent)
    scale = np.diag([*(np.array(grid.shape) / np.array(shape)), 1.0])
    # Voxel centres (align_corners=False): fine index a <-> coarse index (a + 0.5) * s - 0.5.
    shift = np.eye(4)
    shift[:3, 3] = 0.5 * (np.array(grid.shape) / np.array(shape)) - 0.5
    return WorkingGrid(shape, grid.affine @ shift @ scale)


def scan_tensor(img: nib.Nifti1Image, grid: WorkingGrid, config: UniRegConfig, device, dtype=torch.float32,
                matrix: np.ndarray | None = None) -> torch.Tensor:
    """A CT on ``grid`` (optionally sampled through a world ``matrix``: fixed -> moving) -> [1,1,D,H,W] in [0,1]."""
    spec = config.preprocessing
    hu = on_grid(img, _sampling_grid(grid, matrix), device=device)
    return spec.network_input(hu)[None, None].to(device=device, dtype=dtype)


def label_tensor(img: nib.Nifti1Image, grid: WorkingGrid, device, matrix: np.ndarray | None = None) -> torch.Tensor:
    """A label map on ``grid`` (nearest) -> int64 [1,1,D,H,W]."""
    arr = on_grid(img, _sampling_grid(grid, matrix), labels=True, device=device)
    if isinstance(arr, torch.Tensor):
        return arr.to(torch.int64)[None, None]
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))[None, None].to(device)


def coverage_tensor(img: nib.Nifti1Image, grid: WorkingGrid, device,
                    matrix: np.ndarray | None = None) -> torch.Tensor:
    """Where a scan (seen through a world ``matrix``: fixed -> moving) has voxels on ``grid``: float
    [1,1,D,H,W] of 0/1.

    A moving scan with a shorter field of view is air beyond its last slice; measured there, the
    similarity would pull anatomy towards that artificial edge.
    """
    to_img = np.linalg.inv(img.affine) @ (np.eye(4) if matrix is None else matrix) @ grid.affine
    size = torch.tensor(img.shape[:3], dtype=torch.float32, device=device)
    inside = torch.empty(grid.shape, dtype=torch.float32, device=device)
    for a in range(0, grid.shape[0], 16):                 # slabs: a full-size grid's points never at once
        b = min(grid.shape[0], a + 16)
        ijk = grid_points(grid.shape, a, b, to_img, device)   # [n_i, J, K, 3] voxel coordinates in the scan
        inside[a:b] = ((ijk >= -0.5) & (ijk <= size - 0.5)).all(-1)
    return inside.permute(2, 1, 0).contiguous()[None, None]


def moving_coverage(fixed: nib.Nifti1Image, moving: nib.Nifti1Image, grid: WorkingGrid, device,
                    matrix: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Where the moving scan (through ``matrix``) has voxels on ``grid``, where the fixed scan has (the grid
    may reach past it), and the share of the fixed scan's voxels the moving scan covers, in [0, 1]."""
    fixed_coverage = coverage_tensor(fixed, grid, device)
    coverage = coverage_tensor(moving, grid, device, matrix)
    # a dot product: no third full-size volume (a clinical grid holds ~10^8 voxels)
    share = float(torch.dot(coverage.flatten(), fixed_coverage.flatten()) / fixed_coverage.sum().clamp(min=1.0))
    return coverage, fixed_coverage, share


def lattice_grid(img: nib.Nifti1Image, spacing_mm: float, offset=(0.0, 0.0, 0.0)) -> WorkingGrid:
    """A grid of ``spacing_mm`` voxels over ``img``'s field of view, on its (closest canonical) axes,
    its first voxel at the scan's first voxel moved by ``offset`` (in the grid's voxels): where the
    spacing is the scan's own and the offset zero, its voxels are the scan's."""
    canonical = nib.as_closest_canonical(img)
    zooms = np.array(canonical.header.get_zooms()[:3], dtype=float)
    shape = tuple(max(2, int(math.ceil((n - 1) * z / spacing_mm - 1e-6)) + 1)
                  for n, z in zip(canonical.shape[:3], zooms))
    affine = np.eye(4)
    affine[:3, :3] = canonical.affine[:3, :3] / zooms * spacing_mm
    affine[:3, 3] = canonical.affine[:3, 3] + affine[:3, :3] @ np.asarray(offset, dtype=float)
    return WorkingGrid(shape, affine)


def lattice_offset(grid: WorkingGrid, img: nib.Nifti1Image) -> np.ndarray:
    """Where ``grid``'s first voxel sits between the voxels of ``img``'s lattice at ``grid``'s spacing,
    in [-0.5, 0.5] grid voxels per axis (``WorkingGrid.from_image`` centres a rounded-up grid, so a
    refinement grid at the scan's own spacing can sit half a voxel off its voxels)."""
    at = np.linalg.inv(lattice_grid(img, grid.spacing).affine) @ grid.affine[:, 3]
    return at[:3] - np.round(at[:3])


def tensor_affine(grid: WorkingGrid) -> np.ndarray:
    """Affine of a grid's tensor index order (d, h, w) = (k, j, i) -> world."""
    return grid.affine @ np.eye(4)[[2, 1, 0, 3]]


def _sampling_grid(grid: WorkingGrid, matrix: np.ndarray | None) -> WorkingGrid:
    """``grid``'s voxels at the world points a fixed -> moving ``matrix`` sends them to."""
    if matrix is None or np.allclose(matrix, np.eye(4)):
        return grid
    return WorkingGrid(grid.shape, matrix @ grid.affine)
