"""A registration's mapping, with or without its scans: what can be carried through it either way.

``register`` hands back a :class:`~unireg.result.RegistrationResult` (the scans, the mapping, the metrics);
a folder it saved is read back as a :class:`~unireg.saved.SavedRegistration` (the mapping and the two grids,
not the scans). Users apply both the same way, long after the registration ran: a PET, a dose map or another
label map of the moving scan onto the fixed grid, landmarks from one scan to the other, planning contours
onto the day's scan. :class:`Mapping` is those operations once, for both.

Conventions: ``displacement`` [X,Y,Z,3] float32 mm (RAS) on the fixed grid, the total mapping
``T(x) = x + displacement(x)`` from a fixed point to its match in the moving scan (pre-alignment and
deformation together); ``affine_matrix`` the pre-alignment alone (fixed world -> moving world), the inverse's
starting guess.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .errors import UserError
from .io import InputError, label_ids, load_image, load_labels, warp_volume

#: An integer image with no negative value and at most this many distinct values is read as a label map.
MAX_LABELS = 1000


@dataclass(frozen=True)
class Grid:
    """A voxel grid in world space: its shape and its voxel -> world (mm, RAS) affine."""
    shape: tuple
    affine: np.ndarray

    @classmethod
    def of(cls, image: nib.spatialimages.SpatialImage) -> "Grid":
        return cls(tuple(int(n) for n in image.shape[:3]), np.asarray(image.affine, dtype=np.float64))

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "affine": np.round(self.affine, 8).tolist()}

    @classmethod
    def from_dict(cls, value: dict, name: str) -> "Grid":
        try:
            shape = tuple(int(n) for n in value["shape"])
            affine = np.asarray(value["affine"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"the {name} grid recorded in metrics.json is not a shape and a 4x4 affine") from None
        if len(shape) != 3 or min(shape) < 1 or affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise InputError(f"the {name} grid recorded in metrics.json is not a shape and a 4x4 affine")
        return cls(shape, affine)

    def holds(self, image: "nib.spatialimages.SpatialImage | Grid") -> bool:
        """Whether an image (or another grid) lies on this grid: same shape, affines within 1e-3."""
        return tuple(image.shape[:3]) == self.shape and np.allclose(image.affine, self.affine, atol=1e-3)


class Mapping:
    """Warping and point mapping through a registration, both ways.

    Subclasses provide ``displacement``, ``affine_matrix``, ``jacobian``, ``metrics``, ``_inverse`` (the
    inverse once solved, or read from a saved folder) and the properties ``fixed_grid`` and ``moving_grid``
    (``None`` when a saved folder does not say where the moving scan lay).
    """

    @property
    def affine(self) -> np.ndarray:
        """The fixed grid's voxel -> world affine (the grid ``displacement`` lives on)."""
        return self.fixed_grid.affine

    def warp(self, image, labels: bool | None = None) -> nib.Nifti1Image:
        """Warp another image or label map of the moving scan's grid into the fixed grid (label maps nearest
        neighbour, keeping their ids; ``labels=None`` tells them by ``looks_like_labels``)."""
        img, labels = _load_on(image, labels, self.moving_grid, "the image to warp must lie on the moving image's grid")
        return nib.Nifti1Image(warp_volume(img, self.displacement, self.affine, labels=labels), self.affine)

    def warp_points(self, points_mm) -> np.ndarray:
        """Fixed-space points (world mm, RAS, [N, 3] or one point [3]) -> moving-space points."""
        points = points_array(points_mm)
        from scipy import ndimage
        inv = np.linalg.inv(self.affine)
        ijk = inv[:3, :3] @ points.T + inv[:3, 3:4]
        disp = np.stack([ndimage.map_coordinates(self.displacement[..., c], ijk, order=1, mode="nearest")
                         for c in range(3)], axis=1)
        moved = points + disp
        return moved[0] if np.ndim(points_mm) == 1 else moved

    # ------------------------------------------------------------------------------ inverse
    def moving_points_to_fixed(self, points_mm) -> np.ndarray:
        """Moving-space points (world mm, RAS, [N, 3] or one point [3]) -> the fixed-space points that map onto
        them (``warp_points`` undone: a lesion or landmark found in the moving scan, located in the fixed one)."""
        from .inverse import invert_points
        self._check_invertible()
        points = points_array(points_mm)
        fixed_points, stats = invert_points(self.displacement, self.affine, self.affine_matrix, points)
        _check_inverse(stats)
        return fixed_points[0] if np.ndim(points_mm) == 1 else fixed_points

    @property
    def inverse_displacement(self) -> np.ndarray:
        """The inverse mapping on the moving grid, [X, Y, Z, 3] float32 mm (RAS): moving voxel y corresponds to
        fixed point ``y + inverse_displacement(y)``. Solved on first use (``unireg.inverse.inverse_field``;
        ``metrics["inverse"]`` says how it converged); on a grid finer than 2 mm each access interpolates
        the whole array anew from the solved lattice, so keep it rather than reading it twice."""
        return np.asarray(self._inverse_field())

    def _inverse_field(self):
        """The inverse as found (an array, or a ``LatticeField`` read block by block), solved once."""
        if self._inverse is None:
            from .inverse import inverse_field
            self._check_invertible()
            grid = self._require_moving_grid("the inverse field")
            self._inverse, stats = inverse_field(self.displacement, self.affine, self.affine_matrix,
                                                 grid.shape, grid.affine)
            _check_inverse(stats)
            self.metrics["inverse"] = stats.as_dict()
        return self._inverse

    @property
    def invertible(self) -> bool:
        """False when the field folds (det J <= 0 somewhere): it maps several fixed points onto one moving point."""
        return not float((self.jacobian or {}).get("nonpositive_jacobian_pct") or 0.0) > 0

    def _check_invertible(self) -> None:
        if not self.invertible:
            folded = float(self.jacobian["nonpositive_jacobian_pct"])
            raise UserError(f"the registration's field folds at {folded:.3g} % of its voxels (det J <= 0), so it has no "
                            f"inverse there; register with a larger smooth= (or instance optimisation) for one")

    def _require_moving_grid(self, what: str) -> Grid:
        if self.moving_grid is None:
            raise UserError(f"{what} lives on the moving scan's grid, and this saved registration does not record it "
                            f"(it predates metrics.json's 'grids'): register again, or save with --inverse")
        return self.moving_grid

    def warp_to_moving(self, image, labels: bool | None = None) -> nib.Nifti1Image:
        """Carry an image or label map of the fixed scan's grid onto the moving grid (planning contours onto the
        day's scan, an atlas's labels onto a subject) through ``inverse_displacement``."""
        img, labels = _load_on(image, labels, self.fixed_grid,
                               "the image to carry onto the moving grid must lie on the fixed image's grid")
        moving_affine = self._require_moving_grid("carrying an image onto the moving scan").affine
        return nib.Nifti1Image(warp_volume(img, self._inverse_field(), moving_affine, labels=labels), moving_affine)


