"""Scores of one registration, all from one convention: a mm RAS field on the fixed grid.

Every method's output is first turned into ``u`` [X, Y, Z, 3] with ``phi(x) = x + u(x)``, the
fixed -> moving mapping in world RAS mm (as ``RegistrationResult.displacement``). From it:
TRE at the evaluation points against the true mapping, Dice and HD95 of the moving labels
carried onto the fixed grid, and the share of folded voxels (det of d phi / d x <= 0).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from known_deformation import grid_points, sample
from unireg.metrics import organ_dice, organ_hd95


def mapped_points(field_mm: np.ndarray, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """phi(points) = points + u(points), u interpolated linearly on the fixed grid."""
    inv = np.linalg.inv(affine)
    ijk = (points @ inv[:3, :3].T + inv[:3, 3]).T
    u = np.stack([ndimage.map_coordinates(field_mm[..., c], ijk, order=1, mode="nearest") for c in range(3)], axis=1)
    return points + u


def tre_stats(estimated: np.ndarray, true: np.ndarray) -> dict:
    """Median, 95th percentile and mean of the point-wise distance (mm)."""
    err = np.linalg.norm(np.asarray(estimated) - np.asarray(true), axis=1)
    return {"tre_median": float(np.median(err)), "tre_p95": float(np.percentile(err, 95)),
            "tre_mean": float(err.mean())}


def folding_pct(field_mm: np.ndarray, affine: np.ndarray) -> float:
    """% of fixed-grid voxels where det(I + du/dx) <= 0 (du/dx in mm/mm through the affine)."""
    to_ijk = np.linalg.inv(affine[:3, :3])               # d(ijk)/dx
    grads = np.stack([np.stack(np.gradient(field_mm[..., c].astype(np.float32)), axis=-1)
                      for c in range(3)], axis=-2)       # [X,Y,Z, component, d/d(ijk)]
    jac = grads @ to_ijk.astype(np.float32) + np.eye(3, dtype=np.float32)
    return float((np.linalg.det(jac) <= 0).mean() * 100)


def warp_labels(moving_labels: np.ndarray, moving_affine: np.ndarray, field_mm: np.ndarray,
                fixed_affine: np.ndarray) -> np.ndarray:
    """moving_labels(phi(x)) on the fixed grid (nearest neighbour, 0 outside)."""
    shape = field_mm.shape[:3]
    points = grid_points(shape, fixed_affine) + field_mm.reshape(-1, 3)
    return sample(moving_labels.astype(np.float32), moving_affine, points, 0, 0).astype(moving_labels.dtype).reshape(shape)


def label_scores(fixed_labels: np.ndarray, warped_labels: np.ndarray, spacing) -> dict:
    """Mean Dice and mean HD95 (mm) over the labels present in the fixed map.

    Each label is scored on the bounding box of both its masks (+2 voxels): the same numbers
    as on the whole grid (both surfaces lie inside it), many times faster for small structures.
    """
    dice, hd95 = {}, {}
    spacing = tuple(float(s) for s in spacing)
    for i in np.unique(fixed_labels):
        if not i:
            continue
        both = (fixed_labels == i) | (warped_labels == i)
        box = tuple(slice(max(int(idx.min()) - 2, 0), int(idx.max()) + 3) for idx in np.nonzero(both))
        a, b = fixed_labels[box], warped_labels[box]
        ids = {"label": int(i)}
        dice.update({int(i): organ_dice(a, b, ids)["label"]})
        hd95.update({int(i): v for v in organ_hd95(a, b, ids, spacing).values()})
    mean = lambda d: float(np.mean(list(d.values()))) if d else float("nan")  # noqa: E731
    return {"dice": mean(dice), "hd95": mean(hd95)}
