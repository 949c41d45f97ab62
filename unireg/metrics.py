"""Evaluation metrics: Dice (voxel counts), HD95 (MONAI) and Jacobian statistics of a displacement field."""
from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of a voxel-unit field [B,3,D,H,W] (central differences) -> [B,D,H,W].

    The 3x3 determinant by cofactor expansion over whole volumes: no [..., 3, 3] stack of the field
    and no batched LU (on a 175x126x144 field: 0.61 s with them, 0.22 s in float64, 0.05 s in float32).
    float32 differs from float64 by ~1e-6, so only a voxel with |det J| below that could change sides
    of the folding count.
    """
    j = [[g.float() for g in torch.gradient(displacement[:, c].float(), dim=(1, 2, 3))] for c in range(3)]
    for c in range(3):
        j[c][c] = j[c][c] + 1.0
    det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
           - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
           + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    return det.to(displacement.dtype)


def jacobian_stats(displacement: torch.Tensor) -> dict:
    """% of voxels with det J <= 0 (folding) and the std of log det J (SDlogJ)."""
    det = jacobian_determinant(displacement)
    log_det = torch.log(det.clamp(min=1e-9))
    return {"nonpositive_jacobian_pct": float((det <= 0).float().mean() * 100),
            "sd_log_jacobian": float(log_det.std())}


def organ_dice(labels_a: np.ndarray, labels_b: np.ndarray, label_ids: dict[str, int]) -> dict[str, float]:
    """Dice per named organ between two label maps on one grid (organs absent from both are left out).

    One pass over the voxels whatever the number of organs: per slab, one integer histogram of the
    pairs (id in a, id in b), whose row sums, column sums and diagonal are each map's sizes and
    their overlaps (a full-size CT's 100+ labels once took a pass each; three histograms per slab
    then took 4.3 s of a 512x512x400 pair's Dice before and after, this 2.0 s). Ids outside
    [0, max id asked] are not counted.
    """
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    ids = {name: int(idx) for name, idx in label_ids.items() if int(idx) >= 0}
    if not ids:
        return {}
    n = max(ids.values()) + 1
    size_a, size_b, inter = _pair_counts(a, b, n)
    return {name: 2.0 * int(inter[idx]) / int(size_a[idx] + size_b[idx])
            for name, idx in ids.items() if size_a[idx] + size_b[idx]}


#: Largest id range counted by one joint histogram of (id in a, id in b); beyond it, three histograms.
_JOINT_IDS = 2048


def _pair_counts(a: np.ndarray, b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels of each id in [0, n) in ``a``, in ``b``, and where both have it, one slab at a time."""
    if a.flags.f_contiguous or b.flags.f_contiguous:
        # NIfTI data: slabs of the transposes are views. A map in the other order is copied once, which
        # costs less than reading it across its layout (a 512x512x400 Dice: 1.6 s read across, 1.2 s copied).
        a, b = np.asfortranarray(a).T, np.asfortranarray(b).T
    if n > _JOINT_IDS:
        return _pair_counts_apart(a, b, n)
    m = n + 1                                          # bin n holds every id outside [0, n)
    joint = np.zeros(m * m, np.int64)
    for k in range(0, a.shape[0], 32):
        code = _bins(a[k:k + 32].ravel(), n) * m
        code += _bins(b[k:k + 32].ravel(), n)
        joint += np.bincount(code, minlength=m * m)
    joint = joint.reshape(m, m)
    return joint.sum(1)[:n], joint.sum(0)[:n], np.diagonal(joint)[:n]


def _bins(values: np.ndarray, n: int) -> np.ndarray:
    """Ids as int64 histogram bins, those outside [0, n) all in bin n."""
    out = values.astype(np.int64)
    info = np.iinfo(values.dtype) if np.issubdtype(values.dtype, np.integer) else None
    if info is None or info.max >= n:      # ids at or beyond n can occur
        np.minimum(out, n, out=out)
    if info is None or info.min < 0:       # so can negative ones
        out[out < 0] = n
    return out


def _pair_counts_apart(a: np.ndarray, b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    size_a, size_b, inter = (np.zeros(n, np.int64) for _ in range(3))

    def count(values):
        values = values[(values >= 0) & (values < n)].astype(np.int64, copy=False)
        return np.bincount(values, minlength=n)

    for k in range(0, a.shape[0], 32):
        sa, sb = a[k:k + 32].ravel(), b[k:k + 32].ravel()
        size_a += count(sa)
        size_b += count(sb)
        inter += count(sa[sa == sb])
    return size_a, size_b, inter


def organ_hd95(labels_a: np.ndarray, labels_b: np.ndarray, label_ids: dict[str, int],
               spacing: tuple[float, float, float]) -> dict[str, float]:
    """95th-percentile Hausdorff distance in mm per organ present in both maps."""
    a, b = torch.as_tensor(np.asarray(labels_a)), torch.as_tensor(np.asarray(labels_b))
    out = {}
    for name, idx in label_ids.items():
        ma, mb = (a == idx), (b == idx)
        if not ma.any() or not mb.any():
            continue
        hd = compute_hausdorff_distance(ma[None, None].float(), mb[None, None].float(), percentile=95,
                                        spacing=list(spacing))
        out[name] = float(hd[0, 0])
    return out


def label_names(*label_maps: np.ndarray) -> dict[str, int]:
    """Organ name -> id for every non-zero id in the maps (unknown ids as ``label_<id>``)."""
    from .organs import ID_TO_ORGAN
    from .io import label_ids
    ids = sorted(set().union(*[set(label_ids(m).tolist()) for m in label_maps]) - {0})
    return {ID_TO_ORGAN.get(int(i), f"label_{int(i)}"): int(i) for i in ids}


def dice_before_after(fixed: np.ndarray, before: np.ndarray, after: np.ndarray,
                      organs: "tuple[str, ...] | list[str]" = ()) -> dict:
    """Dice per organ without and with registration; organs with no Dice are listed with the reason.

    ``organs`` restricts the report to the prompted structures; by default every label of the
    fixed map counts. Means are ``None`` when no organ could be scored (JSON-safe, never NaN).
    """
    from .organs import ORGAN_TO_ID
    from .io import label_ids
    present_fixed = set(label_ids(fixed).tolist())
    present_moving = set(label_ids(before).tolist())
    names = label_names(fixed) if not organs else {o: ORGAN_TO_ID[o] for o in organs}
    missing = {}
    for name, idx in list(names.items()):
        if idx not in present_fixed or idx not in present_moving:
            where = " and ".join(n for n, s in (("fixed", present_fixed), ("moving", present_moving)) if idx not in s)
            missing[name] = f"absent from the {where} labels"
            del names[name]
    dice_b, dice_a = organ_dice(fixed, before, names), organ_dice(fixed, after, names)
    mean = lambda d: float(np.mean(list(d.values()))) if d else None  # noqa: E731
    out = {"dice_before": dice_b, "dice_after": dice_a, "mean_dice_before": mean(dice_b),
           "mean_dice_after": mean(dice_a)}
    if missing:
        out["dice_missing"] = missing
    return out
