"""Pairs whose organs move differently: a few organs each slide by an offset of their own.

Breathing and inter-subject phantom pairs are deformed by one smooth field, so one field pleases
every organ at once and a prompt has nothing to choose between: trained on them, a model learns
to ignore the organ it is told (measured: prompt specificity +0.000, the field moved by < 0.04
voxel when the prompt changed). Here the moving scan is the fixed one with two to four soft-tissue
organs lifted out and put back shifted by independent offsets (as bowel filling, bladder filling
or posture slide organs against their neighbours). Close organs moving apart cannot both be
matched by one smooth field: the whole-body prompt has to compromise, a prompt naming one of them
does not.
"""
from __future__ import annotations

import numpy as np

from unireg.organs import ORGAN_TO_ID
from unireg.preprocessing import to_stored_hu

from .phantom import Subject, make_subject, subject_seed

#: Organs that slide against their neighbours (no bones: they move with the skeleton).
SLIDING = ("liver", "spleen", "stomach", "kidney_left", "kidney_right", "gallbladder", "pancreas", "duodenum",
           "small_bowel", "colon", "urinary_bladder", "heart", "esophagus", "adrenal_gland_left",
           "adrenal_gland_right", "aorta", "inferior_vena_cava")
FAT_HU = -100.0


def organ_motion_pair(subject: Subject, seed: int, n_organs=(2, 4), shift_mm=(6.0, 15.0),
                      min_voxels: int = 100) -> tuple[dict, np.ndarray]:
    """(moving scan as {"image", "labels"}, displacement) for one subject.

    ``displacement`` is in voxels, (dz, dy, dx) per voxel of the fixed grid, ``fixed(x) =
    moving(x + d(x))``: each moved organ's offset on that organ, zero elsewhere."""
    rng = np.random.default_rng(seed)
    labels, image = subject.labels, subject.image
    counts = np.bincount(labels.ravel(), minlength=256)
    candidates = [o for o in SLIDING if counts[ORGAN_TO_ID[o]] >= min_voxels]
    if len(candidates) < 2:
        raise ValueError("organ motion needs at least two sliding organs in the subject")
    chosen = rng.choice(candidates, size=min(len(candidates), int(rng.integers(n_organs[0], n_organs[1] + 1))),
                        replace=False)
    spacing = np.asarray(subject.spacing, float)
    moving_img = image.astype(np.float32).copy()
    moving_lab = labels.copy()
    displacement = np.zeros((3, *labels.shape), np.float32)
    masks = {o: labels == ORGAN_TO_ID[o] for o in chosen}
    for o in chosen:                                       # lift every chosen organ out first
        moving_img[masks[o]] = FAT_HU + rng.normal(0.0, 10.0, int(masks[o].sum()))
        moving_lab[masks[o]] = 0
    for o in chosen:                                       # then put each back at its own offset
        direction = rng.normal(size=3)
        shift = np.round(direction / np.linalg.norm(direction) * rng.uniform(*shift_mm) / spacing).astype(int)
        if not shift.any():
            shift[int(np.argmax(np.abs(direction)))] = 1
        src, dst = _shifted_slices(labels.shape, shift)
        pasted = np.zeros_like(masks[o])
        pasted[dst] = masks[o][src]
        moving_img[dst][masks[o][src]] = image[src][masks[o][src]]
        moving_lab[pasted] = ORGAN_TO_ID[o]
        displacement[:, masks[o]] = shift[:, None]
    moving_img = to_stored_hu(moving_img)
    return {"image": moving_img, "labels": moving_lab}, displacement


def _shifted_slices(shape, shift) -> tuple[tuple, tuple]:
    """Slices so that ``out[dst] = in[src]`` moves content by ``shift`` voxels (dropping what leaves)."""
    src, dst = [], []
    for n, s in zip(shape, shift):
        s = int(s)
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    return tuple(src), tuple(dst)


def organ_motion_pairs(n_subjects: int, shape=(64, 64, 64), spacing=(6.0, 6.0, 6.0), seed: int = 0,
                       per_subject: int = 2):
    """(key, pair) items for ``write_shards``: ``per_subject`` organ-motion pairs of each new phantom."""
    base = {"spacing": [float(s) for s in spacing], "source": "organ_motion", "type": "intra"}
    for i in range(n_subjects):
        subject = make_subject(subject_seed(seed, 500 + i), shape=shape, spacing_mm=spacing)
        for j in range(per_subject):
            moving, displacement = organ_motion_pair(subject, seed * 100003 + 1000 * i + j)
            yield f"organ-motion-s{seed}-{i:04d}-{j}", {
                "fixed": subject.image, "moving": moving["image"], "fixed_seg": subject.labels,
                "moving_seg": moving["labels"], "displacement": displacement,
                "meta": {**base, "fixed_id": f"om-s{seed}-{i}", "moving_id": f"om-s{seed}-{i}-moved{j}"}}
