"""Training pairs from real, unlabelled or labelled CT scans: each scan seen through a known motion.

Phantoms and synthetic label maps teach registration, but not what real CT looks like: a network
trained on them alone left a real chest CT as it was (bench/vs_optimisers.py, ``network`` row). A
clinic has scans but rarely pairs with known correspondences; this module makes such pairs from
any scan, as the benchmark does to score methods: the moving image is the scan, the fixed image is
the scan seen through a random patient motion,

    phi(x) = c + R (x + s(x) - c) + t        (mm; fixed(x) = moving(phi(x)))

a rotation ``R`` of up to ``rotation_deg`` about a random axis through a point ``c`` near the scan's
centre, a translation ``t`` of up to ``translation_mm`` and a smooth diffeomorphic field ``s`` (the
synthetic pairs' scaling-and-squaring field, ``data_tools.synth``) peaking at up to ``field_mm``.
The true displacement ``phi(x) - x`` is stored (voxels, (dz, dy, dx)), and the label map, when the
scan has one, is carried through the same motion (nearest neighbour), so the Dice and prompt terms
of training work on these pairs as on phantoms. Outside the scan the fixed image is air.

Arrays are in torch order [D, H, W] on the scan's grid after ``prepare_scan`` (RAS, the requested
spacing, cropped to the body), in the layout of ``data_tools.shards``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import torch

from unireg.data import random_rigid
from unireg.io import ijk_to_tensor_order
from unireg.organ_presence import organs_in_both
from unireg.preprocessing import HU_OUTSIDE, to_stored_hu

from .prepare import PreparationError, prepare_scan, scan_csv
from .synth import SynthConfig, _diffeomorphism, _identity, _sample


@dataclass(frozen=True)
class MotionConfig:
    """How far a pair's fixed scan moves from the real one. Lengths in mm, angles in degrees."""

    rotation_deg: float = 5.0        # peak rotation (drawn uniformly in [0, this])
    translation_mm: float = 8.0      # peak translation
    field_mm: float = 8.0            # peak of the smooth field (SynthConfig draws [0.5, 1] x this)
    field_scale_mm: float = 64.0     # its correlation length
    centre_jitter: float = 0.2       # rotation centre: scan centre +- this fraction of the extent

    def check(self) -> "MotionConfig":
        if min(self.rotation_deg, self.translation_mm, self.field_mm, self.centre_jitter) < 0 \
                or self.field_scale_mm <= 0:
            raise PreparationError(f"known motion needs non-negative sizes and a positive field scale, got {self}")
        return self


def known_motion_pair(hu: np.ndarray, labels: np.ndarray | None, spacing, seed: int,
                      config: MotionConfig | None = None, source: str = "scan") -> dict:
    """One pair from one scan ``hu`` [D,H,W] (labels [D,H,W] uint8 or None) at ``spacing`` (mm, D H W)."""
    cfg = (config or MotionConfig()).check()
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 8:
        raise PreparationError(f"known-motion pairs need a 3-D scan of at least 8 voxels a side, got {hu.shape}")
    if not np.isfinite(hu).all():
        raise PreparationError(f"{source}: the scan has NaN or infinite values")
    rng = np.random.default_rng(seed)
    shape, spacing = hu.shape, np.asarray(spacing, np.float64)
    smooth = _diffeomorphism(rng, shape, tuple(spacing),
                             replace(SynthConfig(), max_displacement_mm=cfg.field_mm,
                                     deformation_scale_mm=cfg.field_scale_mm))       # [3, D, H, W] voxels

    rotation, translation, centre = random_rigid(rng, cfg.rotation_deg, cfg.translation_mm,
                                                 (np.array(shape) - 1) * spacing, cfg.centre_jitter)   # mm

    def mm(vector):
        return torch.tensor(vector, dtype=torch.float32).view(3, 1, 1, 1)

    identity = _identity(shape)
    bent = (identity + smooth) * mm(spacing) - mm(centre)
    matrix = torch.tensor(rotation, dtype=torch.float32)
    coords = (torch.einsum("ij,jdhw->idhw", matrix, bent) + mm(centre + translation)) / mm(spacing)  # phi, voxels
    displacement = coords - identity

    fixed = _sample(torch.from_numpy(hu.astype(np.float32))[None] - HU_OUTSIDE, coords, "zeros")[0] + HU_OUTSIDE
    pair = {"fixed": to_stored_hu(fixed.numpy()), "moving": to_stored_hu(hu),
            "displacement": displacement.numpy().astype(np.float32)}
    organs: list[str] = []
    if labels is not None:
        labels = np.asarray(labels, np.uint8)
        pair["moving_seg"] = labels
        pair["fixed_seg"] = _sample(torch.from_numpy(labels.astype(np.float32))[None], coords, "zeros",
                                    mode="nearest")[0].numpy().astype(np.uint8)
        organs = organs_in_both(pair["fixed_seg"], pair["moving_seg"])
    else:
        pair["fixed_seg"] = pair["moving_seg"] = np.zeros(shape, np.uint8)
    pair["meta"] = {"type": "intra", "spacing": [float(s) for s in spacing], "source": "known_motion",
                    "fixed_id": f"{source}-motion-{seed}", "moving_id": source, "organs": organs}
    return pair


def known_motion_pairs(csv_path: "str | Path", pairs_per_scan: int, spacing, seed: int = 0,
                       config: MotionConfig | None = None) -> Iterator[tuple[str, dict]]:
    """(key, pair) for every scan of a CSV (columns image, label, subject: ``unireg prepare dataset``'s
    csv layout; ``label`` may be empty), ``pairs_per_scan`` motions each."""
    if pairs_per_scan < 1:
        raise PreparationError(f"--known-motion-pairs must be >= 1, got {pairs_per_scan}")
    for index, scan in enumerate(scan_csv(Path(csv_path))):
        ct, labels, _ = prepare_scan(scan, tuple(float(s) for s in spacing))
        hu = ijk_to_tensor_order(np.asanyarray(ct.dataobj))
        lab = ijk_to_tensor_order(np.asanyarray(labels.dataobj)) if scan.labels else None
        spacing_dhw = tuple(float(z) for z in reversed(nib.affines.voxel_sizes(ct.affine)))
        for k in range(pairs_per_scan):
            pair_seed = int(np.random.SeedSequence([seed, index, k]).generate_state(1)[0])
            yield (f"motion-{index:04d}-{k:04d}",
                   known_motion_pair(hu, lab, spacing_dhw, pair_seed, config, source=str(scan.subject)))

