"""SynthMorph-style synthetic pairs: random shapes, random CT-like intensities, a known deformation.

The phantom teaches one anatomy; Hoffmann et al. 2022 ("SynthMorph: learning contrast-invariant
registration without acquired images") showed that a network trained on *random* label maps with
random intensities registers anatomy and contrasts it has never seen. This module makes such
pairs in the layout of ``data_tools.shards`` so they mix with phantom pairs in one shard set:

* **label maps**: ``n_labels`` channels of smooth Gaussian noise, every channel sampled through a
  random smooth "shape" warp, arg-max over channels -> a map of irregular, space-filling blobs;
  a body (a noisy elliptic cylinder along z) keeps air around them, as in a CT field of view;
* **intensities**: each synthetic label draws a mean and a standard deviation from a CT tissue
  palette (soft tissue, fat, lung/air, bone), so the HU window used for real CT still applies;
  each image then gets its own partial-volume blur, additive low-frequency bias (cupping),
  gamma in the HU window and noise; the moving image's label means are jittered slightly;
* **deformation**: a smooth stationary velocity integrated by scaling and squaring (a
  diffeomorphism); the fixed image is the moving one seen through it, so the field is exact.

Labels and organ names. Prompts name TotalSegmentator classes, so every synthetic label is given
an id of ``unireg.organs.ORGANS``: by default a fresh random draw per pair (distinct ids), which
keeps the network from tying a name to an appearance or a place that this data does not have -
on synthetic pairs a prompt only says *which region the Dice term scores*, the anatomy-agnostic
signal SynthMorph trains on. Pass ``organs=[...]`` to use a fixed list instead. A share of the
synthetic labels (``unlabelled_fraction``) is painted but kept at id 0, like the unlabelled fat
and muscle of real CT; labels outside the body are 0 and air.

Arrays are in torch order [D, H, W]; ``displacement`` is float32 in voxels, channels (dz, dy, dx),
with ``fixed(x) = moving(x + d(x))`` - the convention of the phantom's true fields and of
``unireg.modeling.transform.SpatialTransformer``. Everything is made on coarse grids and sampled
once with ``torch.nn.functional.grid_sample``, so a 64^3 pair takes a fraction of a second.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from unireg.organ_presence import organs_in_both
from unireg.organs import ORGAN_TO_ID, ORGANS
from unireg.preprocessing import HU_MAX, HU_MIN, to_stored_hu

from .prepare import PreparationError

#: Tissue classes a synthetic label's mean HU is drawn from: (probability, mean HU range, std HU range).
TISSUE_PALETTE = {
    "soft_tissue": (0.55, (-20.0, 120.0), (5.0, 25.0)),
    "fat": (0.15, (-130.0, -70.0), (5.0, 20.0)),
    "lung_air": (0.10, (-950.0, -600.0), (15.0, 60.0)),
    "enhanced": (0.10, (120.0, 300.0), (10.0, 30.0)),
    "bone": (0.10, (300.0, 1200.0), (20.0, 80.0)),
}
AIR_HU = -1000.0
_SQUARINGS = 6


@dataclass
class SynthConfig:
    """How random a synthetic pair is. Lengths are in mm, so pairs look alike at any spacing."""

    n_labels: int = 16                  # synthetic labels (blobs) inside the body
    label_scale_mm: float = 48.0        # correlation length of the label noise: typical blob size
    shape_warp_mm: float = 12.0         # amplitude of the warp that bends blob boundaries
    body_fraction: tuple = (0.75, 0.95)  # body (an elliptic cylinder along z) semi-axes / half FOV
    unlabelled_fraction: float = 0.25   # share of synthetic labels painted but kept at id 0
    max_displacement_mm: float = 12.0   # peak of the pair's deformation (drawn in [0.5, 1] x this)
    deformation_scale_mm: float = 64.0  # correlation length of the deformation
    mean_jitter_hu: float = 10.0        # per-label shift of the moving image's means
    independent_contrast: bool = False  # True: the moving image draws its own palette (SynthMorph's
                                        # contrast invariance; CT keeps HU physical, hence off)
    blur_voxels: tuple = (0.0, 1.0)     # Gaussian partial-volume blur (sigma), per image
    bias_hu: float = 30.0               # peak of the additive low-frequency bias, per image
    gamma_log_std: float = 0.05         # log-normal gamma in the HU window, per image (0.05: ~±35 HU at water)
    noise_hu: tuple = (3.0, 25.0)       # Gaussian noise std, per image

    def check(self) -> "SynthConfig":
        if self.n_labels < 2:
            raise PreparationError(f"synthetic pairs need n_labels >= 2, got {self.n_labels}")
        if not 0 <= self.unlabelled_fraction < 1:
            raise PreparationError(f"unlabelled_fraction must be in [0, 1), got {self.unlabelled_fraction}")
        for name in ("label_scale_mm", "deformation_scale_mm"):
            if getattr(self, name) <= 0:
                raise PreparationError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_displacement_mm < 0 or self.shape_warp_mm < 0:
            raise PreparationError("max_displacement_mm and shape_warp_mm must be >= 0")
        return self


def synth_pair(seed: int, shape=(64, 64, 64), spacing=(4.0, 4.0, 4.0), n_labels: int | None = None,
               pair_type: str = "intra", organs: Sequence[str] | None = None,
               config: SynthConfig | None = None) -> dict:
    """One synthetic pair: ``fixed``/``moving`` int16 HU, ``fixed_seg``/``moving_seg`` uint8 ids,
    ``displacement`` (voxels, (dz, dy, dx), ``fixed(x) = moving(x + d(x))``) and ``meta``.

    The same seed, shape, spacing and config give the same pair. ``pair_type`` is recorded in
    the meta ("intra": one anatomy deformed, the default; "inter" for larger deformations that a
    caller sets through ``config.max_displacement_mm``)."""
    cfg = config or SynthConfig()
    cfg = (replace(cfg, n_labels=n_labels) if n_labels is not None else cfg).check()
    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8 or len(spacing) != 3 or min(spacing) <= 0:
        raise PreparationError(f"synthetic pairs need a 3-D shape of sizes >= 8 and positive spacing, "
                               f"got {shape}, {spacing}")
    if pair_type not in ("intra", "inter"):
        raise PreparationError(f"pair_type must be 'intra' or 'inter', got {pair_type!r}")
    rng = np.random.default_rng(seed)
    ids = _label_ids(rng, cfg, organs)

    # Coordinates (voxels of the output grid) at which the moving and the fixed image see the labels.
    moving_coords = _identity(shape) + _smooth_field(rng, shape, spacing, cfg.shape_warp_mm, 2 * cfg.label_scale_mm)
    displacement = _diffeomorphism(rng, shape, spacing, cfg)
    fixed_coords = _warp(moving_coords, displacement)                 # c_f(x) = c_m(x + d(x))

    noise = _label_noise(rng, shape, spacing, cfg)
    body_axes = rng.uniform(*cfg.body_fraction, 2)
    moving_lab = _labels_at(noise, moving_coords, shape, body_axes)
    fixed_lab = _labels_at(noise, fixed_coords, shape, body_axes)

    means, stds = _label_intensities(rng, cfg.n_labels)
    moving_means, moving_stds = means + rng.normal(0, cfg.mean_jitter_hu, means.shape), stds
    fixed = _render(rng, fixed_lab, means, stds, spacing, cfg)
    if cfg.independent_contrast:
        moving_means, moving_stds = _label_intensities(rng, cfg.n_labels)
    moving = _render(rng, moving_lab, moving_means, moving_stds, spacing, cfg)
    fixed_seg, moving_seg = ids[fixed_lab], ids[moving_lab]
    meta = {"type": pair_type, "spacing": list(spacing), "source": "synth", "fixed_id": f"synth-{seed}",
            "moving_id": f"synth-{seed}-deformed", "organs": organs_in_both(fixed_seg, moving_seg)}
    return {"fixed": fixed, "moving": moving, "fixed_seg": fixed_seg, "moving_seg": moving_seg,
            "displacement": displacement.numpy().astype(np.float32), "meta": meta}


def synth_pairs(n: int, seed: int = 0, shape=(64, 64, 64), spacing=(4.0, 4.0, 4.0),
                **kwargs) -> Iterator[tuple[str, dict]]:
    """``(key, pair)`` items for ``write_shards``, like ``phantom_pairs``; pair ``i`` uses seed
    ``seed * 100003 + i`` so runs with different seeds do not share pairs."""
    if n < 0:
        raise PreparationError(f"number of synthetic pairs must be >= 0, got {n}")
    for i in range(n):
        yield f"synth-s{seed}-{i:05d}", synth_pair(seed * 100003 + i, shape, spacing, **kwargs)


# ------------------------------------------------------------------------------------ pieces
def _label_ids(rng, cfg: SynthConfig, organs) -> np.ndarray:
    """Lookup synthetic label (0 = outside the body, 1..n) -> TotalSegmentator id (uint8)."""
    n_named = cfg.n_labels - int(round(cfg.unlabelled_fraction * cfg.n_labels))
    if organs is None:
        named = rng.choice(len(ORGANS), size=n_named, replace=False) + 1
    else:
        unknown = [o for o in organs if o not in ORGAN_TO_ID]
        if unknown:
            raise PreparationError(f"unknown organ names for synthetic labels: {unknown} (use TotalSegmentator names)")
        if len(set(organs)) < n_named:
            raise PreparationError(f"need {n_named} distinct organs for {cfg.n_labels} synthetic labels, "
                                   f"got {len(set(organs))}")
        named = np.array([ORGAN_TO_ID[o] for o in rng.permutation(sorted(set(organs)))[:n_named]])
    ids = np.zeros(cfg.n_labels + 1, np.uint8)
    ids[1 + rng.permutation(cfg.n_labels)[:n_named]] = named
    return ids


def _identity(shape) -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))


def _coarse_shape(shape, spacing, scale_mm: float) -> list[int]:
    """A grid with about two nodes per correlation length: enough for a smooth field, cheap to make."""
    return [int(max(3, min(n, np.ceil(n * s / (scale_mm / 2)) + 1))) for n, s in zip(shape, spacing)]


def _upsample(coarse: np.ndarray, shape) -> torch.Tensor:
    """[C, d, h, w] coarse nodes spanning the volume -> [C, D, H, W] trilinear (corners aligned)."""
    t = torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None]
    return F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def _smooth_noise(rng, channels: int, shape, spacing, scale_mm: float) -> torch.Tensor:
    """Random smooth fields [C, D, H, W] with correlation length ``scale_mm``, each peaking at 1."""
    coarse = rng.normal(size=(channels, *_coarse_shape(shape, spacing, scale_mm)))
    coarse = ndimage.gaussian_filter(coarse, (0, 1, 1, 1))
    coarse /= np.abs(coarse).max(axis=(1, 2, 3), keepdims=True) + 1e-9
    return _upsample(coarse, shape)


def _smooth_field(rng, shape, spacing, amplitude_mm: float, scale_mm: float) -> torch.Tensor:
    """Random smooth displacement [3, D, H, W] in voxels, each component peaking at ``amplitude_mm``."""
    mm_to_voxels = torch.tensor([amplitude_mm / s for s in spacing], dtype=torch.float32).view(3, 1, 1, 1)
    return _smooth_noise(rng, 3, shape, spacing, scale_mm) * mm_to_voxels


def _diffeomorphism(rng, shape, spacing, cfg: SynthConfig) -> torch.Tensor:
    """exp(v) of a smooth random velocity by scaling and squaring: displacement [3, D, H, W] voxels.

    The velocity is smooth on the scale of ``deformation_scale_mm``, so it is integrated on a grid of
    half the size and the result upsampled (values rescaled): 8x cheaper, and the upsampled field is
    the pair's true field by construction (the fixed image is made through it)."""
    amplitude = cfg.max_displacement_mm * rng.uniform(0.5, 1.0)
    half = tuple(max(8, (n + 1) // 2) for n in shape)
    half_spacing = [s * (n - 1) / max(h - 1, 1) for s, n, h in zip(spacing, shape, half)]
    disp = _smooth_field(rng, half, half_spacing, amplitude, cfg.deformation_scale_mm) / 2 ** _SQUARINGS
    for _ in range(_SQUARINGS):
        disp = disp + _warp(disp, disp)
    to_full = torch.tensor([(n - 1) / max(h - 1, 1) for n, h in zip(shape, half)]).view(3, 1, 1, 1)
    return _upsample(disp.numpy(), shape) * to_full


def _warp(values: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """values(x + d(x)) by trilinear sampling (border values outside): [C, D, H, W]."""
    return _sample(values, _identity(values.shape[1:]) + displacement, padding="border")


def _sample(values: torch.Tensor, coords: torch.Tensor, padding: str = "border", mode: str = "bilinear") -> torch.Tensor:
    """values [C, d, h, w] at voxel coords [3, D, H, W] of the output grid; ``values`` may be a coarser
    grid over the same extent (corner nodes on corner voxels: align_corners=True)."""
    shape = coords.shape[1:]
    norm = torch.stack([2 * coords[i] / max(n - 1, 1) - 1 for i, n in enumerate(shape)])
    grid = norm.flip(0).permute(1, 2, 3, 0)[None]                      # (x, y, z) last, as grid_sample wants
    return F.grid_sample(values[None], grid, mode=mode, padding_mode=padding, align_corners=True)[0]


def _label_noise(rng, shape, spacing, cfg: SynthConfig) -> torch.Tensor:
    """Smooth noise: ``n_labels`` label channels + 1 body-outline channel, on a coarse grid."""
    coarse = rng.normal(size=(cfg.n_labels + 1, *_coarse_shape(shape, spacing, cfg.label_scale_mm)))
    coarse = ndimage.gaussian_filter(coarse, (0, 0.7, 0.7, 0.7))
    coarse /= coarse.std(axis=(1, 2, 3), keepdims=True) + 1e-9
    return torch.from_numpy(coarse.astype(np.float32))


def _labels_at(noise: torch.Tensor, coords: torch.Tensor, shape, body_axes) -> np.ndarray:
    """Synthetic labels (0 outside the body, 1..n) seen at voxel coords [3, D, H, W]."""
    values = _sample(noise, coords, padding="border")
    labels = _argmax_channels(values[:-1]) + 1
    centre = torch.tensor([(n - 1) / 2 for n in shape[1:]]).view(2, 1, 1, 1)
    semi = torch.tensor([a * (n - 1) / 2 for a, n in zip(body_axes, shape[1:])], dtype=torch.float32).view(2, 1, 1, 1)
    radius = (((coords[1:] - centre) / semi) ** 2).sum(0).sqrt() + 0.08 * values[-1]  # elliptic cylinder along z
    labels[radius >= 1] = 0
    return labels.numpy().astype(np.int64)


def _argmax_channels(values: torch.Tensor) -> torch.Tensor:
    """argmax over the first axis by a running maximum (torch's strided argmax(0) is ~10x slower)."""
    best, index = values[0].clone(), torch.zeros(values.shape[1:], dtype=torch.int64)
    for c in range(1, values.shape[0]):
        better = values[c] > best
        best = torch.where(better, values[c], best)
        index[better] = c
    return index


def _label_intensities(rng, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std HU per synthetic label (index 0 = air outside the body)."""
    names = list(TISSUE_PALETTE)
    probs = np.array([TISSUE_PALETTE[k][0] for k in names])
    kinds = rng.choice(len(names), size=n_labels, p=probs / probs.sum())
    means, stds = np.full(n_labels + 1, AIR_HU), np.full(n_labels + 1, 5.0)
    for j, k in enumerate(kinds, start=1):
        _, mean_range, std_range = TISSUE_PALETTE[names[k]]
        means[j], stds[j] = rng.uniform(*mean_range), rng.uniform(*std_range)
    return means, stds


def _render(rng, labels: np.ndarray, means, stds, spacing, cfg: SynthConfig) -> np.ndarray:
    """One image from its label map: texture, blur, bias, gamma, noise -> int16 HU."""
    shape = labels.shape
    hu = (means[labels] + stds[labels] * rng.standard_normal(shape)).astype(np.float32)
    sigma = rng.uniform(*cfg.blur_voxels)
    if sigma > 0.05:
        hu = ndimage.gaussian_filter(hu, sigma)
    body = labels > 0
    if cfg.bias_hu > 0:
        hu += body * cfg.bias_hu * _smooth_noise(rng, 1, shape, spacing, 160.0)[0].numpy()
    gamma = float(np.exp(rng.normal(0, cfg.gamma_log_std)))
    unit = np.clip((hu - HU_MIN) / (HU_MAX - HU_MIN), 0, 1)
    hu = np.where(hu < HU_MAX, HU_MIN + (HU_MAX - HU_MIN) * unit ** gamma, hu)   # bone above the window kept
    hu += rng.normal(0, rng.uniform(*cfg.noise_hu), shape).astype(np.float32)
    return to_stored_hu(hu)


__all__ = ["SynthConfig", "TISSUE_PALETTE", "synth_pair", "synth_pairs"]
