"""Shipped example pairs: small phantom torsos generated on first use into a cache folder.

Nothing large is committed: ``data_tools.phantom`` renders a subject in about a second at the
default 64^3 / 6 mm, and the files are kept under the cache folder for the next session. The
subject seeds start far from the ones the shipped model was trained on (0..23, 100000..), so the
examples are unseen subjects.
"""
from __future__ import annotations

import os
from pathlib import Path

FIRST_SEED = 7000
DEFAULT_SHAPE = (64, 64, 64)
DEFAULT_SPACING = (6.0, 6.0, 6.0)


def cache_dir() -> Path:
    """``$UNIREG_CACHE`` or ``~/.cache/unireg``, + ``examples``."""
    root = os.environ.get("UNIREG_CACHE") or Path.home() / ".cache" / "unireg"
    return Path(root) / "examples"


def subject_files(index: int, folder: "str | Path | None" = None, shape=DEFAULT_SHAPE,
                  spacing=DEFAULT_SPACING) -> dict[str, Path]:
    """CT and label map of example subject ``index`` (rendered once, then read from the cache)."""
    from data_tools.phantom import make_subject, save_subject
    folder = Path(folder) if folder is not None else cache_dir()
    name = f"subject{index:02d}_{'x'.join(map(str, shape))}_{spacing[0]:g}mm"
    ct, labels = folder / f"{name}_ct.nii.gz", folder / f"{name}_labels.nii.gz"
    if not (ct.is_file() and labels.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        subject = make_subject(FIRST_SEED + index, shape=shape, spacing_mm=spacing)
        paths = save_subject(subject, folder, f"{name}.tmp{os.getpid()}", montage=False)
        paths["labels"].replace(labels)  # labels first: a complete CT then implies complete labels
        paths["ct"].replace(ct)
        paths["json"].unlink(missing_ok=True)
    return {"ct": ct, "labels": labels}


def example_pair(index: int = 0, folder=None, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> dict[str, str]:
    """Inter-subject pair ``index``: subject 2i is fixed, subject 2i+1 moving (paths as strings)."""
    fixed = subject_files(2 * index, folder, shape, spacing)
    moving = subject_files(2 * index + 1, folder, shape, spacing)
    return {"fixed": str(fixed["ct"]), "moving": str(moving["ct"]), "fixed_labels": str(fixed["labels"]),
            "moving_labels": str(moving["labels"])}


def intra_example_pair(index: int = 0, folder=None, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> dict[str, str]:
    """Intra-subject pair ``index``: a subject and another breathing phase of it."""
    from data_tools.phantom import make_intra_pair, make_subject, save_subject
    folder = Path(folder) if folder is not None else cache_dir()
    name = f"breathing{index:02d}_{'x'.join(map(str, shape))}_{spacing[0]:g}mm"
    files = {k: folder / f"{name}_{k}.nii.gz" for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
    if not all(p.is_file() for p in files.values()):
        folder.mkdir(parents=True, exist_ok=True)
        subject = make_subject(FIRST_SEED + 500 + index, shape=shape, spacing_mm=spacing)
        moving, _ = make_intra_pair(subject, FIRST_SEED + 900 + index)
        for role, sub in (("fixed", subject), ("moving", moving)):
            paths = save_subject(sub, folder, f"{name}.tmp{os.getpid()}_{role}", montage=False)
            paths["labels"].replace(files[f"{role}_labels"])
            paths["ct"].replace(files[role])
            paths["json"].unlink(missing_ok=True)
    return {k: str(v) for k, v in files.items()}


def example_pairs(n: int, start: int = 0, folder=None, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> list[dict]:
    """``n`` disjoint example pairs (no subject shared between pairs)."""
    return [example_pair(start + i, folder, shape, spacing) for i in range(n)]


def write_pairs_csv(pairs: list[dict], path: "str | Path") -> Path:
    """A ``unireg adapt --pairs`` CSV listing ``pairs``."""
    import csv
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["fixed", "moving", "fixed_labels", "moving_labels"])
        writer.writeheader()
        writer.writerows(pairs)
    return path
