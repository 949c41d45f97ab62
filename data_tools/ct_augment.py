"""CT appearance augmentation: what real scans do that the phantom does not.

A network trained on clean phantoms meets low-dose noise, thick slices, other contrast phases,
anatomy cut off by the reconstruction field of view, the patient table and metal streaks in
the first real scan it sees. Each of these is one function here, and ``augment_ct`` applies
each with a probability from ``CTAugmentConfig``, driven by a seeded ``numpy.random.Generator``
(the same generator state gives the same result). Apply it to the fixed and the moving scan of a
pair independently (``augment_pair``): two scans of a patient rarely share dose, phase or FOV.

Arrays are [D, H, W] = (z, y, x) in RAS order as ``unireg.io`` and the shards store them: the
first axis runs caudal -> cranial (the slice axis of an axial CT), the second posterior ->
anterior (so the table, under a supine patient, lies at low H indices). ``spacing`` is the voxel
size in mm in the same order. Labels change only where the field of view is truncated (cut
tissue becomes background); the true displacement of a pair stays valid, since no
augmentation moves anatomy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from unireg.organs import ORGAN_TO_ID
from unireg.preprocessing import HU_OUTSIDE, to_stored_hu

from .prepare import PreparationError

_ARTERIES = ["aorta", "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
             "common_carotid_artery_right", "common_carotid_artery_left", "iliac_artery_left", "iliac_artery_right"]
_VEINS = ["inferior_vena_cava", "superior_vena_cava", "brachiocephalic_vein_left", "brachiocephalic_vein_right",
          "iliac_vena_left", "iliac_vena_right"]

#: HU change per organ from the portal-venous phase (the phantom's and most abdominal CTs' phase),
#: rounded from typical enhancement curves: unenhanced blood ~40 HU, arterial aorta 300+ HU,
#: arterial pancreas/renal cortex up, portal vein and liver peak in the portal-venous phase,
#: delayed phase with contrast excreted into the collecting system and bladder.
PHASE_OFFSETS_HU: dict[str, dict[str, float]] = {
    "native": {**{a: -180.0 for a in _ARTERIES}, **{v: -130.0 for v in _VEINS},
               "portal_vein_and_splenic_vein": -130.0, "heart": -100.0, "atrial_appendage_left": -100.0,
               "pulmonary_vein": -120.0, "liver": -45.0, "spleen": -45.0, "kidney_left": -120.0,
               "kidney_right": -120.0, "pancreas": -50.0, "adrenal_gland_left": -20.0, "adrenal_gland_right": -20.0},
    "arterial": {**{a: 130.0 for a in _ARTERIES}, **{v: -90.0 for v in _VEINS},
                 "portal_vein_and_splenic_vein": -50.0, "heart": 60.0, "pulmonary_vein": 120.0, "liver": -30.0,
                 "spleen": 10.0, "kidney_left": 30.0, "kidney_right": 30.0, "pancreas": 40.0},
    "portal_venous": {},
    "delayed": {**{a: -100.0 for a in _ARTERIES}, **{v: -60.0 for v in _VEINS},
                "portal_vein_and_splenic_vein": -70.0, "heart": -60.0, "liver": -25.0, "spleen": -25.0,
                "pancreas": -20.0, "kidney_left": 40.0, "kidney_right": 40.0, "urinary_bladder": 200.0},
}


@dataclass
class CTAugmentConfig:
    """Probability and strength range of each augmentation (ranges are drawn uniformly)."""

    p_noise: float = 0.5
    noise_hu: tuple = (5.0, 25.0)            # noise std in water at full dose
    dose: tuple = (0.2, 1.0)                 # relative dose: std grows as 1 / sqrt(dose)
    p_thickness: float = 0.3
    slice_thickness_mm: tuple = (3.0, 10.0)
    thickness_axes: tuple = (0,)             # axial CT: thick slices along z
    p_contrast: float = 0.5
    phases: tuple = ("native", "arterial", "portal_venous", "delayed")
    contrast_strength: tuple = (0.6, 1.2)    # scales PHASE_OFFSETS_HU
    p_truncate: float = 0.15
    fov_fraction: tuple = (0.7, 0.95)        # FOV radius / the body's largest in-plane radius
    p_table: float = 0.3
    table_hu: tuple = (150.0, 500.0)
    table_thickness_mm: tuple = (4.0, 12.0)
    table_gap_mm: tuple = (0.0, 15.0)
    p_streaks: float = 0.1
    n_streaks: tuple = (3, 10)
    streak_hu: tuple = (100.0, 500.0)
    phase_offsets: dict = field(default_factory=lambda: PHASE_OFFSETS_HU)

    def check(self) -> "CTAugmentConfig":
        for name in ("p_noise", "p_thickness", "p_contrast", "p_truncate", "p_table", "p_streaks"):
            if not 0 <= getattr(self, name) <= 1:
                raise PreparationError(f"CT augmentation {name} must be a probability in [0, 1], "
                                       f"got {getattr(self, name)}")
        unknown = [p for p in self.phases if p not in self.phase_offsets]
        if unknown:
            raise PreparationError(f"unknown contrast phases {unknown}; known: {sorted(self.phase_offsets)}")
        if not all(a in (0, 1, 2) for a in self.thickness_axes):
            raise PreparationError(f"thickness_axes must be among 0, 1, 2, got {self.thickness_axes}")
        return self


def augment_ct(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
               config: CTAugmentConfig | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0)
               ) -> tuple[np.ndarray, np.ndarray]:
    """One scan [D, H, W] (HU) and its labels -> augmented (image, labels), dtypes and shape kept.

    Order follows the scanner: what is in the patient (contrast, table, metal) first, then the
    reconstruction (slice thickness, noise), then the field of view that cuts it all."""
    cfg = (config or CTAugmentConfig()).check()
    if image.shape != labels.shape or image.ndim != 3:
        raise PreparationError(f"CT augmentation needs a 3-D image and labels of one shape, "
                               f"got {image.shape}, {labels.shape}")
    spacing = tuple(float(s) for s in spacing)
    hu = image.astype(np.float32)
    patient = _body(hu)                                               # before a table widens it
    if rng.random() < cfg.p_contrast:
        phase = cfg.phases[int(rng.integers(len(cfg.phases)))]
        hu = contrast_phase(hu, labels, phase, rng.uniform(*cfg.contrast_strength), cfg.phase_offsets)
    if rng.random() < cfg.p_table:
        hu = add_table(hu, labels, spacing, rng, cfg)
    if rng.random() < cfg.p_streaks:
        hu = add_streaks(hu, spacing, rng, cfg)
    if rng.random() < cfg.p_thickness:
        axis = int(cfg.thickness_axes[int(rng.integers(len(cfg.thickness_axes)))])
        hu = thick_slices(hu, axis, rng.uniform(*cfg.slice_thickness_mm) / spacing[axis])
    if rng.random() < cfg.p_noise:
        hu = add_dose_noise(hu, rng, rng.uniform(*cfg.noise_hu), rng.uniform(*cfg.dose))
    if rng.random() < cfg.p_truncate:
        hu, labels = truncate_fov(hu, labels, spacing, rng, cfg.fov_fraction, body=patient)
    out = to_stored_hu(hu) if np.issubdtype(image.dtype, np.integer) else hu
    return out.astype(image.dtype, copy=False), labels


def augment_pair(pair: dict, rng: np.random.Generator, config: CTAugmentConfig | None = None) -> dict:
    """A shard-layout pair with its fixed and moving scans augmented independently (new dict)."""
    spacing = pair.get("meta", {}).get("spacing", (1.0, 1.0, 1.0))
    out = dict(pair)
    for image_key, label_key in (("fixed", "fixed_seg"), ("moving", "moving_seg")):
        out[image_key], out[label_key] = augment_ct(pair[image_key], pair[label_key], rng, config, spacing)
    return out


# ----------------------------------------------------------------------------- augmentations
def contrast_phase(hu: np.ndarray, labels: np.ndarray, phase: str, strength: float = 1.0,
                   offsets: dict | None = None) -> np.ndarray:
    """Shift each listed organ's HU by its phase offset x ``strength``; other voxels unchanged."""
    table = (offsets or PHASE_OFFSETS_HU)[phase]
    lookup = np.zeros(max(ORGAN_TO_ID.values()) + 1, np.float32)
    for organ, offset in table.items():
        lookup[ORGAN_TO_ID[organ]] = offset * strength
    ids = np.clip(labels, 0, len(lookup) - 1).astype(np.intp)
    return hu + lookup[ids] * (labels < len(lookup))


