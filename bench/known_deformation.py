"""Scan pairs whose true correspondence is known: one CT warped by a rigid motion + a smooth field.

A registration benchmark on real anatomy needs the truth. We take one real scan as the fixed
image and make the moving scan from it, ``moving(y) = fixed(S(y))`` with

    S(y) = R (y + u(y) - c) + c + t            (world RAS mm)

a rigid motion (rotation R about the field-of-view centre c, translation t) after a smooth
random displacement u (breathing- or posture-like: tens of mm wide, a few mm high). The
mapping every method must recover is ``fixed -> moving``, i.e. ``S^-1``; it is solved at the
evaluation points by fixed-point iteration (``y = R^T (x - c - t) + c - u(y)``, a contraction
while |grad u| < 1), so TRE is measured against the exact mapping, not a resampled field.

Moving scans can be made as clinics make them: another grid spacing (thick slices, averaged
over the slice profile), a partial field of view (cropped), a larger rigid offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from unireg.preprocessing import to_stored_hu

HU_AIR = -1024.0


@dataclass
class KnownDeformation:
    """``S``: moving-world -> fixed-world points. ``inverse`` gives the fixed -> moving truth."""
    rotation: np.ndarray        # 3x3
    translation: np.ndarray     # (3,) mm
    centre: np.ndarray          # (3,) mm, rotation centre (fixed field-of-view centre)
    control: list               # u's three components on the control grid (mm)
    grid_affine: np.ndarray     # control grid index -> world

    @classmethod
    def random(cls, fixed: nib.Nifti1Image, seed: int, rotation_deg: float = 3.0, translation_mm: float = 4.0,
               field_mm: float = 7.0, field_sigma_mm: float = 40.0, control_mm: float = 10.0) -> "KnownDeformation":
        """Rotation of ``rotation_deg`` about a random axis, a translation of ``translation_mm`` in a
        random direction, and a smooth field whose largest vector is ``field_mm`` long."""
        rng = np.random.default_rng(seed)
        axis = rng.normal(size=3)
        rotation = Rotation.from_rotvec(np.deg2rad(rotation_deg) * axis / np.linalg.norm(axis)).as_matrix()
        direction = rng.normal(size=3)
        translation = translation_mm * direction / np.linalg.norm(direction)
        lo, hi = _world_box(fixed)
        margin = 3 * field_sigma_mm
        shape = np.ceil((hi - lo + 2 * margin) / control_mm).astype(int) + 1
        grid_affine = np.eye(4)
        grid_affine[:3, :3] *= control_mm
        grid_affine[:3, 3] = lo - margin
        field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), field_sigma_mm / control_mm, mode="reflect")
                          for _ in range(3)])
        if field_mm > 0:
            field *= field_mm / np.linalg.norm(field, axis=0).max()
        else:
            field[:] = 0
        return cls(rotation, translation, (lo + hi) / 2, list(field.astype(np.float32)), grid_affine)

    def field(self, points: np.ndarray) -> np.ndarray:
        """u at world points [N, 3] (trilinear on the control grid; the grid is ~4 cells smooth)."""
        inv = np.linalg.inv(self.grid_affine)
        ijk = (points @ inv[:3, :3].T + inv[:3, 3]).T
        return np.stack([ndimage.map_coordinates(c, ijk, order=1, mode="nearest") for c in self.control], axis=1)

    def __call__(self, moving_points: np.ndarray) -> np.ndarray:
        """S(y): where a moving-scan point's anatomy lies in the fixed scan."""
        y = np.asarray(moving_points, dtype=np.float64)
        return (y + self.field(y) - self.centre) @ self.rotation.T + self.centre + self.translation

    def inverse(self, fixed_points: np.ndarray, tolerance_mm: float = 1e-5, iterations: int = 50) -> np.ndarray:
        """S^-1(x): the true fixed -> moving mapping at fixed-world points [N, 3]."""
        x = np.asarray(fixed_points, dtype=np.float64)
        base = (x - self.centre - self.translation) @ self.rotation + self.centre   # R^T (x - c - t) + c
        y = base.copy()
        for _ in range(iterations):
            y, previous = base - self.field(y), y
            if np.abs(y - previous).max() < tolerance_mm:
                break
        return y


