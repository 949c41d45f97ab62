"""Real data sets -> prepared subjects and a pair list.

Layouts: TotalSegmentator (``<id>/ct.nii.gz`` + ``<id>/segmentations/<class>.nii.gz``),
Learn2Reg (``imagesTr/``, ``labelsTr/`` and the task's ``*.json`` with its label names and
registration pairs) and a CSV (``image,label,subject[,session]``). Every scan is reoriented to
RAS, resampled to the target spacing, cropped to the body (grown to a multiple of 16 voxels, the
working-grid rule of :mod:`unireg.preprocessing`) and stored as int16 HU / uint8
TotalSegmentator ids under ``<out>/subjects/`` with names made of the subject and session ids
reduced to safe characters (an id such as ``../x`` or ``/abs`` never writes outside ``--out``).
``pairs.json`` lists the scans and the pairs (intra-subject: scans of one subject; inter-subject:
subjects of one split), with paths relative to its own folder; a preparation that yields no
pair is an error, and skipped scans are logged, counted and listed with their reason. Label maps on another grid than their CT are resampled onto it (nearest)
and the fact is logged and recorded in the subject's ``notes``; a missing label file is never
silently treated as background: the class is recorded as missing (TotalSegmentator) or the
scan is refused with an error naming the file (Learn2Reg, CSV).
"""
from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to, resample_to_output

from unireg.errors import UserError
from unireg.organs import ORGAN_TO_ID, resolve_organ
from unireg.preprocessing import HU_OUTSIDE, to_stored_hu

logger = logging.getLogger(__name__)

#: Prepared scans are cropped to a multiple of this many voxels along each axis: the coarsest level
#: stride of every preset (``UniRegConfig.size_divisor``), so the working-grid rule keeps them as they are.
GRID_DIVISOR = 16


class PreparationError(UserError):
    """A scan or label file cannot be prepared; the message names the file."""


@dataclass
class Scan:
    subject: str
    session: str
    image: Path
    labels: dict = field(default_factory=dict)      # TotalSegmentator name -> mask file, or {"__map__": path}
    label_names: dict = field(default_factory=dict)  # for label maps: value -> TotalSegmentator name


# ----------------------------------------------------------------------------------- layouts
def scan_totalsegmentator(root: Path) -> list[Scan]:
    scans = []
    for ct in sorted(root.glob("*/ct.nii.gz")):
        seg_dir = ct.parent / "segmentations"
        labels = {p.name[: -len(".nii.gz")]: p for p in sorted(seg_dir.glob("*.nii.gz"))} if seg_dir.is_dir() else {}
        unknown = [n for n in labels if n not in ORGAN_TO_ID]
        for n in unknown:
            logger.warning("%s: %s is not a TotalSegmentator class; ignored", ct.parent.name, n)
            labels.pop(n)
        scans.append(Scan(subject=ct.parent.name, session="0", image=ct, labels=labels))
    if not scans:
        raise PreparationError(f"no <id>/ct.nii.gz found under {root} (TotalSegmentator layout)")
    # A class that other subjects have but this one lacks is recorded as missing, not as background.
    expected = set().union(*[s.labels for s in scans])
    for scan in scans:
        for name in expected - set(scan.labels):
            scan.labels[name] = scan.image.parent / "segmentations" / f"{name}.nii.gz"
    return scans


def scan_learn2reg(root: Path) -> tuple[list[Scan], list[tuple[str, str]]]:
    tasks = sorted(root.glob("*.json"))
    if not tasks:
        raise PreparationError(f"no task JSON in {root} (Learn2Reg layout)")
    task = json.loads(tasks[0].read_text())
    names = {}
    for value, name in (task.get("labels") or {}).items():
        if int(value) == 0:
            continue
        resolved = resolve_organ(str(name))
        if not resolved or len(resolved) != 1:
            raise PreparationError(f"{tasks[0]}: label {value} {name!r} is not a TotalSegmentator class")
        names[int(value)] = resolved[0]
    scans = {}
    for entry in task.get("training", []):
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else root / "labelsTr" / image.name
        stem = image.name.replace(".nii.gz", "")
        subject, _, session = stem.rpartition("_")
        scans[image.name] = Scan(subject=subject or stem, session=session, image=image,
                                 labels={"__map__": label}, label_names=names)
    pairs = [(Path(p["fixed"]).name, Path(p["moving"]).name) for p in task.get("registration_val", []) +
             task.get("training_paired_images", [])]
    return list(scans.values()), pairs


def scan_csv(path: Path) -> list[Scan]:
    if not path.is_file():
        raise PreparationError(f"{path} is not a CSV file (csv layout: a table with columns image, label, subject[, session])")
    scans = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if "image" not in row or "subject" not in row:
                raise PreparationError(f"{path}: needs columns image, label, subject[, session]")
            image = (path.parent / row["image"]).resolve()
            labels = {"__map__": (path.parent / row["label"]).resolve()} if row.get("label") else {}
            scans.append(Scan(subject=row["subject"], session=row.get("session") or "0", image=image, labels=labels,
                              label_names={i: n for n, i in ORGAN_TO_ID.items()}))
    if not scans:
        raise PreparationError(f"{path} lists no scans")
    return scans


