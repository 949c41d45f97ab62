"""Streaming pair loader over WebDataset shards.

Shards are split across ranks (``split_by_node``) and data-loader workers
(``split_by_worker``), shuffled per epoch, decoded, cropped to the training patch, lightly
augmented and given a sampled prompt. Every random choice is seeded by (seed, epoch, rank,
sample key), so a resumed run sees the same stream. Unreadable shards and malformed samples are
skipped, logged and counted in :data:`skip_stats`; the rest of the data still arrives.
Arrays are torch order [D, H, W]; see ``data_tools/shards.py`` for the sample layout.

Every pair reaches the network as ``register`` would hand it a scan of the same voxels: through
the preprocessing spec of the model being trained or evaluated (the trainer and evaluation pass
``model.config.preprocessing``, see :mod:`unireg.preprocessing`; a direct caller that passes none
gets the default ``UniRegConfig()``'s). :func:`on_working_grid` puts a
pair on the spec's working grid by the rule ``register`` uses: a shard at the model's working
spacing whose sizes are multiples of the level stride is used as stored (no copy, no cost);
a shard at another spacing (its ``meta.json`` ``spacing``, mm along D, H, W) is **resampled**
onto the working grid when it is loaded, as ``register`` resamples a scan: trilinear HU with air
outside, nearest labels. That costs CPU time on every load, and a warning says so once per
spacing: write shards at the model's ``working_spacing_mm`` (``unireg prepare ... --spacing``)
to avoid it. A sample without a usable ``spacing`` is malformed (skipped and counted). The
training loader does not apply ``max_working_size``: it crops ``patch_size`` instead.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import zlib
from dataclasses import dataclass
from collections import Counter

import numpy as np
import torch

from .config import UniRegConfig
from .modeling import affine_head
from .organ_presence import organs_in_both
from .preprocessing import HU_OUTSIDE, PreprocessingSpec, is_on_grid, on_grid, shard_image
from .prompt import Prompt

logger = logging.getLogger(__name__)

REQUIRED = ("fixed", "moving", "fixed_seg", "moving_seg")
#: An organ is prompted (and its Dice trained on) only where it has at least this many voxels in
#: both scans of the patch: the Dice of a structure one or two voxels wide is noise, not signal.
MIN_PROMPT_VOXELS = 125


class SkipStats:
    """Thread-safe counters of what was skipped and why (per process / worker)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, reason: str, detail: str) -> None:
        with self._lock:
            self.counts[reason] += 1
        logger.warning("skipped %s: %s", reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()


skip_stats = SkipStats()


def _skip_shard(exn: Exception) -> bool:
    skip_stats.add("unreadable shard", repr(exn))
    return True


def _skip_sample(exn: Exception) -> bool:
    skip_stats.add("malformed sample", repr(exn))
    return True


def decode_pair(sample: dict, extras: tuple[str, ...] = ("displacement",)) -> dict:
    """Raw tar members -> arrays + meta; raises ValueError naming what is wrong.

    ``extras`` are optional arrays decoded when present; training passes none, since the true
    displacement of an intra pair is the largest member of a sample and the loss never reads it.
    """
    from data_tools.shards import decode_array
    key = sample.get("__key__", "?")
    out = {"key": key, "url": sample.get("__url__", "")}
    for name in (*REQUIRED, *extras):
        ext = next((e for e in ("npy", "npz") if f"{name}.{e}" in sample), None)
        if ext is None:
            if name in REQUIRED:
                raise ValueError(f"sample {key} in {out['url']} has no {name} array")
            continue
        try:
            out[name] = decode_array(sample[f"{name}.{ext}"], ext)
        except Exception as exc:
            raise ValueError(f"sample {key}: cannot decode {name}.{ext} ({exc})") from None
    if "meta.json" not in sample:
        raise ValueError(f"sample {key} has no meta.json")
    out["meta"] = json.loads(sample["meta.json"])
    shapes = {out[k].shape for k in REQUIRED}
    if len(shapes) != 1 or len(out["fixed"].shape) != 3:
        raise ValueError(f"sample {key}: arrays must share one 3-D shape, got {shapes}")
    spacing = out["meta"].get("spacing")
    if not (isinstance(spacing, list) and len(spacing) == 3 and all(isinstance(v, (int, float)) and v > 0
                                                                    for v in spacing)):
        raise ValueError(f"sample {key}: meta.json needs 'spacing', three positive mm values along D, H, W "
                         f"(got {spacing!r}); write the shards with `unireg prepare shards`")
    return out


_warned_spacings: set = set()


def on_working_grid(arrays: dict, spacing, spec: PreprocessingSpec, capped: bool = True) -> tuple[dict, float]:
    """A pair's arrays (tensor order, one grid at ``spacing`` mm) on ``spec``'s working grid.

    Returns the arrays (images as HU, ``*_seg`` label maps in their stored dtype) and the grid's
    spacing in mm; see the module docstring for when this resamples."""
    images = {name: shard_image(array, spacing) for name, array in arrays.items()}
    grid = spec.grid(images["fixed"], capped)
    if not is_on_grid(images["fixed"], grid) and (tuple(spacing), grid.spacing) not in _warned_spacings:
        _warned_spacings.add((tuple(spacing), grid.spacing))
        logger.warning("shards at %s mm (here %s voxels) are resampled onto the model's working grid (%g mm, sizes "
                       "multiples of %d) on every load; write them so to skip this",
                       "x".join(f"{s:g}" for s in spacing), "x".join(map(str, arrays["fixed"].shape)), grid.spacing,
                       spec.divisor)
    out = {}
    for name, image in images.items():
        labels = name.endswith("_seg")
        placed = on_grid(image, grid, labels)
        out[name] = placed.astype(arrays[name].dtype, copy=False) if labels else placed
    return out, grid.spacing


def _rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def _crop(arrays: dict, patch, rng) -> tuple[dict, np.ndarray]:
    """One window of ``patch`` voxels (air-padded where the grid is smaller) from every array, and the
    window's origin in the uncropped grid's voxels."""
    shape = arrays["fixed"].shape
    pads = [max(0, p - n) for p, n in zip(patch, shape)]
    starts = [int(rng.integers(0, max(1, n + pad - p + 1))) for n, p, pad in zip(shape, patch, pads)]
    out = {}
    for k, a in arrays.items():
        fill = HU_OUTSIDE if k in ("fixed", "moving") else 0
        if any(pads):
            width = [(pad // 2, pad - pad // 2) for pad in pads]
            if a.ndim == 4:
                width = [(0, 0)] + width
            a = np.pad(a, width, constant_values=fill)
        sl = tuple(slice(s, s + p) for s, p in zip(starts, patch))
        out[k] = a[(...,) + sl]
    return out, np.array(starts, dtype=np.float64) - [pad // 2 for pad in pads]


@dataclass(frozen=True)
class PromptSampling:
    """How training prompts are drawn, so that naming an organ has to matter.

    A share of pairs gets the whole-body prompt (Dice on every organ, uniform similarity: the
    global objective); the others name one organ or a small group, and only those organs' Dice
    and neighbourhood count. ``zero_shot`` organs are never named in training (their Dice still
    counts under the whole-body prompt), so evaluation can measure prompting them by text alone.
    ``enabled=False`` names every present organ (task-specific style).
    """
    enabled: bool = True
    whole_body_prob: float = 0.25
    group_prob: float = 0.35
    max_group: int = 3
    zero_shot: tuple[str, ...] = ()

    def sample(self, present: list[str], rng: np.random.Generator) -> list[str]:
        """The organs the prompt names; [] is the whole-body prompt."""
        if not self.enabled:
            return list(present)
        candidates = [o for o in present if o not in self.zero_shot]
        if not candidates or rng.random() < self.whole_body_prob:
            return []
        k = 1
        if len(candidates) > 1 and rng.random() < self.group_prob:
            k = int(rng.integers(2, min(self.max_group, len(candidates)) + 1))
        return sorted(rng.choice(candidates, size=k, replace=False).tolist(), key=candidates.index)


def random_rigid(rng: np.random.Generator, rotation_deg: float, shift: float, extent, centre_jitter: float):
    """A random rigid motion: a rotation matrix R of up to ``rotation_deg`` about a random axis, a shift t of up to
    ``shift`` in a random direction and the rotation's centre c, ``extent`` / 2 +- ``centre_jitter`` x ``extent``
    (t, c and ``extent`` in one unit: mm or voxels). Shared by training's :class:`RigidMotion` and the
    known-motion pairs of ``data_tools.known_motion`` (whose pairs depend on this draw order)."""
    from scipy.spatial.transform import Rotation
    axis = rng.normal(size=3)
    rotation = Rotation.from_rotvec(np.deg2rad(rng.uniform(0, rotation_deg)) * axis / np.linalg.norm(axis))
    direction = rng.normal(size=3)
    translation = rng.uniform(0, shift) * direction / np.linalg.norm(direction)
    extent = np.asarray(extent, dtype=np.float64)
    centre = extent / 2 + rng.uniform(-centre_jitter, centre_jitter, 3) * extent
    return rotation.as_matrix(), translation, centre


@dataclass(frozen=True)
class RigidMotion:
    """Patient repositioning between a pair's two scans, added in training: with probability ``prob`` the
    moving scan (and its labels) is turned by up to ``rotation_deg`` about a random axis through a point
    near the grid's centre and shifted by up to ``translation_mm``.

    Phantom, head and synthetic pairs share one pose, so a network trained on them alone never learns
    a global motion: the shipped stage-5 model recovered 0.1 mm of a pure 4 mm shift of a real chest
    CT, and 0.6 mm of a 4 mm shift of a torso phantom, while every clinical intra-subject pair has one.
    Applied on the working grid (isotropic voxels, so a rotation of voxel indices is one in mm): HU
    trilinear with air outside, labels nearest. The motion drawn is returned as the truth a model's
    affine head can be taught with (``loss.affine_weight``): the similarity alone did not teach a head
    on frozen features to move (docs/experiments/affine_head/, rounds 3-4)."""
    prob: float = 0.0
    rotation_deg: float = 5.0
    translation_mm: float = 10.0
    centre_jitter: float = 0.2       # rotation centre: grid centre +- this fraction of the extent

    def apply(self, arrays: dict, spacing_mm: float, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
        """``arrays`` with ``moving`` and ``moving_seg`` moved, and the 4x4 voxel matrix taking a point of the
        moving scan to where the moved one shows it (for a pair of one scan, the fixed scan's). When no motion
        is drawn: ``arrays`` as given and the identity (no draw at all when ``prob`` is 0, so the random stream
        of a run without it is unchanged)."""
        if not self.prob or rng.random() >= self.prob:
            return arrays, np.eye(4)
        from scipy.ndimage import affine_transform
        extent = np.array(arrays["moving"].shape, dtype=np.float64) - 1                  # voxels
        rotation, shift, centre = random_rigid(rng, self.rotation_deg, self.translation_mm / float(spacing_mm),
                                               extent, self.centre_jitter)
        offset = centre - rotation @ centre + shift          # moved(x) = moving(R x + offset)
        out = dict(arrays)
        out["moving"] = affine_transform(arrays["moving"].astype(np.float32), rotation, offset, order=1,
                                         mode="constant", cval=HU_OUTSIDE)
        out["moving_seg"] = affine_transform(arrays["moving_seg"], rotation, offset, order=0, mode="constant", cval=0)
        moved_from_moving = np.eye(4)
        moved_from_moving[:3, :3], moved_from_moving[:3, 3] = rotation, offset
        return out, np.linalg.inv(moved_from_moving)         # moving's x shows in moved at R^-1 (x - offset)


def prepare_pair(sample: dict, patch_size, seed: int, epoch: int, prompt_sampling: "bool | PromptSampling", smoothness,
                 augment: bool,
                 identity_prob: float = 0.0, spec: PreprocessingSpec | None = None,
                 rigid_motion: RigidMotion | None = None) -> dict:
    """Put on the working grid, crop, augment and prompt one pair -> the training sample.

    Returns ``fixed``/``moving`` [1,D,H,W] in [0, 1], ``fixed_seg``/``moving_seg`` [1,D,H,W] label
    ids, ``prompt`` (a :class:`~unireg.prompt.Prompt`: the pair's type, the sampled organs, λ drawn
    from ``smoothness`` when given), ``organs`` (the organs whose Dice is trained: the named ones, or
    every present organ for the whole-body prompt; see :class:`PromptSampling`) and
    ``key``. With probability ``identity_prob`` the pair becomes (fixed, fixed): the network must
    learn that identical scans need no deformation, or it can settle on a content-independent mean
    field that it applies to every pair. ``spec`` is the trained model's preprocessing (the default
    model's when not given): its working grid, uncapped, and its HU window. ``rigid_motion`` then moves
    the moving scan rigidly (:class:`RigidMotion`; an identity pair becomes a purely rigid one), and
    ``motion`` [3,4] is that motion as an affine head's target (normalised coordinates of the returned grid,
    the identity when none was drawn)."""
    spec = spec or UniRegConfig().preprocessing
    rng = _rng(seed, epoch, sample["key"])
    arrays, spacing = on_working_grid({k: sample[k] for k in REQUIRED}, sample["meta"]["spacing"], spec, capped=False)
    if identity_prob and rng.random() < identity_prob:
        arrays["moving"], arrays["moving_seg"] = arrays["fixed"], arrays["fixed_seg"]
    motion = np.eye(4)
    if rigid_motion is not None:
        arrays, motion = rigid_motion.apply(arrays, spacing, rng)
    if patch_size is not None:
        arrays, origin = _crop(arrays, patch_size, rng)
        to_crop = np.eye(4)
        to_crop[:3, 3] = -origin
        motion = to_crop @ motion @ np.linalg.inv(to_crop)
    fixed = arrays["fixed"].astype(np.float32)
    moving = arrays["moving"].astype(np.float32)
    if augment:  # mild scanner differences; no flips: they would swap left and right organs
        fixed = fixed * rng.uniform(0.97, 1.03) + rng.uniform(-20, 20)
        moving = moving * rng.uniform(0.97, 1.03) + rng.uniform(-20, 20)
    present = organs_in_both(arrays["fixed_seg"], arrays["moving_seg"], MIN_PROMPT_VOXELS,
                             among=sample["meta"].get("organs", []))
    sampling = prompt_sampling if isinstance(prompt_sampling, PromptSampling) else PromptSampling(bool(prompt_sampling))
    named = sampling.sample(present, rng)
    # λ at the precision a user writes it ("smooth=0.35"), so training sees the values prompts can say.
    lam = round(float(rng.uniform(*smoothness)), 2) if smoothness else None
    prompt = Prompt(type=sample["meta"].get("type", "inter"), organs=tuple(named), smoothness=lam)
    return {"fixed": spec.network_input(fixed)[None], "moving": spec.network_input(moving)[None],
            "fixed_seg": _label_tensor(arrays["fixed_seg"])[None], "moving_seg": _label_tensor(arrays["moving_seg"])[None],
            "motion": affine_head.from_index_matrix(motion, fixed.shape).float(),
            "organs": named or present, "prompt": prompt, "key": sample["key"],
            # whether label ids name the organs they stand for: a synthetic pair's are random draws per pair
            # (data_tools/synth.py), fine for Dice, meaningless for learning where an organ is
            "anatomical": torch.tensor(sample["meta"].get("source") != "synth")}


def _label_tensor(labels: np.ndarray) -> torch.Tensor:
    """Label ids as stored (uint8 in shards) rather than int64: 8x fewer bytes from the loader
    workers to the trainer and onto the device; the objective only compares them with organ ids."""
    if labels.dtype not in (np.uint8, np.int16, np.int32, np.int64):
        labels = labels.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(labels))


def collate(samples: list[dict]) -> dict:
    """Tensors stacked along a batch axis; prompts, organ lists and keys as lists."""
    shapes = {tuple(s["fixed"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"pairs of different sizes in one batch ({', '.join(str(list(t[1:])) for t in sorted(shapes))}"
                         f" on the working grid; keys {[s['key'] for s in samples]}): set data.patch_size to crop "
                         f"them to one size, or train with a micro-batch of 1")
    return {k: torch.stack([s[k] for s in samples]) if torch.is_tensor(samples[0][k]) else [s[k] for s in samples]
            for k in samples[0]}


def _shard_list(urls, seed: int, epoch: int, shuffle: bool) -> list[str]:
    if isinstance(urls, str):
        import braceexpand
        urls = list(braceexpand.braceexpand(urls))
    urls = list(urls)
    if shuffle:
        random.Random(seed * 100003 + epoch).shuffle(urls)
    return urls


def _rank() -> int:
    from webdataset.utils import pytorch_worker_info
    rank, _, worker, _ = pytorch_worker_info()
    return rank * 1000 + worker


def build_pipeline(urls, batch_size: int | None, patch_size=None, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                   prompt_sampling: "bool | PromptSampling" = True, smoothness=None, augment: bool = True,
                   shuffle_buffer: int = 8,
                   identity_prob: float = 0.0, spec: PreprocessingSpec | None = None,
                   rigid_motion: RigidMotion | None = None):
    import webdataset as wds
    stages = [wds.SimpleShardList(_shard_list(urls, seed, epoch, shuffle)), wds.split_by_node, wds.split_by_worker,
              wds.tarfile_to_samples(handler=_skip_shard),
              wds.map(lambda s: decode_pair(s, extras=()), handler=_skip_sample)]
    if shuffle:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer,
                                  rng=_LazyRng(seed, epoch)))
    stages.append(wds.map(lambda s: prepare_pair(s, patch_size, seed, epoch, prompt_sampling, smoothness, augment,
                                                identity_prob, spec, rigid_motion),
                          handler=_skip_sample))
    if batch_size:
        stages.append(wds.batched(batch_size, collation_fn=collate, partial=False))
    return wds.DataPipeline(*stages)


class _LazyRng(random.Random):
    """Sample-shuffle RNG seeded on first use, inside the worker, by (seed, epoch, rank, worker)."""

    def __init__(self, seed: int, epoch: int):
        super().__init__(0)
        self._base, self._ready = (seed, epoch), False

    def random(self):
        if not self._ready:
            self.seed(hash((*self._base, _rank())))
            self._ready = True
        return super().random()


def make_loader(urls, batch_size: int, patch_size=(64, 64, 64), seed: int = 0, epoch: int = 0, num_workers: int = 0,
                shuffle: bool = True, prompt_sampling: "bool | PromptSampling" = True, smoothness=(0.0, 1.0),
                augment: bool = True,
                shuffle_buffer: int = 8, identity_prob: float = 0.0, spec: PreprocessingSpec | None = None,
                rigid_motion: RigidMotion | None = None):
    """Batches for one epoch of this rank's share of the shards, preprocessed by ``spec`` (the trained
    model's ``config.preprocessing``; see the module docstring) and moved by ``rigid_motion``."""
    pipeline = build_pipeline(urls, batch_size, patch_size, seed, epoch, shuffle, prompt_sampling, smoothness,
                              augment, shuffle_buffer, identity_prob, spec, rigid_motion)
    if num_workers == 0:
        return pipeline
    import webdataset as wds
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=False)


def iterate_pairs(urls):
    """Full-size decoded pairs (numpy arrays + meta), in shard order, for evaluation."""
    import webdataset as wds
    pipeline = wds.DataPipeline(wds.SimpleShardList(_shard_list(urls, 0, 0, False)),
                                wds.tarfile_to_samples(handler=_skip_shard), wds.map(decode_pair, handler=_skip_sample))
    yield from pipeline
