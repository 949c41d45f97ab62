"""Image I/O and physical space.

Inputs may differ in orientation, spacing, size and field of view. Everything is related
through world coordinates (RAS+, mm, as nibabel's affines): both scans are resampled onto a
*working grid* built from the fixed image (isotropic voxels covering its field of view) and
results are mapped back onto the fixed image's own grid and affine. Array conventions:

* nibabel arrays are indexed (i, j, k) with ``world = affine @ [i, j, k, 1]``;
* network tensors are [B, 1, D, H, W] = (k, j, i), i.e. ``np.transpose(array, (2, 1, 0))``;
* displacement fields given to users are in mm, RAS, on the fixed grid; on disk they are
  written by SimpleITK in ITK's convention (LPS vectors), which ITK, ANTs and Slicer apply as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

from .preprocessing import HU_OUTSIDE

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class InputError(ValueError):
    """An input image or label map cannot be used; the message names the input and the problem."""


# ---------------------------------------------------------------------------------------- loading
def load_image(source, name: str = "image", affine: np.ndarray | None = None) -> nib.Nifti1Image:
    """Path / nibabel image / (array, affine) / array or tensor (+ ``affine``) -> checked 3-D image."""
    img = _to_nifti(source, name, affine)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        img = nib.Nifti1Image(data[..., 0], img.affine, img.header)
        data = data[..., 0]
    if data.ndim == 2 or (data.ndim == 3 and 1 in data.shape):
        raise InputError(f"{name} is 2-D (shape {data.shape}); UniReg registers 3-D volumes")
    if data.ndim == 4:
        raise InputError(f"{name} is 4-D with {data.shape[3]} volumes (shape {data.shape}); pass one 3-D volume")
    if data.ndim != 3:
        raise InputError(f"{name} has {data.ndim} dimensions (shape {data.shape}); expected a 3-D volume")
    if data.size == 0:
        raise InputError(f"{name} is empty (shape {data.shape})")
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{name} has non-numeric voxels of type {data.dtype}")
    if np.issubdtype(data.dtype, np.floating):
        bad = int((~np.isfinite(data)).sum())
        if bad:
            raise InputError(f"{name} has {bad} NaN/inf voxels; fill or mask them before registering")
    if data.min() == data.max():
        raise InputError(f"{name} is empty: every voxel equals {data.flat[0]}")
    if not np.isfinite(img.affine).all() or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputError(f"{name} has an invalid affine (singular or non-finite)")
    return img


def load_labels(source, reference: nib.Nifti1Image, name: str = "labels") -> nib.Nifti1Image:
    """Label map that must lie on ``reference``'s grid (same shape and affine)."""
    img = _to_nifti(source, name, reference.affine)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != reference.shape[:3] or not np.allclose(img.affine, reference.affine, atol=1e-3):
        raise InputError(f"{name} grid (shape {data.shape}) differs from its image's grid "
                         f"(shape {reference.shape[:3]}) or affine; a label map must share its image's grid")
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        raise InputError(f"{name} holds non-integer values; expected a label map of integer ids")
    return nib.Nifti1Image(data.astype(np.int16), reference.affine)


def _to_nifti(source, name: str, affine) -> nib.Nifti1Image:
    if isinstance(source, nib.spatialimages.SpatialImage):
        return nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine)
    if isinstance(source, (str, Path)):
        return _read_path(Path(source), name)
    if isinstance(source, tuple) and len(source) == 2:
        source, affine = source
    if hasattr(source, "detach"):  # torch tensor
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        data = source
        while data.ndim > 3 and data.shape[0] == 1:
            data = data[0]
        aff = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
        if aff.shape != (4, 4):
            raise InputError(f"{name}: affine must be 4x4, got shape {aff.shape}")
        return nib.Nifti1Image(data, aff)
    raise InputError(f"{name}: cannot read an image from {type(source).__name__}; "
                     f"pass a path, a nibabel image, or an array with an affine")


def _read_path(path: Path, name: str) -> nib.Nifti1Image:
    if not path.exists():
        raise InputError(f"{name} not found: {path}")
    if path.is_dir():
        raise InputError(f"{name} is a directory, not an image file: {path}")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    if suffix in NIFTI_SUFFIXES:
        try:
            img = nib.load(str(path))
            return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)  # reads it all now
        except Exception as exc:
            raise InputError(f"{name}: {path} is not a readable NIfTI image ({exc})") from None
    if suffix.lower() in ITK_SUFFIXES:
        return _read_itk(path, name)
    raise InputError(f"{name}: unsupported file type {suffix or '(none)'!r} for {path}; "
                     f"expected one of {NIFTI_SUFFIXES + ITK_SUFFIXES}")


def _read_itk(path: Path, name: str) -> nib.Nifti1Image:
    import SimpleITK as sitk
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{name}: {path} is not a readable image ({str(exc).splitlines()[0]})") from None
    data = np.transpose(sitk.GetArrayFromImage(img), tuple(reversed(range(img.GetDimension()))))
    dim = img.GetDimension()
    if dim != 3:
        raise InputError(f"{name} is {dim}-D (shape {data.shape}); UniReg registers 3-D volumes")
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return nib.Nifti1Image(data, _RAS_TO_LPS @ lps)


