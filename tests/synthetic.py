"""Small synthetic volumes made inside the tests: blobs with TotalSegmentator label ids, a DICOM series."""
from __future__ import annotations

import locale
import time

import numpy as np

from unireg.organs import ORGAN_TO_ID


def centred_affine(shape, spacing: float) -> np.ndarray:
    """Voxel -> world (mm) of an isotropic grid of ``shape`` whose centre is the world origin."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(shape) - 1) / 2
    return affine


def blob_volume(shape=(32, 32, 32), shift=(0.0, 0.0, 0.0), scale=1.0, seed=0):
    """Body ellipsoid with a 'liver' and a 'spleen' sphere; returns (HU int16, labels uint8).

    Arrays are in nibabel (i, j, k) order. ``shift`` (voxels) and ``scale`` move the organs.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    rel = (grid - centre[:, None, None, None]) / (np.array(shape, dtype=np.float32)[:, None, None, None] / 2)
    hu = np.full(shape, -1000, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body = (rel ** 2).sum(0) < 0.85 ** 2
    hu[body] = -100
    organs = {"liver": (np.array([-0.25, 0.0, 0.0]), 0.3, 60.0), "spleen": (np.array([0.35, 0.1, 0.05]), 0.18, 45.0)}
    for name, (c, r, value) in organs.items():
        c = c + np.array(shift) / (np.array(shape) / 2)
        mask = (((rel - c[:, None, None, None]) ** 2).sum(0) < (r * scale) ** 2) & body
        hu[mask] = value
        labels[mask] = ORGAN_TO_ID[name]
    hu += rng.normal(0, 5, size=shape).astype(np.float32)
    return hu.astype(np.int16), labels


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    ma, mb = a == label, b == label
    return float(2 * (ma & mb).sum() / max(ma.sum() + mb.sum(), 1))


def write_dicom_series(image, folder, series_uid: str) -> None:
    """One slice per file with the tags that place it: position, orientation, series (SimpleITK's "DICOM series
    from array" recipe), signed 16-bit HU. (Rescale slope / intercept are applied by GDCM for CT Image Storage
    files; SimpleITK's writer makes Secondary Capture ones, so this series stores HU as they are.)"""
    import SimpleITK as sitk
    folder.mkdir(parents=True, exist_ok=True)
    stored = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    tags = [("0008|0060", "CT"), ("0020|000e", series_uid), ("0020|000d", series_uid + ".0"),
            ("0008|0021", time.strftime("%Y%m%d")),
            ("0020|0037", "\\".join(map(str, (*direction[0::3], *direction[1::3]))))]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved = locale.setlocale(locale.LC_ALL)      # GDCM's writer sets the process's locale to "C": every later
    try:                                         # subprocess of the test run would then decode output as ASCII
        for k in range(image.GetDepth()):
            plane = stored[:, :, k]
            for tag, value in tags:
                plane.SetMetaData(tag, value)
            plane.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
            plane.SetMetaData("0020|0013", str(k + 1))
            writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
            writer.Execute(plane)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
