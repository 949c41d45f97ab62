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
from .io import save_nifti, stored_like, warp_volume, write_itk_displacement
from .registration_map import Grid, Mapping
from .prompt import Prompt

#: Files ``save`` writes; a folder holding anything else is not a previous UniReg output.
OUTPUT_NAMES = ("warped.nii.gz", "displacement_itk.nii.gz", "warped_labels.nii.gz", "affine.mat", "metrics.json",
                "overview.png", "inverse_displacement_itk.nii.gz", "inverse_warped.nii.gz", "inverse_warped_labels.nii.gz")


@dataclass
class RegistrationResult(Mapping):
    """``warped(x) = moving(x + displacement(x))`` for each voxel x of the fixed grid.

    ``displacement`` is the total mapping (pre-alignment ∘ deformable) in mm (RAS) on the fixed
    grid, [X, Y, Z, 3]; ``affine_matrix`` is the pre-alignment alone (fixed world -> moving world).
    ``save`` writes the field for ITK / ANTs / Slicer (LPS vectors) as ``displacement_itk.nii.gz``
    and the affine as ITK's ``affine.mat``.

    The other direction (``unireg.inverse``): ``moving_points_to_fixed`` carries moving-space points
    back, ``inverse_displacement`` is the inverse mapping on the moving grid and ``warp_to_moving``
    puts fixed-space images and label maps (``fixed_labels``: the ones given to ``register``) onto
    the moving grid; ``save(..., inverse=True)`` writes them too. These operations are
    ``unireg.registration_map.Mapping``'s, shared with a saved folder read back by ``unireg.load_registration``.
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
    def fixed_grid(self) -> Grid:
        return Grid.of(self.fixed)

    @property
    def moving_grid(self) -> Grid:
        return Grid.of(self.moving)

    @property
    def warped(self) -> nib.Nifti1Image:
        if self._warped is None:
            self._warped = nib.Nifti1Image(warp_volume(self.moving, self.displacement, self.affine), self.affine)
        return self._warped

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
                **self.metrics,
                # where the two scans lay: `unireg apply` / load_registration check images against them
                "grids": {"fixed": self.fixed_grid.as_dict(), "moving": self.moving_grid.as_dict()}}

    def moving_in_fixed_grid(self) -> np.ndarray:
        """The moving image resampled into the fixed grid without deformation (for comparisons)."""
        return warp_volume(self.moving, None, self.affine, shape=self.displacement.shape[:3])


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
