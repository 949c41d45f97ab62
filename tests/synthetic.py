"""Small synthetic volumes made inside the tests: blobs with TotalSegmentator label ids, a DICOM series."""
from __future__ import annotations

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


def write_dicom_series(volume: np.ndarray, affine: np.ndarray, folder, series_uid: str,
                       intercept: float = -1024.0) -> None:
    """A scanner-like CT series, one file per slice (pydicom): CT Image Storage, unsigned 16-bit stored values
    ``HU - intercept`` with that rescale intercept, and the position / orientation / spacing tags that place
    each slice. ``volume`` is HU in nibabel (i, j, k) order, ``affine`` its RAS affine (axes orthogonal)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    along_i, along_j = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    stored = np.rint(volume - intercept).astype(np.uint16)
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"{series_uid}.{k + 1}"
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series_uid, f"{series_uid}.0", f"{series_uid}.9"
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "phantom", k + 1
        ds.ImagePositionPatient = [float(x) for x in lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]]
        ds.ImageOrientationPatient = [float(x) for x in (*along_i, *along_j)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]        # between rows (j), between columns (i)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1.0, "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()   # rows along j, columns along i
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