# ---------------------------------------------------------------------------------- preparing
def _load(path: Path, what: str) -> nib.Nifti1Image:
    if not path.is_file():
        raise PreparationError(f"{what} not found: {path}")
    try:
        img = nib.load(str(path))
        return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    except Exception as exc:
        raise PreparationError(f"{what} {path} is not a readable NIfTI ({exc})") from None


def _on_grid(label: nib.Nifti1Image, ct: nib.Nifti1Image, path: Path, notes: list) -> np.ndarray:
    if label.shape[:3] == ct.shape[:3] and np.allclose(label.affine, ct.affine, atol=1e-3):
        return np.asanyarray(label.dataobj)
    note = f"{path.name} was on another grid than its CT and was resampled onto it (nearest neighbour)"
    logger.warning(note)
    notes.append(note)
    return np.asanyarray(resample_from_to(label, ct, order=0).dataobj)


def label_map(scan: Scan, ct: nib.Nifti1Image, notes: list, missing: list) -> np.ndarray:
    out = np.zeros(ct.shape[:3], np.uint8)
    if "__map__" in scan.labels:
        path = scan.labels["__map__"]
        data = _on_grid(_load(path, f"label map of {scan.subject}"), ct, path, notes).astype(np.int64)
        for value in np.unique(data):
            if value == 0:
                continue
            if value not in scan.label_names:
                raise PreparationError(f"{path}: label value {value} has no name in the task description")
            out[data == value] = ORGAN_TO_ID[scan.label_names[value]]
        return out
    for name in ORGAN_TO_ID:
        path = scan.labels.get(name)
        if path is None:
            continue
        if not path.is_file():
            logger.warning("%s: label file %s is missing; %s is recorded as missing, not background",
                           scan.subject, path, name)
            missing.append(name)
            continue
        mask = _on_grid(_load(path, f"{name} mask"), ct, path, notes) > 0
        out[mask & (out == 0)] = ORGAN_TO_ID[name]
    return out


def prepare_scan(scan: Scan, spacing, margin_mm: float = 10.0,
                 divisor: int = GRID_DIVISOR) -> tuple[nib.Nifti1Image, nib.Nifti1Image, dict]:
    """RAS, ``spacing``, cropped to the body plus ``margin_mm``; the crop then grows (air beyond the
    scan) to a multiple of ``divisor`` voxels, centred, which is the working-grid rule of
    :mod:`unireg.preprocessing`: at a model's working spacing the scan is its working grid as stored."""
    ct = _load(scan.image, f"CT of {scan.subject}")
    if ct.ndim != 3:
        raise PreparationError(f"{scan.image} is {ct.ndim}-D; expected a 3-D CT")
    notes, missing = [], []
    labels = nib.Nifti1Image(label_map(scan, ct, notes, missing), ct.affine)
    ct, labels = nib.as_closest_canonical(ct), nib.as_closest_canonical(labels)
    ct = resample_to_output(ct, voxel_sizes=spacing, order=1, cval=-1024)
    labels = resample_from_to(labels, ct, order=0)
    hu = np.asanyarray(ct.dataobj)
    body = np.argwhere(hu > -500)
    if body.size == 0:
        raise PreparationError(f"{scan.image}: no voxel above -500 HU; is it a CT in Hounsfield units?")
    pad = np.ceil(margin_mm / np.array(spacing)).astype(int)
    lo = np.maximum(body.min(0) - pad, 0)
    hi = np.minimum(body.max(0) + pad + 1, hu.shape)
    extra = -(hi - lo) % divisor
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    inside = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, hu.shape))
    outside = [(max(0, -a), max(0, b - n)) for a, b, n in zip(lo, hi, hu.shape)]
    affine = ct.affine.copy()
    affine[:3, 3] = (ct.affine @ np.append(lo, 1))[:3]
    ct_out = nib.Nifti1Image(to_stored_hu(np.pad(hu[inside], outside, constant_values=HU_OUTSIDE)), affine)
    lab_out = nib.Nifti1Image(np.pad(np.asanyarray(labels.dataobj)[inside], outside).astype(np.uint8), affine)
    return ct_out, lab_out, {"notes": notes, "missing_labels": missing}


def split_subjects(subjects: list[str], fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, str]:
    order = sorted(subjects)
    np.random.default_rng(seed).shuffle(order)
    n = len(order)
    n_val = max(1, int(round(fractions[1] * n))) if n >= 3 else 0
    n_test = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
    return {s: "val" if i < n_val else "test" if i < n_val + n_test else "train" for i, s in enumerate(order)}


