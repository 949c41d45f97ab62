"""Real CT scans for the benchmark, found offline in a package registry.

Source: the source distribution of **TotalSegmentator 2.18.0** on PyPI
(``pip download --no-deps --no-binary :all: totalsegmentator==2.18.0``, 38 MB), which ships its
test scans under ``tests/reference_files``. Licence: the package is Apache-2.0 (its LICENSE
file covers the distribution; no separate licence is stated for the test scans). Its public
training data set (Zenodo 10.5281/zenodo.6802613) is CC BY 4.0; cite Wasserthal et al.,
"TotalSegmentator", Radiology: Artificial Intelligence 2023. Nothing is redistributed here:
the archive is downloaded with pip into a cache folder and the scans are read from it.

Scans used (both real, anonymised patient CTs):

* ``chest``: contrast-enhanced chest CT, 233 x 167 x 191 voxels at 1.5 mm isotropic
  (``aorta_report/example_ct.nii.gz``); labels: heart (TotalSegmentator's prediction on it,
  ``pulmonary_report/models/heart.nii.gz``) and aorta (``aorta_report/test_result/models/aorta.nii.gz``,
  on a cropped grid of the same frame), under the organ vocabulary's ids (``unireg.organs``) so that
  prompts and ``focus=True`` find them.
* ``abdomen``: abdomen-pelvis CT, 122 x 101 x 112 voxels at 3 mm (``example_ct.nii.gz``) with
  TotalSegmentator's 61-structure segmentation of it (``example_seg_fast_force_split.nii.gz``).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to, resample_to_output

from unireg.organs import ORGAN_TO_ID

PACKAGE, VERSION = "totalsegmentator", "2.18.0"
_REF = f"{PACKAGE}-{VERSION}/tests/reference_files/"
SCANS = {
    "chest": {"ct": "aorta_report/example_ct.nii.gz",
              "labels": [("pulmonary_report/models/heart.nii.gz", ORGAN_TO_ID["heart"]),
                         ("aorta_report/test_result/models/aorta.nii.gz", ORGAN_TO_ID["aorta"])]},
    "abdomen": {"ct": "example_ct.nii.gz", "labels": [("example_seg_fast_force_split.nii.gz", None)]},
}


def cache_dir() -> Path:
    """``$UNIREG_BENCH_CACHE`` or ``~/.cache/unireg-bench``."""
    return Path(os.environ.get("UNIREG_BENCH_CACHE", Path.home() / ".cache" / "unireg-bench"))


def fetch(cache: Path | None = None) -> Path:
    """Download (once) the TotalSegmentator sdist with pip and extract its reference scans; returns their folder."""
    cache = Path(cache or cache_dir())
    folder = cache / _REF
    if all((folder / spec["ct"]).is_file() for spec in SCANS.values()):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"{PACKAGE}-{VERSION}.tar.gz"
    if not archive.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"{PACKAGE}=={VERSION}", "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not archive.is_file():
            raise RuntimeError(f"could not download the {PACKAGE} {VERSION} source distribution with pip "
                               f"(needs the package index): {done.stderr.strip()[-300:]}")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(_REF) and m.name.endswith(".nii.gz")]
        tar.extractall(cache, members=members, filter="data")
    return folder


@functools.lru_cache(maxsize=4)        # several seeds of a case start from the same scan; callers never modify it
def load_scan(name: str, spacing_mm: float | None = None, cache: Path | None = None):
    """A real CT (RAS, at ``spacing_mm`` isotropic or its native spacing) and its label map."""
    if name not in SCANS:
        raise ValueError(f"unknown real scan {name!r}; choose from {sorted(SCANS)}")
    folder = fetch(cache)
    spec = SCANS[name]
    ct = nib.as_closest_canonical(nib.load(str(folder / spec["ct"])))
    ct = nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), ct.affine)
    labels = np.zeros(ct.shape, np.uint8)
    for path, value in spec["labels"]:
        lab = resample_from_to(nib.load(str(folder / path)), ct, order=0)
        data = np.asanyarray(lab.dataobj).astype(np.uint8)
        labels = np.where(data > 0, data if value is None else value, labels).astype(np.uint8)
    if spacing_mm is not None:
        native = ct
        ct = resample_to_output(native, [spacing_mm] * 3, order=1, cval=-1024)
        ct = nib.Nifti1Image(np.rint(np.asanyarray(ct.dataobj)).astype(np.int16), ct.affine)
        labels = np.asanyarray(resample_from_to(nib.Nifti1Image(labels, native.affine), ct, order=0).dataobj)
    return ct, labels
