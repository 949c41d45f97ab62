"""RegistrationResult: what a registration hands back, in the fixed image's own space."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .io import field_on_grid, load_image, load_labels, save_nifti, warp_volume, write_itk_displacement
from .organs import ID_TO_ORGAN
from .prompt import Prompt


@dataclass
class RegistrationResult:
    """``warped(x) = moving(x + displacement(x))`` for each voxel x of the fixed grid.

    ``displacement`` is in mm (RAS) on the fixed grid, [X, Y, Z, 3]. ``save`` writes it for
    ITK / ANTs / Slicer (LPS vectors) as ``displacement_itk.nii.gz``.
    """
    fixed: nib.Nifti1Image
    moving: nib.Nifti1Image
    displacement: np.ndarray
    prompt: Prompt
    jacobian: dict
    seconds: float
    warped_labels: nib.Nifti1Image | None = None
    metrics: dict = field(default_factory=dict)
    _warped: nib.Nifti1Image | None = field(default=None, repr=False)

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
        img = load_labels(image, self.moving, "labels to warp") if labels else load_image(image, "image to warp", self.moving.affine)
        if labels is None and np.issubdtype(img.get_data_dtype(), np.integer):
            labels = True
        if img.shape[:3] != self.moving.shape[:3] or not np.allclose(img.affine, self.moving.affine, atol=1e-3):
            raise ValueError("the image to warp must lie on the moving image's grid")
        return nib.Nifti1Image(warp_volume(img, self.displacement, self.affine, labels=bool(labels)), self.affine)

    def warp_points(self, points_mm: np.ndarray) -> np.ndarray:
        """Fixed-space points (world mm, RAS, [N, 3]) -> corresponding moving-space points."""
        points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        inv = np.linalg.inv(self.affine)
        from scipy import ndimage
        ijk = inv[:3, :3] @ points.T + inv[:3, 3:4]
        disp = np.stack([ndimage.map_coordinates(self.displacement[..., c], ijk, order=1, mode="nearest")
                         for c in range(3)], axis=1)
        return points + disp

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"warped": out / "warped.nii.gz", "displacement": out / "displacement_itk.nii.gz",
                 "metrics": out / "metrics.json", "overview": out / "overview.png"}
        save_nifti(np.asanyarray(self.warped.dataobj).astype(np.float32), self.affine, paths["warped"])
        write_itk_displacement(self.displacement, self.affine, paths["displacement"])
        if self.warped_labels is not None:
            paths["warped_labels"] = out / "warped_labels.nii.gz"
            nib.save(self.warped_labels, str(paths["warped_labels"]))
        paths["metrics"].write_text(json.dumps(self.summary(), indent=2) + "\n")
        from .visualize import overview_png
        overview_png(self, paths["overview"])
        return paths

    def summary(self) -> dict:
        return {"prompt": str(self.prompt), "seconds": round(self.seconds, 3), "jacobian": self.jacobian,
                "max_displacement_mm": float(np.linalg.norm(self.displacement, axis=-1).max()),
                **self.metrics}

    def moving_in_fixed_grid(self) -> np.ndarray:
        """The moving image resampled into the fixed grid without deformation (for comparisons)."""
        return warp_volume(self.moving, np.zeros_like(self.displacement), self.affine)


def label_names(*label_maps: np.ndarray) -> dict[str, int]:
    ids = sorted(set().union(*[set(np.unique(m).tolist()) for m in label_maps]) - {0})
    return {ID_TO_ORGAN.get(int(i), f"label_{int(i)}"): int(i) for i in ids}


def displacement_on_fixed_grid(world_field: np.ndarray, grid_affine: np.ndarray, fixed: nib.Nifti1Image) -> np.ndarray:
    return field_on_grid(world_field, grid_affine, fixed.shape[:3], fixed.affine)
