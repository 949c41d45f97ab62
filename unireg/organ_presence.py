"""Which organs two label maps share: what a pair may be prompted with and scored on.

Shards record it in ``meta.json``, training samples prompts from it (only organs large enough
for a meaningful Dice), evaluation and registration score Dice on it: one definition, so a pair
is judged on the same organs everywhere.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .organs import ORGAN_TO_ID, ORGANS

_MAX_ID = max(ORGAN_TO_ID.values())


def voxel_counts(labels) -> np.ndarray:
    """Voxels per TotalSegmentator id, [0 .. 117]; values outside the vocabulary are not counted."""
    flat = np.asarray(labels).ravel()
    if flat.dtype.kind != "u" or flat.max(initial=0) > _MAX_ID:
        flat = flat[(flat >= 0) & (flat <= _MAX_ID)].astype(np.int64)
    return np.bincount(flat, minlength=_MAX_ID + 1)


def organs_in_both(fixed_labels, moving_labels, min_voxels: int = 1, among: Iterable[str] | None = None) -> list[str]:
    """Organs with at least ``min_voxels`` voxels in each map: in vocabulary order, or restricted to
    ``among`` (unknown names dropped) and in its order."""
    both = np.minimum(voxel_counts(fixed_labels), voxel_counts(moving_labels))
    names = ORGANS if among is None else [o for o in among if o in ORGAN_TO_ID]
    return [o for o in names if both[ORGAN_TO_ID[o]] >= max(1, min_voxels)]


__all__ = ["organs_in_both", "voxel_counts"]
