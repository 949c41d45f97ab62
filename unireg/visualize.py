"""Overview figure: fixed / moving / warped / difference, one slice through the centre per plane."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402


def _canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(data.astype(np.float32), affine)).dataobj)


def center_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal centre slices of a RAS (i, j, k) volume, oriented for display."""
    i, j, k = (n // 2 for n in volume.shape)
    return [np.rot90(volume[:, :, k]), np.rot90(volume[:, j, :]), np.rot90(volume[i, :, :])]


def overview_png(result, path: str | Path, window=(-400.0, 400.0)) -> None:
    affine = result.affine
    fixed = _canonical(np.asanyarray(result.fixed.dataobj), affine)
    moving = _canonical(result.moving_in_fixed_grid(), affine)
    warped = _canonical(np.asanyarray(result.warped.dataobj), affine)
    columns = [("fixed", fixed), ("moving", moving), ("warped", warped), ("|fixed - warped|", np.abs(fixed - warped))]
    fig, axes = plt.subplots(3, 4, figsize=(12, 9))
    for col, (title, vol) in enumerate(columns):
        for row, sl in enumerate(center_slices(vol)):
            ax = axes[row, col]
            if col == 3:
                ax.imshow(sl, cmap="magma", vmin=0, vmax=window[1] - window[0])
            else:
                ax.imshow(sl, cmap="gray", vmin=window[0], vmax=window[1])
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.suptitle(f"{result.prompt}  ·  {result.seconds:.2f} s  ·  "
                 f"non-positive Jacobian {result.jacobian['nonpositive_jacobian_pct']:.3f} %")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