def thick_slices(hu: np.ndarray, axis: int, thickness_voxels: float) -> np.ndarray:
    """Reconstruct thick slices along ``axis`` (box slice profile, one slice per thickness) and
    interpolate them back linearly onto the original grid; thinner than 1.5 voxels: unchanged."""
    k = int(round(thickness_voxels))
    n = hu.shape[axis]
    if k < 2 or n < 2 * k:
        return hu
    profile = ndimage.uniform_filter1d(hu, size=k, axis=axis, mode="nearest")
    centres = np.arange(k // 2, n, k)
    slabs = np.take(profile, centres, axis=axis)
    where = np.clip((np.arange(n) - centres[0]) / k, 0, len(centres) - 1)
    lo = np.floor(where).astype(int)
    hi = np.minimum(lo + 1, len(centres) - 1)
    w = (where - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(hu.ndim)])
    return np.take(slabs, lo, axis=axis) * (1 - w) + np.take(slabs, hi, axis=axis) * w


def add_dose_noise(hu: np.ndarray, rng: np.random.Generator, sigma_hu: float, dose: float = 1.0) -> np.ndarray:
    """Quantum noise: std ``sigma_hu / sqrt(dose)`` in water, growing with attenuation (fewer photons
    reach the detector through dense tissue, as Poisson statistics give) and falling in air;
    correlated over about a voxel in-plane as filtered back-projection makes it."""
    white = rng.standard_normal(hu.shape).astype(np.float32)
    grain = ndimage.gaussian_filter(white, (0.0, 0.7, 0.7))
    grain /= grain.std() + 1e-6
    attenuation = np.sqrt(np.clip(1.0 + hu / 1000.0, 0.05, 3.0))
    return hu + grain * attenuation * (sigma_hu / np.sqrt(max(dose, 1e-3)))