# ------------------------------------------------------------------------------------ working grid
@dataclass(frozen=True)
class WorkingGrid:
    """Isotropic grid over the fixed image's field of view, sizes a multiple of ``divisor``."""
    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def from_image(cls, img: nib.Nifti1Image, spacing_mm: float, max_size: int, divisor: int) -> "WorkingGrid":
        canonical = nib.as_closest_canonical(img)
        zooms = np.array(canonical.header.get_zooms()[:3], dtype=float)
        extent = np.array(canonical.shape[:3]) * zooms
        spacing = max(spacing_mm, float(extent.max()) / max_size)
        shape = [max(divisor, int(math.ceil(e / spacing / divisor - 1e-6)) * divisor) for e in extent]
        shape = [min(n, (max_size // divisor) * divisor) for n in shape]
        direction = canonical.affine[:3, :3] / zooms
        affine = np.eye(4)
        affine[:3, :3] = direction * spacing
        centre = canonical.affine @ np.append((np.array(canonical.shape[:3]) - 1) / 2.0, 1.0)
        affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
        return cls(tuple(shape), affine)

    @property
    def spacing(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))

    def resample(self, img: nib.Nifti1Image, labels: bool = False) -> np.ndarray:
        """``img`` on this grid, (i, j, k) order; air outside an image, background outside labels."""
        out = resample_from_to(_as_float(img, labels), (self.shape, self.affine), order=0 if labels else 1,
                               mode="constant", cval=0 if labels else HU_OUTSIDE)
        return np.asarray(out.dataobj, dtype=np.float32)


def _as_float(img: nib.Nifti1Image, labels: bool) -> nib.Nifti1Image:
    data = np.asanyarray(img.dataobj).astype(np.float32 if not labels else np.int16)
    return nib.Nifti1Image(data, img.affine)


def ijk_to_tensor_order(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(array, (2, 1, 0)))


def tensor_field_to_world(displacement: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel field [3, D, H, W] (d, h, w) = (dk, dj, di) -> mm RAS field [I, J, K, 3]."""
    d_ijk = np.transpose(displacement[::-1], (3, 2, 1, 0))           # [I, J, K, (di, dj, dk)]
    return d_ijk @ affine[:3, :3].T


# --------------------------------------------------------------------------- fields on image grids
def voxel_world(shape, affine: np.ndarray) -> np.ndarray:
    """World coordinates [3, N] of every voxel centre of a grid."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return affine[:3, :3].astype(np.float32) @ ijk + affine[:3, 3:4].astype(np.float32)


def sample_at_world(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int, cval: float,
                    mode: str = "constant") -> np.ndarray:
    """Values of ``volume`` (i,j,k) at world points [3, N] (linear or nearest).

    As in ITK, a voxel is a cube: points up to half a voxel beyond the edge centres take the
    edge value, points further out take ``cval`` (mode "constant") - so fields exported for
    ITK reproduce our resampling exactly.
    """
    inv = np.linalg.inv(affine)
    ijk = inv[:3, :3] @ points + inv[:3, 3:4]
    values = ndimage.map_coordinates(volume, ijk, order=order, mode="nearest", prefilter=False)
    if mode == "constant":
        upper = np.array(volume.shape, dtype=ijk.dtype)[:, None] - 0.5
        outside = ((ijk < -0.5) | (ijk > upper)).any(axis=0)
        values[outside] = cval
    return values


def field_on_grid(world_field: np.ndarray, field_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """Resample a mm field [I,J,K,3] on one grid to another grid -> [X,Y,Z,3]."""
    points = voxel_world(shape, affine)
    comps = [sample_at_world(world_field[..., c], field_affine, points, order=1, cval=0.0, mode="nearest")
             for c in range(3)]
    return np.stack(comps, axis=-1).reshape(*shape, 3).astype(np.float32)


def warp_volume(moving: nib.Nifti1Image, field_mm: np.ndarray, affine: np.ndarray, labels: bool = False) -> np.ndarray:
    """moving(x + u(x)) for every voxel x of the grid that ``field_mm`` [X,Y,Z,3] lives on."""
    shape = field_mm.shape[:3]
    points = voxel_world(shape, affine) + field_mm.reshape(-1, 3).T
    data = np.asanyarray(moving.dataobj)
    values = sample_at_world(data.astype(np.float32), moving.affine, points, order=0 if labels else 1,
                             cval=0.0 if labels else HU_OUTSIDE)
    values = values.reshape(shape)
    return np.rint(values).astype(data.dtype) if labels else values


def fields_of_view_overlap(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    def box(img):
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in img.shape[:3]], indexing="ij")).reshape(3, -1)
        world = img.affine[:3, :3] @ corners + img.affine[:3, 3:4]
        return world.min(1), world.max(1)
    (a0, a1), (b0, b1) = box(a), box(b)
    return bool(np.all(a0 <= b1) and np.all(b0 <= a1))


# ---------------------------------------------------------------------------------------- writing
def write_itk_displacement(field_mm_ras: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write a mm RAS field [X,Y,Z,3] on a grid as an ITK displacement field (LPS vectors)."""
    import SimpleITK as sitk
    lps = field_mm_ras * np.array([-1.0, -1.0, 1.0], dtype=np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(lps, (2, 1, 0, 3))).astype(np.float64),
                                 isVector=True)
    _set_itk_geometry(img, affine)
    sitk.WriteImage(img, str(path))


def to_sitk(img: nib.Nifti1Image):
    """nibabel image -> SimpleITK image with the same physical geometry."""
    import SimpleITK as sitk
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asanyarray(img.dataobj), (2, 1, 0))))
    _set_itk_geometry(out, img.affine)
    return out


def _set_itk_geometry(img, affine: np.ndarray) -> None:
    lps = _RAS_TO_LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in lps[:3, 3]))
    img.SetDirection(tuple(float(d) for d in (lps[:3, :3] / spacing).flatten()))


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))
