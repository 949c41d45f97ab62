"""Slice views of a registration: what a radiologist wants to look at, as RGB arrays.

Everything is shown on the fixed image's grid, reoriented to RAS so that axial, coronal and
sagittal slices look the same whatever the files' orientation. A :class:`Views` object is built
once per registration (cheap at app sizes) and then renders any view / plane / slice on demand,
so moving a slider only re-slices arrays that are already in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

from unireg.io import warp_volume
from unireg.metrics import jacobian_determinant

VIEWS = ("fixed", "moving", "warped", "difference", "checkerboard", "deformation grid", "Jacobian map")
PLANES = ("axial", "coronal", "sagittal")
WINDOW = (-400.0, 400.0)          # soft-tissue window, HU
DISPLAY_SIZE = 288                # longest side of a rendered slice, pixels
GRID_SPACING_VOXELS = 4


@dataclass
class Views:
    """Display volumes on the fixed grid in RAS (i, j, k) order, plus voxel sizes."""
    fixed: np.ndarray
    moving: np.ndarray
    warped: np.ndarray
    grid: dict                     # plane -> warped grid-line volume (lines in that plane only)
    jacobian: np.ndarray
    zooms: tuple
    fixed_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None
    warped_labels: np.ndarray | None = None

    @classmethod
    def from_result(cls, result, fixed_labels=None, moving_labels=None) -> "Views":
        """``result`` is a :class:`unireg.result.RegistrationResult`; label maps are nibabel images."""
        fixed_img = result.fixed
        affine = fixed_img.affine
        canonical = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(fixed_img.shape[:3], np.uint8), affine))
        ornt = nib.orientations.io_orientation(affine)

        def ras(volume: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(nib.orientations.apply_orientation(volume, ornt))

        field = result.displacement
        grids = {}
        for plane in PLANES:  # lines along the two original axes that lie in the plane
            normal = 2 - PLANES.index(plane)
            in_plane = [b for b in range(3) if int(ornt[b, 0]) != normal]
            lines = nib.Nifti1Image(_grid_volume(fixed_img.shape[:3], in_plane), affine)
            grids[plane] = ras(warp_volume(lines, field, affine))
        views = cls(fixed=ras(np.asanyarray(fixed_img.dataobj).astype(np.float32)),
                    moving=ras(result.moving_in_fixed_grid().astype(np.float32)),
                    warped=ras(np.asanyarray(result.warped.dataobj).astype(np.float32)),
                    grid=grids,
                    jacobian=ras(_jacobian_map(field, affine)),
                    zooms=tuple(float(z) for z in canonical.header.get_zooms()[:3]))
        if fixed_labels is not None:
            views.fixed_labels = ras(np.asanyarray(fixed_labels.dataobj).astype(np.int16))
        if moving_labels is not None:
            zero = np.zeros((*fixed_img.shape[:3], 3), np.float32)
            views.moving_labels = ras(warp_volume(moving_labels, zero, affine, labels=True).astype(np.int16))
        if result.warped_labels is not None:
            views.warped_labels = ras(np.asanyarray(result.warped_labels.dataobj).astype(np.int16))
        return views

    @property
    def shape(self) -> tuple:
        return self.fixed.shape

    def slice_count(self, plane: str) -> int:
        return self.shape[2 - PLANES.index(plane)]

    def centre_of(self, label_ids: list[int], plane: str) -> int | None:
        """The slice through the middle of the given structures in the fixed labels (None: the centre)."""
        if self.fixed_labels is None or not label_ids:
            return None
        where = np.argwhere(np.isin(self.fixed_labels, label_ids))
        return int(np.median(where[:, 2 - PLANES.index(plane)])) if len(where) else None

    def render(self, view: str, plane: str, index: int | None = None, overlay: bool = True,
               only: list[int] | None = None) -> np.ndarray:
        """One slice of one view as an RGB uint8 image, scaled for display.

        ``only``: overlay just these label ids, with the fixed labels' outline on top, to judge one structure.
        """
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; one of {VIEWS}")
        take = lambda vol: _slice(vol, plane, index)  # noqa: E731
        if view == "difference":
            rgb = _colormap(np.abs(take(self.fixed) - take(self.warped)), 0.0, 400.0, "magma")
        elif view == "checkerboard":
            a, b = take(self.fixed), take(self.warped)
            rows, cols = np.indices(a.shape)
            tile = max(2, max(a.shape) // 8)
            rgb = _gray(np.where(((rows // tile) + (cols // tile)) % 2 == 0, a, b))
        elif view == "deformation grid":
            rgb = _gray(take(self.grid[plane]), 0.0, 1.0)
        elif view == "Jacobian map":
            rgb = _colormap(np.log(np.clip(take(self.jacobian), 1e-3, None)), -0.5, 0.5, "RdBu_r")
            rgb[take(self.jacobian) <= 0] = (255, 255, 0)  # folding in yellow
        else:
            rgb = _gray(take(getattr(self, view)))
        labels = {"fixed": self.fixed_labels, "moving": self.moving_labels, "warped": self.warped_labels,
                  "difference": self.fixed_labels, "checkerboard": self.fixed_labels}.get(view)
        if overlay and labels is not None:
            shown = take(labels)
            if only:  # one structure: solid red, easy to judge against the fixed outline
                rgb = _overlay(rgb, np.isin(shown, only).astype(np.int16), alpha=0.55, colors=np.array(
                    [[0, 0, 0], [230, 40, 40]], np.float32))
            else:
                rgb = _overlay(rgb, shown)
            if only and self.fixed_labels is not None:
                rgb = _outline(rgb, np.isin(take(self.fixed_labels), only))
        return _upscale(rgb, plane, self.zooms)


# ------------------------------------------------------------------------------------- helpers
def _slice(volume: np.ndarray, plane: str, index: int | None) -> np.ndarray:
    axis = 2 - PLANES.index(plane)           # axial = k, coronal = j, sagittal = i
    n = volume.shape[axis]
    index = n // 2 if index is None else int(np.clip(index, 0, n - 1))
    # radiological display: superior / anterior up, patient right (axial, coronal) or anterior (sagittal) on the left
    return np.fliplr(np.rot90(np.take(volume, index, axis=axis)))


def _gray(sl: np.ndarray, lo: float = WINDOW[0], hi: float = WINDOW[1]) -> np.ndarray:
    g = (np.clip((sl - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _colormap(sl: np.ndarray, lo: float, hi: float, name: str) -> np.ndarray:
    from matplotlib import colormaps
    return (colormaps[name](np.clip((sl - lo) / (hi - lo), 0, 1))[..., :3] * 255).astype(np.uint8)


def _overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.4, colors: np.ndarray | None = None) -> np.ndarray:
    from matplotlib import colormaps
    if colors is None:
        colors = colormaps["tab20"](np.arange(20))[:, :3] * 255
    mask = labels > 0
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colors[labels[mask] % len(colors)]
    return out.astype(np.uint8)


def _outline(rgb: np.ndarray, mask: np.ndarray, color=(255, 255, 0)) -> np.ndarray:
    from scipy import ndimage
    edge = mask & ~ndimage.binary_erosion(mask)
    out = rgb.copy()
    out[edge] = color
    return out


def _upscale(rgb: np.ndarray, plane: str, zooms) -> np.ndarray:
    """Nearest-neighbour zoom so the slice shows true proportions at about DISPLAY_SIZE pixels."""
    axes = [a for a in range(3) if a != 2 - PLANES.index(plane)]   # (col axis, row axis) before rot90
    height_mm, width_mm = rgb.shape[0] * zooms[axes[1]], rgb.shape[1] * zooms[axes[0]]
    scale = DISPLAY_SIZE / max(height_mm, width_mm)
    rows = np.clip((np.arange(int(round(height_mm * scale))) / scale / zooms[axes[1]]).astype(int), 0, rgb.shape[0] - 1)
    cols = np.clip((np.arange(int(round(width_mm * scale))) / scale / zooms[axes[0]]).astype(int), 0, rgb.shape[1] - 1)
    return rgb[rows][:, cols]


def _grid_volume(shape, axes) -> np.ndarray:
    """Bright sheets every few voxels across each of ``axes``: cut by a plane holding those axes
    they are grid lines, and warped they draw the deformation."""
    idx = np.indices(shape)
    lines = np.zeros(shape, np.float32)
    for axis in axes:
        lines = np.maximum(lines, (idx[axis] % GRID_SPACING_VOXELS == 0).astype(np.float32))
    return lines


def _jacobian_map(field_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """det(I + grad u) per voxel of the fixed grid, from the mm field [X,Y,Z,3]."""
    to_voxels = np.linalg.inv(affine[:3, :3])
    voxels = field_mm @ to_voxels.T                                  # [X,Y,Z,(di,dj,dk)]
    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(voxels, -1, 0)))[None].float()
    return jacobian_determinant(tensor)[0].numpy()