def truncate_fov(hu: np.ndarray, labels: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
                 fov_fraction=(0.7, 0.95), body: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A reconstruction field of view smaller than the patient: outside a circle in the axial
    (y, x) plane, near the body's centre and cutting its edge, the scan is air and unlabelled.
    ``body`` (default: voxels above -500 HU) is the patient whose extent the circle cuts."""
    body = _body(hu) if body is None else body
    if not body.any():
        return hu, labels
    yy, xx = np.nonzero(body.any(axis=0))
    centre = np.array([yy.mean(), xx.mean()]) * spacing[1:]
    radius_mm = np.sqrt(((yy * spacing[1] - centre[0]) ** 2 + (xx * spacing[2] - centre[1]) ** 2).max())
    radius_mm *= rng.uniform(*fov_fraction)
    centre += rng.normal(0, 0.05 * radius_mm, 2)
    y = np.arange(hu.shape[1])[:, None] * spacing[1] - centre[0]
    x = np.arange(hu.shape[2])[None, :] * spacing[2] - centre[1]
    outside = np.broadcast_to((y ** 2 + x ** 2 > radius_mm ** 2)[None], hu.shape)
    return np.where(outside, np.float32(HU_OUTSIDE), hu), np.where(outside, 0, labels).astype(labels.dtype)


def add_table(hu: np.ndarray, labels: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
              cfg: CTAugmentConfig | None = None) -> np.ndarray:
    """A patient table under a supine body: a thin dense slab, curved up at its sides, a small gap
    posterior to the body, the length of the scan; painted only into unlabelled air."""
    cfg = cfg or CTAugmentConfig()
    body = _body(hu)
    if not body.any():
        return hu
    _, ys, xs = np.nonzero(body)
    sy, sx = spacing[1], spacing[2]
    top = ys.min() * sy - rng.uniform(*cfg.table_gap_mm)                # mm, posterior of the body
    thickness = rng.uniform(*cfg.table_thickness_mm)
    x = np.arange(hu.shape[2]) * sx - xs.mean() * sx
    half_width = rng.uniform(0.5, 0.8) * hu.shape[2] * sx / 2
    curve = rng.uniform(0.0, 0.3) * x ** 2 / max(half_width, 1.0)      # mm of lift towards the sides
    y = np.arange(hu.shape[1])[:, None] * sy
    slab = (y <= top + curve[None]) & (y > top + curve[None] - thickness) & (np.abs(x) < half_width)[None]
    mask = np.broadcast_to(slab[None], hu.shape) & (labels == 0) & (hu < -500)
    return np.where(mask, np.float32(rng.uniform(*cfg.table_hu)), hu)


def add_streaks(hu: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
                cfg: CTAugmentConfig | None = None) -> np.ndarray:
    """Metal-like streaks: bright and dark lines radiating, in a few axial slices, from a dense
    point (bone where there is any, else body) that is made metal-bright itself."""
    cfg = cfg or CTAugmentConfig()
    body = _body(hu)
    candidates = np.argwhere(body & (hu > 300)) if (body & (hu > 300)).any() else np.argwhere(body)
    if len(candidates) == 0:
        return hu
    z0, y0, x0 = candidates[int(rng.integers(len(candidates)))]
    half_slices = max(0, int(round(rng.uniform(2.0, 8.0) / spacing[0])))
    y = (np.arange(hu.shape[1])[:, None] - y0) * spacing[1]
    x = (np.arange(hu.shape[2])[None, :] - x0) * spacing[2]
    r = np.sqrt(y ** 2 + x ** 2)
    decay = rng.uniform(60.0, 150.0)
    width = 0.7 * min(spacing[1:])
    pattern = np.zeros(r.shape, np.float32)
    for _ in range(int(rng.integers(cfg.n_streaks[0], cfg.n_streaks[1] + 1))):
        angle = rng.uniform(0, np.pi)
        distance = np.abs(x * np.sin(angle) - y * np.cos(angle))        # to the line through the point
        pattern += rng.choice([-1.0, 1.0]) * rng.uniform(*cfg.streak_hu) * np.exp(-0.5 * (distance / width) ** 2)
    pattern *= np.exp(-r / decay)
    pattern[r <= 1.5 * min(spacing[1:])] = rng.uniform(1500.0, 3000.0)  # the metal itself
    out = hu.copy()
    zs = slice(max(0, z0 - half_slices), z0 + half_slices + 1)
    metal = pattern > 1000
    out[zs] = np.where(metal, np.maximum(out[zs], pattern), out[zs] + pattern)
    return out


def _body(hu: np.ndarray) -> np.ndarray:
    """The patient (and whatever dense lies around it): voxels above -500 HU. Lungs fall below,
    which is harmless: they lie inside, and only the body's extent and dense points are used."""
    return hu > -500


__all__ = ["CTAugmentConfig", "PHASE_OFFSETS_HU", "augment_ct", "augment_pair", "contrast_phase", "thick_slices",
           "add_dose_noise", "truncate_fov", "add_table", "add_streaks"]
