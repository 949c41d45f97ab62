"""Applying a registration to files: an image or label map onto the other grid, a points CSV into the other scan,
and the target registration error of points whose true matches are known.

``unireg apply`` is this module's command line; the mapping itself is a :class:`~unireg.registration_map.Mapping` (a
folder read back by :func:`unireg.saved.load_registration`, or a fresh ``RegistrationResult``).

Points files are CSV with ``x``, ``y``, ``z`` columns in world mm (RAS, as NIfTI; or LPS, as ITK and DICOM,
with ``lps=True``), one point per row; other columns (an id, a name) are carried through unchanged. 3D Slicer's
markups files (.fcsv) are read and written as Slicer writes them, in the coordinate system their header names. The
error of a registration at a landmark is the distance between where it puts the landmark and the landmark's
known match; DIR-Lab and Learn2Reg report its mean, spread and tail over a scan's landmarks, and so does
:func:`error_summary`.
"""
from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import NIFTI_SUFFIXES, InputError, load_image, save_nifti, stored_like
from .registration_map import Mapping, looks_like_labels

INTERPOLATIONS = ("auto", "linear", "nearest")
COORDINATES = ("x", "y", "z")
_LPS = np.array([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------------- images
def apply_to_image(mapping: Mapping, image, out: "str | Path", interpolation: str = "auto", inverse: bool = False,
                   overwrite: bool = False) -> dict:
    """Resample ``image`` (of the moving scan's grid; with ``inverse``, of the fixed scan's) onto the other grid
    through ``mapping`` and write it to ``out`` (.nii / .nii.gz, atomically). Images keep their stored type
    (an int16 CT stays int16), label maps their ids."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    out = check_out(out, "image", overwrite)
    img = load_image(image, "image to apply the registration to")
    labels = looks_like_labels(img) if interpolation == "auto" else interpolation == "nearest"
    moved = mapping.warp_to_moving(img, labels=labels) if inverse else mapping.warp(img, labels=labels)
    data = np.asanyarray(moved.dataobj)
    _atomic(out, lambda tmp: save_nifti(data if labels else stored_like(data, img), moved.affine, tmp))
    return {"out": str(out), "interpolation": "nearest" if labels else "linear",
            "grid": "moving" if inverse else "fixed", "shape": list(moved.shape)}


# ---------------------------------------------------------------------------------------------- points
@dataclass
class PointsFile:
    """A points file: its columns, its rows (as read) and the points [N, 3] in world mm RAS. A 3D Slicer
    markups file (.fcsv) also keeps its comment lines and says whether it is in LPS."""
    path: Path
    columns: list[str]
    rows: list[dict]
    points: np.ndarray
    preamble: tuple[str, ...] = ()
    lps: bool = False

    @property
    def slicer(self) -> bool:
        return self.path.name.lower().endswith(".fcsv")


def read_points(path: "str | Path", lps: bool = False) -> PointsFile:
    """A CSV with x, y, z columns (any case; other columns kept; ``lps``: its coordinates are LPS), or a 3D Slicer
    markups file (.fcsv: its ``# columns`` and ``# CoordinateSystem`` lines decide) -> its points in RAS mm."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"points file {path} does not exist")
    preamble: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            if path.name.lower().endswith(".fcsv"):
                lines = f.read().splitlines()
                preamble = [line for line in lines if line.startswith("#")]
                columns, lps = _slicer_header(preamble, path)
                rows = list(csv.DictReader([line for line in lines if line and not line.startswith("#")],
                                           fieldnames=columns))
            else:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"points file {path} is not a readable CSV ({exc})") from None
    lower = {c.strip().lower(): c for c in columns}
    missing = [c for c in COORDINATES if c not in lower]
    if missing:
        raise InputError(f"points file {path} needs columns x, y and z (world mm) in its header; it has "
                         f"{', '.join(columns) or 'no header'}")
    if not rows:
        raise InputError(f"points file {path} holds no points")
    points = np.empty((len(rows), 3))
    for i, row in enumerate(rows):
        for j, c in enumerate(COORDINATES):
            value = (row.get(lower[c]) or "").strip()
            try:
                points[i, j] = float(value)
            except ValueError:
                raise InputError(f"points file {path}, row {i + 2}: {c} is {value!r}, not a number") from None
    if not np.isfinite(points).all():
        bad = int(np.argwhere(~np.isfinite(points))[0, 0]) + 2
        raise InputError(f"points file {path}, row {bad}: a coordinate is NaN or inf")
    return PointsFile(path, columns, rows, points * _LPS if lps else points, tuple(preamble), lps)


def _slicer_header(preamble: list[str], path: Path) -> tuple[list[str], bool]:
    """A Slicer markups file's columns and coordinate system (``LPS``/``RAS``, or Slicer 4's ``1``/``0``)."""
    fields = {}
    for line in preamble:
        key, _, value = line.lstrip("#").partition("=")
        fields[key.strip().lower()] = value.strip()
    if "columns" not in fields:
        raise InputError(f"points file {path} is not a 3D Slicer markups file: no '# columns = ...' line")
    system = fields.get("coordinatesystem", "RAS").upper()
    if system not in ("LPS", "RAS", "0", "1"):
        raise InputError(f"points file {path}: coordinate system {system!r} is neither LPS nor RAS")
    return [c.strip() for c in fields["columns"].split(",")], system in ("LPS", "1")


def apply_to_points(mapping: Mapping, points: PointsFile, out: "str | Path", inverse: bool = False,
                    target: PointsFile | None = None, lps: bool = False, overwrite: bool = False) -> dict:
    """Carry the points into the other scan (fixed -> moving; with ``inverse``, moving -> fixed), write them to
    ``out`` (same rows and columns, the coordinates replaced; atomically) and, given ``target`` (the points'
    true matches, row for row), each point's error and the summary before and after registration."""
    out = check_out(out, "points", overwrite)
    if points.slicer != out.name.lower().endswith(".fcsv"):
        raise UserError(f"--out {out} must be {'a .fcsv' if points.slicer else 'a .csv'} file like {points.path.name}")
    if target is not None and len(target.points) != len(points.points):
        raise InputError(f"{target.path} holds {len(target.points)} points and {points.path} {len(points.points)}: "
                         f"the target file must list each point's true match in the same row")
    moved = mapping.moving_points_to_fixed(points.points) if inverse else mapping.warp_points(points.points)
    extra = {}
    summary = {"out": str(out), "points": len(moved), "direction": "moving -> fixed" if inverse else "fixed -> moving"}
    if target is not None:
        errors = np.linalg.norm(moved - target.points, axis=1)
        extra = {"error_mm": errors}
        summary.update(error_mm=error_summary(errors),
                       error_before_mm=error_summary(np.linalg.norm(points.points - target.points, axis=1)))
    lps = points.lps if points.slicer else lps
    _atomic(out, lambda tmp: _write_points(points, moved * _LPS if lps else moved, extra, tmp))
    return summary


def error_summary(errors: np.ndarray) -> dict:
    """Mean, standard deviation, median, 95th percentile and largest of per-point distances (mm)."""
    errors = np.asarray(errors, dtype=np.float64)
    return {"mean": round(float(errors.mean()), 3), "std": round(float(errors.std()), 3),
            "median": round(float(np.median(errors)), 3), "p95": round(float(np.percentile(errors, 95)), 3),
            "max": round(float(errors.max()), 3)}


def _write_points(source: PointsFile, points: np.ndarray, extra: dict, path: Path) -> None:
    """The source's rows with the coordinates replaced, in its own format: a CSV gains the ``extra`` columns; a
    Slicer file keeps its header and columns (which Slicer fixes) and carries ``extra`` in its ``desc`` column."""
    lower = {c.strip().lower(): c for c in source.columns}
    columns = source.columns if source.slicer else source.columns + [n for n in extra if n not in source.columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        if source.slicer:
            f.write("".join(line + "\n" for line in source.preamble))
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        if not source.slicer:
            writer.writeheader()
        for i, row in enumerate(source.rows):
            row = dict(row)
            for j, c in enumerate(COORDINATES):
                row[lower[c]] = f"{points[i, j]:.4f}"
            for name, values in extra.items():
                row[name] = f"{values[i]:.4f}"
            if source.slicer and extra and "desc" in lower:
                row[lower["desc"]] = "; ".join(f"{name} {values[i]:.3f}" for name, values in extra.items())
            writer.writerow(row)


# ---------------------------------------------------------------------------------------------- writing
#: What each kind of output is written as.
OUTPUT_SUFFIXES = {"image": NIFTI_SUFFIXES, "points": (".csv", ".fcsv")}


def check_out(out: "str | Path", kind: str, overwrite: bool) -> Path:
    """Refuse a bad output path (``kind`` "image" or "points") before any work."""
    out, suffixes = Path(out), OUTPUT_SUFFIXES[kind]
    if not out.name.lower().endswith(suffixes):
        raise UserError(f"--out {out} must name {'an image' if kind == 'image' else 'a points file'} "
                        f"({' or '.join(suffixes)})")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: its folder {out.parent} does not exist")
    return out


def _atomic(out: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``out`` (same suffix), then rename: no half-written file."""
    suffix = next(s for s in (".nii.gz", ".nii", ".fcsv", ".csv") if out.name.lower().endswith(s))
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=suffix, dir=out.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
