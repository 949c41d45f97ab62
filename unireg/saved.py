"""A registration folder read back: apply a registration long after it ran, without running it again.

``unireg register --out DIR`` (``RegistrationResult.save``) writes the total mapping as an ITK displacement
field, the pre-alignment as an ITK affine and, in ``metrics.json``, the grids of both scans. Users come back
to it with the images that came later or from elsewhere: the PET or dose map of the moving session, another
label map, landmarks to carry over or to score. :func:`load_registration` reads the folder into a
:class:`SavedRegistration`, which has every operation of :class:`~unireg.registration_map.Mapping` (``warp``,
``warp_points``, ``moving_points_to_fixed``, ``warp_to_moving``); ``unireg apply`` is its command line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .io import InputError
from .registration_map import Grid, Mapping

DISPLACEMENT = "displacement_itk.nii.gz"
INVERSE_DISPLACEMENT = "inverse_displacement_itk.nii.gz"
AFFINE = "affine.mat"
METRICS = "metrics.json"
#: Bytes read from a field file at a time.
READ_BLOCK = 1 << 26
#: ITK's LPS <-> UniReg's RAS (x and y change sign).
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SavedRegistration(Mapping):
    """A saved registration's mapping and grids (not its scans); see :class:`~unireg.registration_map.Mapping`."""
    folder: Path
    displacement: np.ndarray        # [X,Y,Z,3] float32 mm RAS on the fixed grid
    fixed_grid: Grid
    moving_grid: Grid | None        # None: a folder from before metrics.json recorded it, and no inverse saved
    affine_matrix: np.ndarray
    jacobian: dict
    metrics: dict = field(default_factory=dict)
    prompt: str = ""
    _inverse: np.ndarray | None = field(default=None, repr=False)


def load_registration(folder: "str | Path") -> SavedRegistration:
    """Read a folder ``unireg register --out`` (or ``RegistrationResult.save``) wrote."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the --out folder of `unireg register`")
    missing = [name for name in (DISPLACEMENT, AFFINE, METRICS) if not (folder / name).is_file()]
    if missing:
        hint = ("; it holds a `unireg register --pairs` summary: give one pair's folder, " f"{folder}/<name>"
                if (folder / "summary.csv").is_file() else "")
        raise InputError(f"{folder} is not a UniReg registration folder: it has no {', '.join(missing)} "
                         f"(what `unireg register --out` writes){hint}")
    metrics = _read_metrics(folder / METRICS)
    displacement, fixed_grid = read_itk_displacement(folder / DISPLACEMENT)
    grids = metrics.get("grids") or {}
    if "fixed" in grids and not Grid.from_dict(grids["fixed"], "fixed").holds(fixed_grid):
        raise InputError(f"{DISPLACEMENT} does not lie on the fixed grid {METRICS} records: the folder mixes files "
                         f"of different registrations")
    moving_grid = Grid.from_dict(grids["moving"], "moving") if "moving" in grids else None
    inverse = None
    if (folder / INVERSE_DISPLACEMENT).is_file():
        inverse, inverse_grid = read_itk_displacement(folder / INVERSE_DISPLACEMENT)
        if moving_grid is None:
            moving_grid = inverse_grid
        elif not moving_grid.holds(inverse_grid):
            raise InputError(f"{INVERSE_DISPLACEMENT} does not lie on the moving grid {METRICS} records: the folder "
                             f"mixes files of different registrations")
    return SavedRegistration(folder, displacement, fixed_grid, moving_grid, read_itk_affine(folder / AFFINE),
                             metrics.get("jacobian") or {}, metrics, str(metrics.get("prompt", "")), inverse)


def read_itk_displacement(path: Path) -> tuple[np.ndarray, Grid]:
    """An ITK displacement field (NIfTI vector image, LPS vectors) -> (float32 mm RAS [X,Y,Z,3], its grid)."""
    try:
        img = nib.load(str(path))
        data = _read_into_memory(img, path)
    except Exception as exc:  # nibabel's many error types for a damaged file
        raise InputError(f"{path} cannot be read as a NIfTI displacement field ({exc})") from None
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[3] != 3 or not np.issubdtype(data.dtype, np.floating):
        raise InputError(f"{path} is not a 3-D displacement field (shape {data.shape}, {data.dtype}); expected "
                         f"[X,Y,Z,1,3] floating-point vectors")
    field_mm = data.astype(np.float32, copy=False)
    if not field_mm.flags.writeable:                           # another program's file, read by nibabel
        field_mm = field_mm.copy()
    field_mm[..., :2] *= -1.0                                  # LPS -> RAS, in place on the array just read
    slabs = range(0, field_mm.shape[2], 16)                    # no full-size mask
    if not all(np.isfinite(field_mm[:, :, k:k + 16]).all() for k in slabs):
        raise InputError(f"{path} holds NaN or inf displacements")
    return field_mm, Grid(tuple(int(n) for n in data.shape[:3]), np.asarray(img.affine, dtype=np.float64))


def _read_into_memory(img, path: Path) -> np.ndarray:
    """The voxels of a NIfTI file as one writable array. Unscaled little-endian float32 (what UniReg writes) is
    read straight into it: nibabel would first hold the file's bytes and then a writable copy, twice the field
    (2.5 GB at 512x512x400)."""
    header = img.header
    slope, inter = header.get_slope_inter()
    if header.get_data_dtype() != np.dtype("<f4") or slope not in (None, 1.0) or inter not in (None, 0.0):
        return np.asanyarray(img.dataobj)
    from nibabel.openers import ImageOpener
    out = np.empty(header.get_data_shape(), dtype="<f4", order="F")           # NIfTI's own voxel order
    buffer = memoryview(out.ravel(order="K")).cast("B")                        # a view: no copy
    with ImageOpener(str(path), "rb") as f:
        f.seek(int(img.dataobj.offset))                                        # where nibabel reads from
        filled = 0
        while filled < len(buffer):   # in blocks: gzip's readinto reads a whole request into a temporary first
            n = f.readinto(buffer[filled:filled + READ_BLOCK])
            if not n:
                raise InputError(f"{path} ends after {filled} of its {len(buffer)} bytes of voxels (a truncated file)")
            filled += n
    return out


def read_itk_affine(path: Path) -> np.ndarray:
    """An ITK affine transform file (fixed physical point -> moving point, LPS; any centre) -> 4x4 RAS matrix."""
    import SimpleITK as sitk
    try:
        transform = sitk.ReadTransform(str(path))
        parameters = np.asarray(transform.GetParameters(), dtype=np.float64)
        centre = np.asarray(transform.GetFixedParameters(), dtype=np.float64)
    except RuntimeError as exc:
        raise InputError(f"{path} cannot be read as an ITK transform ({' '.join(str(exc).split()[-12:])})") from None
    if transform.GetDimension() != 3 or parameters.size != 12 or centre.size != 3:
        raise InputError(f"{path} is not a 3-D affine transform ({transform.GetName()}, {parameters.size} parameters)")
    linear, translation = parameters[:9].reshape(3, 3), parameters[9:]
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = translation + centre - linear @ centre       # y = A (x - c) + c + t
    return _LPS @ lps @ _LPS


def _read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(metrics, dict):
        raise InputError(f"{path} is not a UniReg metrics file (a JSON object)")
    return metrics