def safe_name(text: str, what: str = "id") -> str:
    """An id reduced to letters, digits, ``.``, ``_`` and ``-``: usable as one file name, never a path."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    if not name:
        raise PreparationError(f"{what} {text!r} has no usable characters for a file name")
    return name


def make_pairs(scans: dict[str, dict], splits: dict[str, str], seed: int = 0, max_inter_per_subject: int = 4,
               declared: list[tuple[str, str]] | None = None, source: str = "") -> list[dict]:
    """Pair entries of ``pairs.json``: the declared (fixed, moving) scan names, else every ordered pair of
    one subject's scans (intra) and up to ``max_inter_per_subject`` scans of other subjects of the same
    split (inter). Pairs never cross splits. ``scans`` maps names to {subject, image, labels, ...}."""
    rng = np.random.default_rng(seed)
    keys = list(scans)
    if declared:
        candidates = [(f, m) for f, m in declared if f in scans and m in scans]
    else:
        candidates = [(a, b) for a in keys for b in keys if a != b and scans[a]["subject"] == scans[b]["subject"]]
        for a in keys:
            others = [b for b in keys if scans[b]["subject"] != scans[a]["subject"]
                      and splits[scans[b]["subject"]] == splits[scans[a]["subject"]]]
            for b in rng.permutation(others)[:max_inter_per_subject] if others else []:
                candidates.append((a, str(b)))
    pairs = []
    for f, m in candidates:
        pf, pm = scans[f], scans[m]
        if splits[pf["subject"]] != splits[pm["subject"]]:
            continue  # never mix subjects across splits
        pairs.append({"fixed": pf["image"], "moving": pm["image"], "fixed_labels": pf["labels"],
                      "moving_labels": pm["labels"], "type": "intra" if pf["subject"] == pm["subject"] else "inter",
                      "split": splits[pf["subject"]], "fixed_id": f, "moving_id": m, "source": source})
    return pairs


def no_pairs_message(n_scans: int, n_subjects: int, skipped: list[dict]) -> str:
    why = f"; skipped {len(skipped)} scan(s), e.g. {skipped[0]['scan']}: {skipped[0]['reason']}" if skipped else ""
    return (f"no registration pairs: {n_scans} scan(s) of {n_subjects} subject(s) prepared{why}. A pair needs two "
            "scans of one subject, or two subjects in one split (splits take 80/10/10 % of at least 3 subjects)")


def write_pairs_json(out: Path, result: dict) -> Path:
    """``pairs.json`` written whole or not at all (temporary name, then renamed)."""
    path = out / "pairs.json"
    tmp = path.with_name(".pairs.json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return path


def prepare_dataset(layout: str, root: "str | Path", out_dir: "str | Path", spacing=(2.0, 2.0, 2.0),
                    seed: int = 0, max_inter_per_subject: int = 4) -> dict:
    """Prepare every scan and write ``pairs.json`` (paths relative to it); returns its content.

    Raises PreparationError for a missing root, no scans, or no pairs; a scan that cannot be read is
    skipped, logged and listed under ``skipped`` with its reason."""
    root, out = Path(root), Path(out_dir)
    if not root.exists():
        raise PreparationError(f"{root} not found")
    declared_pairs = []
    if layout == "totalsegmentator":
        scans = scan_totalsegmentator(root)
    elif layout == "learn2reg":
        scans, declared_pairs = scan_learn2reg(root)
    elif layout == "csv":
        scans = scan_csv(root)
    else:
        raise PreparationError(f"unknown layout {layout!r}; use totalsegmentator, learn2reg or csv")
    if not scans:
        raise PreparationError(f"no scans found in {root} ({layout} layout)")
    names = {}
    for scan in scans:
        name = f"{safe_name(scan.subject, 'subject id')}_{safe_name(scan.session, 'session id')}"
        if name in names.values():
            raise PreparationError(f"two scans get the file name {name!r} (subject {scan.subject!r}, session "
                                   f"{scan.session!r}); give each scan its own subject/session")
        names[id(scan)] = name
    (out / "subjects").mkdir(parents=True, exist_ok=True)
    prepared, skipped = {}, []
    for scan in scans:
        name = names[id(scan)]
        try:
            ct, labels, info = prepare_scan(scan, spacing)
        except PreparationError as exc:
            logger.warning("skipped %s: %s", name, exc)
            skipped.append({"scan": name, "reason": str(exc)})
            continue
        paths = {"image": Path("subjects") / f"{name}_ct.nii.gz", "labels": Path("subjects") / f"{name}_labels.nii.gz"}
        nib.save(ct, str(out / paths["image"]))
        nib.save(labels, str(out / paths["labels"]))
        prepared[scan.image.name if layout == "learn2reg" else name] = {
            "subject": scan.subject, "session": scan.session, **{k: str(v) for k, v in paths.items()}, **info}
    subjects = sorted({p["subject"] for p in prepared.values()})
    logger.info("prepared %d of %d scans (%d subjects), skipped %d", len(prepared), len(scans), len(subjects),
                len(skipped))
    splits = split_subjects(subjects, seed=seed)
    pairs = make_pairs(prepared, splits, seed, max_inter_per_subject, declared_pairs, source=layout)
    if not pairs:
        raise PreparationError(no_pairs_message(len(prepared), len(subjects), skipped))
    result = {"layout": layout, "spacing": list(spacing), "scans": prepared, "skipped": skipped, "pairs": pairs,
              "splits": splits}
    write_pairs_json(out, result)
    return result
