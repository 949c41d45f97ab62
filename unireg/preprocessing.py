"""CT intensity handling shared by training data and inference.

Both paths must see identical intensities, so the HU window lives in one place.
"""
from __future__ import annotations

import numpy as np
import torch

#: HU window mapped to [0, 1]: air .. dense bone.
HU_MIN = -1000.0
HU_MAX = 1000.0
#: Value used outside the field of view (air).
HU_OUTSIDE = -1024.0
#: Range of stored CT (phantoms, prepared scans, shards): int16 HU as scanners write them (12-bit).
HU_STORED_MIN, HU_STORED_MAX = -1024, 3071


def to_stored_hu(hu) -> np.ndarray:
    """Hounsfield units (any float array) -> int16 HU in the stored range, rounded to the nearest unit."""
    return np.clip(np.rint(np.asarray(hu)), HU_STORED_MIN, HU_STORED_MAX).astype(np.int16)


def normalize_ct(hu, hu_min: float = HU_MIN, hu_max: float = HU_MAX):
    """Clamp Hounsfield units to a window and scale to [0, 1] (numpy or torch)."""
    scale = 1.0 / (hu_max - hu_min)
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - hu_min) * scale).clamp_(0.0, 1.0)
    return np.clip((np.asarray(hu, dtype=np.float32) - hu_min) * scale, 0.0, 1.0)
