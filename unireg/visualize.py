"""Overview figure: fixed / moving / warped / difference, one slice through the centre per plane.

Only the three slices shown are ever computed: each is a one-voxel-thick slab of the fixed
grid, and the moving scan is warped on that slab alone from the displacement there, so a
512 x 512 x 400 result draws in a fraction of a second and never needs ``result.warped``.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from .io import warp_volume  # noqa: E402

PLANES = ("axial", "coronal", "sagittal")


def center_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal centre slices of a RAS (i, j, k) volume, oriented for display."""
    i, j, k = (n // 2 for n in volume.shape)
    return [np.rot90(volume[:, :, k]), np.rot90(volume[:, j, :]), np.rot90(volume[i, :, :])]


def overview_slices(result) -> dict[str, list[np.ndarray]]:
    """The centre slices (axial, coronal, sagittal, as ``center_slices`` of the RAS-reoriented
    volumes) of the fixed, moving (undeformed, on the fixed grid) and warped images, float32."""
    affine, shape = result.affine, result.fixed.shape[:3]
    ornt = nib.io_orientation(affine)                      # fixed axis -> (RAS axis, flip)
    fixed = np.asanyarray(result.fixed.dataobj)
    ras_shape = [0, 0, 0]
    for axis, (ras_axis, _) in enumerate(ornt):
        ras_shape[int(ras_axis)] = shape[axis]
    slices = {"fixed": [], "moving": [], "warped": []}
    for ras_axis in (2, 1, 0):                             # axial (S), coronal (A), sagittal (R) normals
        axis = int(np.flatnonzero(ornt[:, 0] == ras_axis)[0])
        centre = ras_shape[ras_axis] // 2
        index = centre if ornt[axis, 1] > 0 else shape[axis] - 1 - centre
        slab = [slice(None)] * 3
        slab[axis] = slice(index, index + 1)
        slab = tuple(slab)
        slab_shape = tuple(1 if a == axis else n for a, n in enumerate(shape))
        slab_affine = affine.copy()
        slab_affine[:3, 3] += affine[:3, axis] * index
        volumes = {
            "fixed": fixed[slab],
            "moving": warp_volume(result.moving, None, slab_affine, shape=slab_shape),
            "warped": warp_volume(result.moving, np.asarray(result.displacement[slab]), slab_affine),
        }
        for key, volume in volumes.items():
            ras = nib.orientations.apply_orientation(np.asarray(volume, dtype=np.float32), ornt)
            plane = np.take(ras, 0, axis=ras_axis)
            slices[key].append(np.rot90(plane))
    return slices


def overview_png(result, path: str | Path, window=(-400.0, 400.0)) -> None:
    slices = overview_slices(result)
    slices["|fixed - warped|"] = [np.abs(f - w) for f, w in zip(slices["fixed"], slices["warped"])]
    fig, axes = plt.subplots(3, 4, figsize=(12, 9))
    for col, (title, planes) in enumerate(slices.items()):
        for row, sl in enumerate(planes):
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