# ------------------------------------------------------------------------------------ grids and pairs
def _world_box(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in img.shape[:3]], indexing="ij")).reshape(3, -1)
    world = img.affine[:3, :3] @ corners + img.affine[:3, 3:4]
    return world.min(1), world.max(1)


def grid_points(shape, affine: np.ndarray) -> np.ndarray:
    """World coordinates [N, 3] of every voxel centre (C order of (i, j, k))."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T


def sample(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int, cval: float) -> np.ndarray:
    """Values of ``volume`` at world points [N, 3]; outside the grid -> ``cval``."""
    inv = np.linalg.inv(affine)
    ijk = (points @ inv[:3, :3].T + inv[:3, 3]).T
    return ndimage.map_coordinates(volume, ijk, order=order, mode="constant", cval=cval, prefilter=False)


def moving_grid(fixed: nib.Nifti1Image, spacing_mm=None, crop=None) -> tuple[tuple, np.ndarray]:
    """The moving scan's grid: the fixed field of view, optionally at another spacing (per axis)
    and cropped to fractions ``crop = ((lo, hi), (lo, hi), (lo, hi))`` of each axis."""
    zooms = np.array(fixed.header.get_zooms()[:3], dtype=float)
    spacing = zooms if spacing_mm is None else np.array(spacing_mm, dtype=float)
    lo, hi = _world_box(fixed)
    if crop is not None:
        span = hi - lo
        lo, hi = lo + span * np.array([c[0] for c in crop]), lo + span * np.array([c[1] for c in crop])
    shape = tuple(int(n) for n in np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = lo
    return shape, affine


def make_moving(fixed: nib.Nifti1Image, truth: KnownDeformation, spacing_mm=None, crop=None,
                noise_hu: float = 10.0, seed: int = 0, labels: np.ndarray | None = None):
    """``moving(y) = fixed(S(y))`` on the moving grid (+ noise); thick slices average the slice profile.

    Returns the moving image and, when ``labels`` (fixed grid) are given, the moving label map.
    """
    shape, affine = moving_grid(fixed, spacing_mm, crop)
    data = np.asanyarray(fixed.dataobj).astype(np.float32)
    points = grid_points(shape, affine)
    thickness = affine[2, 2]
    fixed_z = float(fixed.header.get_zooms()[2])
    # slice profile: average over the slab a thick slice integrates (box of the slice thickness)
    n = int(np.ceil(thickness)) if thickness > 1.5 * fixed_z else 1        # midpoint rule at ~1 mm steps
    offsets = ((np.arange(n) + 0.5) / n - 0.5) * thickness
    hu = np.zeros(len(points), np.float32)
    for dz in offsets:
        hu += sample(data, fixed.affine, truth(points + np.array([0.0, 0.0, dz])), 1, HU_AIR)
    hu /= len(offsets)
    hu += np.random.default_rng(seed).normal(0.0, noise_hu, hu.shape).astype(np.float32)
    moving = nib.Nifti1Image(to_stored_hu(hu).reshape(shape), affine)
    moving_labels = None
    if labels is not None:
        moving_labels = sample(labels.astype(np.float32), fixed.affine, truth(points), 0, 0).astype(labels.dtype).reshape(shape)
    return moving, moving_labels


def body_mask(hu: np.ndarray, threshold: float = -400.0) -> np.ndarray:
    """The patient: the largest connected region above ``threshold`` HU, holes filled (no table, no air)."""
    mask = ndimage.binary_opening(hu > threshold, iterations=2)
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(mask)


def evaluation_points(fixed: nib.Nifti1Image, count: int, seed: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Up to ``count`` random voxel centres of the body (world RAS mm) where TRE is measured."""
    mask = body_mask(np.asanyarray(fixed.dataobj)) if mask is None else mask
    idx = np.argwhere(mask)
    rng = np.random.default_rng(seed)
    if len(idx) > count:
        idx = idx[rng.choice(len(idx), count, replace=False)]
    return idx @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]


def inside_grid(points: np.ndarray, shape, affine: np.ndarray, margin_vox: float = 1.0) -> np.ndarray:
    """Which world points lie inside a grid (by ``margin_vox`` voxels): where the truth is observable."""
    inv = np.linalg.inv(affine)
    ijk = points @ inv[:3, :3].T + inv[:3, 3]
    return np.all((ijk >= margin_vox) & (ijk <= np.array(shape) - 1 - margin_vox), axis=1)