def _load_on(image, labels: bool | None, grid: Grid | None, off_grid: str) -> tuple[nib.Nifti1Image, bool]:
    """An image or label map (``looks_like_labels`` unless ``labels`` says) that must lie on ``grid``
    (on any grid when ``grid`` is None: a saved registration that does not record the moving one)."""
    if labels and grid is not None:     # a label map may hold no label at all (an absent lesion): not refused
        return load_labels(image, grid, "labels to warp", off_grid), True
    img = load_image(image, "labels to warp" if labels else "image to warp", grid.affine if grid is not None else None)
    if grid is not None and not grid.holds(img):
        raise InputError(off_grid)
    if labels is None:
        labels = looks_like_labels(img)
    if labels:
        img = load_labels(img, img, "labels to warp")        # whole-number ids in an integer type
    return img, bool(labels)


def looks_like_labels(image: nib.spatialimages.SpatialImage) -> bool:
    """An integer image of non-negative ids, few of them: a label map. A CT stored as int16 is not one (its HU
    go below zero) and is interpolated linearly."""
    if not np.issubdtype(image.get_data_dtype(), np.integer):
        return False
    data = np.asanyarray(image.dataobj)
    return bool(data.min() >= 0) and len(label_ids(data)) <= MAX_LABELS


def _check_inverse(stats) -> None:
    """Points the inversion could not bring onto their target are an error, not a silently wrong answer."""
    if stats.unconverged:
        raise UserError(f"the registration's mapping could not be inverted at {stats.unconverged} of {stats.points} "
                        f"points (largest residual {stats.max_residual_mm:.2f} mm): it is not invertible there")


def points_array(points) -> np.ndarray:
    """Points as a float64 [N, 3] array (one point [3] becomes [1, 3]), or a clear error."""
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"points must be numbers in an array of shape (N, 3) (world mm, RAS); got "
                         f"{type(points).__name__}") from None
    if arr.ndim == 1 and arr.shape == (3,):
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(f"points must have shape (N, 3) (one x, y, z row per point), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError("points contain NaN or inf")
    return arr
