"""RegistrationResult: what a registration hands back, in the fixed image's own space."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import UserError
from .io import InputError, load_image, load_labels, save_nifti, stored_like, warp_volume, write_itk_displacement
from .prompt import Prompt

#: Files ``save`` writes; a folder holding anything else is not a previous UniReg output.
OUTPUT_NAMES = ("warped.nii.gz", "displacement_itk.nii.gz", "warped_labels.nii.gz", "affine.mat", "metrics.json",
                "overview.png", "inverse_displacement_itk.nii.gz", "inverse_warped.nii.gz", "inverse_warped_labels.nii.gz")


@dataclass
class RegistrationResult:
    """``warped(x) = moving(x + displacement(x))`` for each voxel x of the fixed grid.

    ``displacement`` is the total mapping (pre-alignment ∘ deformable) in mm (RAS) on the fixed
    grid, [X, Y, Z, 3]; ``affine_matrix`` is the pre-alignment alone (fixed world -> moving world).
    ``save`` writes the field for ITK / ANTs / Slicer (LPS vectors) as ``displacement_itk.nii.gz``
    and the affine as ITK's ``affine.mat``.

    The other direction (``unireg.inverse``): ``moving_points_to_fixed`` carries moving-space points
    back, ``inverse_displacement`` is the inverse mapping on the moving grid and ``warp_to_moving``
    puts fixed-space images and label maps (``fixed_labels``: the ones given to ``register``) onto
    the moving grid; ``save(..., inverse=True)`` writes them too.
    """
    fixed: nib.Nifti1Image
    moving: nib.Nifti1Image
    displacement: np.ndarray
    prompt: Prompt
    jacobian: dict
    seconds: float
    warped_labels: nib.Nifti1Image | None = None
    metrics: dict = field(default_factory=dict)
    affine_matrix: np.ndarray = field(default_factory=lambda: np.eye(4))
    fixed_labels: nib.Nifti1Image | None = None
    _warped: nib.Nifti1Image | None = field(default=None, repr=False)
    _inverse: "np.ndarray | object | None" = field(default=None, repr=False)   # array or inverse.LatticeField

    @property
    def affine(self) -> np.ndarray:
        return self.fixed.affine

    @property
    def warped(self) -> nib.Nifti1Image:
        if self._warped is None:
            self._warped = nib.Nifti1Image(warp_volume(self.moving, self.displacement, self.affine), self.affine)
        return self._warped

    def warp(self, image, labels: bool | None = None) -> nib.Nifti1Image:
        """Warp another image or label map of the moving scan's grid into the fixed grid."""
        img, labels = _load_on(image, labels, self.moving, "the image to warp must lie on the moving image's grid")
        return nib.Nifti1Image(warp_volume(img, self.displacement, self.affine, labels=labels), self.affine)

    def warp_points(self, points_mm) -> np.ndarray:
        """Fixed-space points (world mm, RAS, [N, 3] or one point [3]) -> moving-space points."""
        points = _points_array(points_mm)
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
        points = _points_array(points_mm)
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
            self._inverse, stats = inverse_field(self.displacement, self.affine, self.affine_matrix,
                                                 self.moving.shape[:3], self.moving.affine)
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

    def warp_to_moving(self, image, labels: bool | None = None) -> nib.Nifti1Image:
        """Carry an image or label map of the fixed scan's grid onto the moving grid (planning contours onto the
        day's scan, an atlas's labels onto a subject) through ``inverse_displacement``."""
        img, labels = _load_on(image, labels, self.fixed,
                               "the image to carry onto the moving grid must lie on the fixed image's grid")
        moving_affine = self.moving.affine
        return nib.Nifti1Image(warp_volume(img, self._inverse_field(), moving_affine, labels=labels), moving_affine)

    # ------------------------------------------------------------------------------ writing
    def save(self, out_dir: str | Path, overwrite: bool = True, inverse: bool = False) -> dict[str, Path]:
        """Write every output into a fresh temporary folder beside ``out_dir``, then move it into place.

        A previous run's files never mix with this one's; readers never see a half-written folder.
        With ``overwrite=False`` an existing non-empty ``out_dir`` is refused. ``inverse=True`` adds the
        inverse field on the moving grid (``inverse_displacement_itk.nii.gz``), the fixed scan carried
        onto that grid (``inverse_warped.nii.gz``) and, when ``register`` was given them, the fixed
        labels there (``inverse_warped_labels.nii.gz``).
        """
        out = Path(out_dir)
        check_output_dir(out, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            names = self._write(tmp, inverse)
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {key: out / name for key, name in names.items()}

    def _write(self, folder: Path, inverse: bool = False) -> dict[str, str]:
        names = {"warped": "warped.nii.gz", "displacement": "displacement_itk.nii.gz", "affine": "affine.mat",
                 "metrics": "metrics.json", "overview": "overview.png"}
        # Warped here without keeping it (unless it was kept already): the inverse outputs below then run
        # without a full-size float32 scan held beside them (512^2 x 400: 0.4 GB less at the peak).
        warped = self._warped.dataobj if self._warped is not None else \
            warp_volume(self.moving, self.displacement, self.affine)
        warped = stored_like(np.asanyarray(warped), self.moving)   # the float32 scan let go before it is compressed
        save_nifti(warped, self.affine, folder / names["warped"])
        del warped
        write_itk_displacement(self.displacement, self.affine, folder / names["displacement"])
        write_itk_affine(self.affine_matrix, folder / names["affine"])
        if self.warped_labels is not None:
            names["warped_labels"] = "warped_labels.nii.gz"
            nib.save(self.warped_labels, str(folder / names["warped_labels"]))
        if inverse:
            names.update(inverse_displacement="inverse_displacement_itk.nii.gz", inverse_warped="inverse_warped.nii.gz")
            write_itk_displacement(self._inverse_field(), self.moving.affine, folder / names["inverse_displacement"])
            save_nifti(stored_like(np.asanyarray(self.warp_to_moving(self.fixed, labels=False).dataobj), self.fixed),
                       self.moving.affine, folder / names["inverse_warped"])
            if self.fixed_labels is not None:
                names["inverse_warped_labels"] = "inverse_warped_labels.nii.gz"
                nib.save(self.warp_to_moving(self.fixed_labels, labels=True), str(folder / names["inverse_warped_labels"]))
        (folder / names["metrics"]).write_text(json.dumps(json_safe(self.summary()), indent=2, allow_nan=False) + "\n")
        from .visualize import overview_png
        overview_png(self, folder / names["overview"])
        return names

    def summary(self) -> dict:
        return {"prompt": str(self.prompt), "seconds": round(self.seconds, 3), "jacobian": self.jacobian,
                "max_displacement_mm": max_norm(self.displacement),
                **self.metrics}

    def moving_in_fixed_grid(self) -> np.ndarray:
        """The moving image resampled into the fixed grid without deformation (for comparisons)."""
        return warp_volume(self.moving, None, self.affine, shape=self.displacement.shape[:3])


def _load_on(image, labels: bool | None, grid: nib.Nifti1Image, off_grid: str) -> tuple[nib.Nifti1Image, bool]:
    """An image or label map (integer types count as labels unless ``labels`` says) that must lie on ``grid``."""
    img = load_labels(image, grid, "labels to warp") if labels else load_image(image, "image to warp", grid.affine)
    if labels is None and np.issubdtype(img.get_data_dtype(), np.integer):
        labels = True
    if img.shape[:3] != grid.shape[:3] or not np.allclose(img.affine, grid.affine, atol=1e-3):
        raise InputError(off_grid)
    return img, bool(labels)


def _check_inverse(stats) -> None:
    """Points the inversion could not bring onto their target are an error, not a silently wrong answer."""
    if stats.unconverged:
        raise UserError(f"the registration's mapping could not be inverted at {stats.unconverged} of {stats.points} "
                        f"points (largest residual {stats.max_residual_mm:.2f} mm): it is not invertible there")


def max_norm(field: np.ndarray, slab: int = 16) -> float:
    """Largest vector length of a [X,Y,Z,3] field, one slab at a time (no full-size temporary)."""
    return float(max(np.sqrt((field[..., k:k + slab, :] ** 2).sum(-1)).max() for k in range(0, field.shape[2], slab)))


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work when ``out`` cannot receive the outputs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty; pass --overwrite to replace its contents")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {out}: {parent} is not writable")


def _replace_dir(new: Path, out: Path) -> None:
    """Move a complete folder to ``out``; an old ``out`` is moved aside first and then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    os.rename(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _points_array(points) -> np.ndarray:
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


def json_safe(value):
    """NaN / inf -> None, numpy scalars -> Python numbers (strict JSON, as metrics.json promises)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    return value


def write_itk_affine(matrix: np.ndarray, path: Path) -> None:
    """The pre-alignment as an ITK transform file (fixed physical point -> moving point, LPS)."""
    import SimpleITK as sitk
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ np.asarray(matrix, dtype=float) @ flip
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(lps[:3, :3].flatten()))
    transform.SetTranslation(tuple(lps[:3, 3]))
    sitk.WriteTransform(transform, str(path))
