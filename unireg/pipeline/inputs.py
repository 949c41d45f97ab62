"""Stage 1: load and check a pair of scans (and their optional label maps).

Anything a user can get wrong about the inputs - missing files, 2-D images, NaNs, label maps
on another grid, scans whose headers place them apart - is caught here, once, with a message
naming the input, before any computation starts.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ..io import InputError, fields_of_view_overlap, label_ids, load_image, load_labels
from ..organs import ID_TO_ORGAN


@dataclass
class ScanPair:
    fixed: nib.Nifti1Image
    moving: nib.Nifti1Image
    fixed_labels: nib.Nifti1Image | None = None
    moving_labels: nib.Nifti1Image | None = None
    fixed_mask: nib.Nifti1Image | None = None      # uint8 0/1: where the similarity may look (ANTs' -x masks)
    moving_mask: nib.Nifti1Image | None = None


def load_pair(fixed, moving, fixed_labels=None, moving_labels=None, fixed_affine=None,
              moving_affine=None, fixed_mask=None, moving_mask=None) -> ScanPair:
    """Paths / nibabel images / (array, affine) / arrays -> a checked :class:`ScanPair`."""
    fixed_img = load_image(fixed, "fixed image", fixed_affine)
    moving_img = load_image(moving, "moving image", moving_affine)
    pair = ScanPair(fixed_img, moving_img,
                    load_labels(fixed_labels, fixed_img, "fixed labels") if fixed_labels is not None else None,
                    load_labels(moving_labels, moving_img, "moving labels") if moving_labels is not None else None,
                    _load_mask(fixed_mask, fixed_img, "fixed mask"), _load_mask(moving_mask, moving_img, "moving mask"))
    if not fields_of_view_overlap(fixed_img, moving_img):
        raise InputError("fixed and moving images do not overlap in physical space; their affines cannot be "
                         "related (check origins and orientation in the headers)")
    for name, labels in (("fixed labels", pair.fixed_labels), ("moving labels", pair.moving_labels)):
        if labels is not None:
            _warn_unknown_ids(np.asanyarray(labels.dataobj), name)
    return pair


def _load_mask(source, image: nib.Nifti1Image, name: str) -> nib.Nifti1Image | None:
    """A mask on its scan's grid: any non-zero voxel is inside. One with no voxel inside is refused."""
    if source is None:
        return None
    mask = load_labels(source, image, name)
    inside = np.asanyarray(mask.dataobj) != 0
    if not inside.any():
        raise InputError(f"{name} has no voxel inside (every voxel is 0): the similarity would have nothing to "
                         f"measure; a mask marks with non-zero values where the scans should be compared")
    return nib.Nifti1Image(inside.astype(np.uint8), mask.affine)


def _warn_unknown_ids(labels: np.ndarray, name: str) -> None:
    ids = label_ids(labels)
    unknown = [int(i) for i in ids if i != 0 and int(i) not in ID_TO_ORGAN]
    if unknown:
        warnings.warn(f"{name}: ids {unknown[:8]} are not TotalSegmentator class ids (1-{max(ID_TO_ORGAN)}); "
                      f"they are warped but get no organ name and no Dice", stacklevel=3)
