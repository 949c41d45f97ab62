"""WebDataset pair shards: ``pairs-%06d.tar`` + ``index.json``.

One sample per pair: ``fixed.npy`` / ``moving.npy`` (int16 HU), ``fixed_seg.npy`` /
``moving_seg.npy`` (uint8 TotalSegmentator ids), ``meta.json`` (type, organs present in both,
spacing, subject ids, source, split) and, when known, ``displacement.npy`` (float32 voxels,
(dz, dy, dx), the true field with ``fixed(x) = moving(x + d(x))``). Arrays are in torch order
[D, H, W]. ``spacing`` (mm along D, H, W) is required: the loader puts every pair on the trained
model's working grid from it (see :mod:`unireg.data`), as stored when it already is one. Arrays
are stored as raw ``.npy``: ``bench/data_loading.py`` measures the trade-off (zlib-compressed
``.npz`` is ~3-4x smaller but decodes several times slower, and decode speed is what keeps
training fed); pass ``encoding="npz"`` where storage matters more.

Shards are written under a temporary folder inside ``out_dir`` and moved into place only when
every pair has been written, ``index.json`` last: a failure (a corrupt scan, a full disk) leaves
the earlier content of ``out_dir`` as it was, never a partial set of shards.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from unireg.io import ijk_to_tensor_order
from unireg.organ_presence import organs_in_both
from unireg.organs import ORGANS
from unireg.preprocessing import to_stored_hu

from .prepare import PreparationError

logger = logging.getLogger(__name__)

ARRAY_KEYS = ("fixed", "moving", "fixed_seg", "moving_seg")
DTYPES = {"fixed": np.int16, "moving": np.int16, "fixed_seg": np.uint8, "moving_seg": np.uint8,
          "displacement": np.float32}


def encode_array(array: np.ndarray, encoding: str) -> bytes:
    buf = io.BytesIO()
    if encoding == "npy":
        np.save(buf, array, allow_pickle=False)
    elif encoding == "npz":
        np.savez_compressed(buf, a=array)
    else:
        raise ValueError(f"unknown array encoding {encoding!r}; use 'npy' or 'npz'")
    return buf.getvalue()


def decode_array(data: bytes, extension: str) -> np.ndarray:
    if extension == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if extension == "npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return z["a"]
    raise ValueError(f"unknown array encoding .{extension}")


def pair_sample(key: str, pair: dict, encoding: str = "npy") -> dict:
    """Pair dict (arrays + meta) -> webdataset sample dict of bytes."""
    missing = [k for k in ARRAY_KEYS if k not in pair]
    if missing:
        raise PreparationError(f"pair {key}: missing arrays {missing}")
    shape = pair["fixed"].shape
    for k in ARRAY_KEYS:
        if pair[k].shape != shape:
            raise PreparationError(f"pair {key}: {k} has shape {pair[k].shape}, fixed has {shape}; resample first")
    spacing = pair.get("meta", {}).get("spacing")
    if spacing is None or len(spacing) != 3 or min(spacing) <= 0:
        raise PreparationError(f"pair {key}: meta needs 'spacing', three positive mm values along D, H, W "
                               f"(got {spacing!r}); the loader resamples by it")
    sample = {"__key__": key}
    for k in (*ARRAY_KEYS, "displacement"):
        if pair.get(k) is not None:
            sample[f"{k}.{encoding}"] = encode_array(np.ascontiguousarray(pair[k]).astype(DTYPES[k]), encoding)
    meta = {"organs": organs_in_both(pair["fixed_seg"], pair["moving_seg"]), **pair.get("meta", {})}
    meta["shape"], meta["spacing"] = list(shape), [float(v) for v in spacing]
    sample["meta.json"] = json.dumps(meta).encode()
    return sample


def write_shards(pairs: Iterable[tuple[str, dict]], out_dir: "str | Path", max_shard_bytes: float = 256e6,
                 encoding: str = "npy", extra_index: dict | None = None) -> dict:
    """Write (key, pair) items into ``out_dir/pairs-%06d.tar`` and ``index.json``; returns the index.

    The shards of an earlier run in ``out_dir`` are replaced only once the new set is complete;
    an empty pair list is a PreparationError (a trainer would otherwise start on no data)."""
    import webdataset as wds
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"pairs": 0, "inter": 0, "intra": 0}
    organs, spacings = set(), set()
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    try:
        with wds.ShardWriter(str(staging / "pairs-%06d.tar"), maxsize=max_shard_bytes, verbose=0) as sink:
            for key, pair in pairs:
                sample = pair_sample(key, pair, encoding)
                meta = json.loads(sample["meta.json"])
                sink.write(sample)
                counts["pairs"] += 1
                counts[meta.get("type", "inter")] = counts.get(meta.get("type", "inter"), 0) + 1
                organs.update(meta["organs"])
                if "spacing" in meta:
                    spacings.add(tuple(meta["spacing"]))
        if counts["pairs"] == 0:
            raise PreparationError(f"no pairs to write to {out} (is the pair list or the chosen split empty?)")
        shards = sorted(p.name for p in staging.glob("pairs-*.tar"))
        index = {"shards": shards, "counts": counts, "encoding": encoding,
                 "organs": [o for o in ORGANS if o in organs], "spacing": sorted(spacings), **(extra_index or {})}
        for old in [out / "index.json", *out.glob("pairs-*.tar")]:
            old.unlink(missing_ok=True)                    # the index first: a half-replaced set is never indexed
        for name in shards:
            os.replace(staging / name, out / name)
        (staging / "index.json").write_text(json.dumps(index, indent=1))
        os.replace(staging / "index.json", out / "index.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %d pairs (%d intra, %d inter) in %d shards to %s", counts["pairs"], counts["intra"],
                counts["inter"], len(shards), out)
    return index


def phantom_pairs(n_subjects: int, shape=(96, 96, 96), spacing=(4.0, 4.0, 4.0), seed: int = 0,
                  intra_per_subject: int = 1, inter_pairs: int | None = None):
    """(key, pair) items from generated phantoms: intra pairs with their true field, inter pairs."""
    from data_tools.phantom import make_intra_pair, make_subject, phase_seed, subject_seed
    rng = np.random.default_rng(seed)
    subjects = [make_subject(subject_seed(seed, i), shape=shape, spacing_mm=spacing) for i in range(n_subjects)]
    base = {"spacing": list(spacing), "source": "phantom"}
    for i, s in enumerate(subjects):
        for j in range(intra_per_subject):
            moving, disp = make_intra_pair(s, phase_seed(seed, i, j))
            yield f"phantom-s{seed}-{i:04d}-intra{j}", {
                "fixed": s.image, "moving": moving.image, "fixed_seg": s.labels, "moving_seg": moving.labels,
                "displacement": disp,
                "meta": {**base, "type": "intra", "fixed_id": f"s{seed}-{i}", "moving_id": f"s{seed}-{i}-phase{j}"}}
    n_inter = n_subjects if inter_pairs is None else inter_pairs
    if n_subjects > 1:
        for k in range(n_inter):
            a, b = rng.choice(n_subjects, size=2, replace=False)
            yield f"phantom-s{seed}-inter{k:04d}", {
                "fixed": subjects[a].image, "moving": subjects[b].image,
                "fixed_seg": subjects[a].labels, "moving_seg": subjects[b].labels,
                "meta": {**base, "type": "inter", "fixed_id": f"s{seed}-{a}", "moving_id": f"s{seed}-{b}"}}


def make_phantom_shards(out_dir: "str | Path", n_subjects: int = 6, shape=(48, 48, 48), spacing=(8.0, 8.0, 8.0),
                        seed: int = 0, intra_per_subject: int = 1, inter_pairs: int | None = None,
                        max_shard_bytes: float = 256e6, encoding: str = "npy") -> dict:
    """Phantom pairs straight into shards (used by tests, the demo and the shipped model's run)."""
    if n_subjects < 1 or intra_per_subject < 0 or (inter_pairs or 0) < 0:
        raise PreparationError("phantom shards need --phantom-subjects >= 1 and non-negative pair counts")
    pairs = phantom_pairs(n_subjects, shape, spacing, seed, intra_per_subject, inter_pairs)
    return write_shards(pairs, out_dir, max_shard_bytes, encoding)


def training_mix(phantom_subjects: int = 8, head_subjects: int = 0, synth_pairs: int = 0, shape=(64, 64, 64),
                 spacing=(4.0, 4.0, 4.0), seed: int = 0, intra_per_subject: int = 1, inter_pairs: int | None = None,
                 ct_augment: float = 0.0, organ_motion_subjects: int = 0):
    """(key, pair) items mixing torso phantoms, head-and-neck phantoms, SynthMorph-style synthetic
    pairs and organ-motion pairs (organs sliding apart: what makes a prompt matter, see
    ``data_tools.organ_motion``), each scan CT-augmented (dose noise, slice thickness, contrast
    phase, table, streaks, truncated field of view) with probability ``ct_augment``.

    ``inter_pairs`` applies to each phantom family (default: one per subject); organ-motion
    subjects give ``intra_per_subject`` pairs each."""
    if min(phantom_subjects, head_subjects, synth_pairs, intra_per_subject, organ_motion_subjects) < 0 \
            or (inter_pairs or 0) < 0:
        raise PreparationError("training shards need non-negative subject and pair counts")
    if not 0 <= ct_augment <= 1:
        raise PreparationError(f"--ct-augment is a probability in [0, 1], got {ct_augment}")
    from data_tools.ct_augment import augment_pair
    from data_tools.head_phantom import head_phantom_pairs
    from data_tools.synth import synth_pairs as synthetic
    sources = []
    if phantom_subjects:
        sources.append(phantom_pairs(phantom_subjects, shape, spacing, seed, intra_per_subject, inter_pairs))
    if head_subjects:
        sources.append(head_phantom_pairs(head_subjects, shape, spacing, seed, intra_per_subject, inter_pairs))
    if synth_pairs:
        sources.append(synthetic(synth_pairs, seed, shape, spacing))
    if organ_motion_subjects:
        from data_tools.organ_motion import organ_motion_pairs
        sources.append(organ_motion_pairs(organ_motion_subjects, shape, spacing, seed, max(1, intra_per_subject)))
    if not sources:
        raise PreparationError("nothing to write: give phantom, head, synthetic or organ-motion pairs")
    rng = np.random.default_rng([seed, 31])
    for source in sources:
        for key, pair in source:
            if ct_augment and rng.random() < ct_augment:
                pair = augment_pair(pair, rng)
                pair["meta"] = {**pair["meta"], "ct_augmented": True}
            yield key, pair


def shards_from_pairs(pairs_json: "str | Path", out_dir: "str | Path", split: str | None = None,
                      max_shard_bytes: float = 256e6, encoding: str = "npy") -> dict:
    """``pairs.json`` (from ``prepare dataset`` or ``prepare phantom``) -> shards of one split (or all)."""
    return write_shards(prepared_pairs(pairs_json, split), out_dir, max_shard_bytes, encoding,
                        {"split": split} if split else None)


def prepared_pairs(pairs_json: "str | Path", split: str | None = None):
    """(key, pair) items from a ``pairs.json``, moving put onto the fixed grid.

    Paths in the file are relative to its folder (absolute ones are kept). Intra-subject pairs are
    related through their world coordinates; inter-subject scans share no coordinate system, so
    the moving scan is centred on the fixed one first (the usual initialisation before deformable
    inter-subject registration). A pair with a ``displacement`` file (phantom breathing phases)
    carries its true field. A file that cannot be read is a PreparationError naming it.
    """
    import nibabel as nib
    from nibabel.processing import resample_from_to
    pairs_json = Path(pairs_json)
    info = _read_pairs_json(pairs_json)
    if split and not any(p.get("split") == split for p in info["pairs"]):
        splits = sorted({str(p.get("split")) for p in info["pairs"]})
        raise PreparationError(f"{pairs_json} has no pair in split {split!r} (its splits: {', '.join(splits)})")
    folder = pairs_json.parent

    def load(path, what):
        full = folder / path
        try:
            img = nib.load(str(full))
            return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
        except Exception as exc:
            raise PreparationError(f"{what} {full} is not a readable NIfTI ({type(exc).__name__}: {exc})") from None

    for p in info["pairs"]:
        if split and p["split"] != split:
            continue
        fixed, fixed_lab = load(p["fixed"], "fixed scan"), load(p["fixed_labels"], "fixed labels")
        moving, moving_lab = load(p["moving"], "moving scan"), load(p["moving_labels"], "moving labels")
        if p["type"] == "inter":
            shift = _centre(fixed) - _centre(moving)
            moved = moving.affine.copy()
            moved[:3, 3] += shift
            moving = nib.Nifti1Image(np.asanyarray(moving.dataobj), moved)
            moving_lab = nib.Nifti1Image(np.asanyarray(moving_lab.dataobj), moved)
        moving = resample_from_to(moving, fixed, order=1, cval=-1024)
        moving_lab = resample_from_to(moving_lab, fixed, order=0)
        arrays = lambda img: ijk_to_tensor_order(np.asanyarray(img.dataobj))  # noqa: E731
        pair = {"fixed": arrays(fixed).astype(np.int16), "moving": to_stored_hu(arrays(moving)),
                "fixed_seg": arrays(fixed_lab).astype(np.uint8), "moving_seg": arrays(moving_lab).astype(np.uint8),
                "meta": {"type": p["type"], "spacing": [float(s) for s in fixed.header.get_zooms()[:3]][::-1],
                         "fixed_id": p["fixed_id"], "moving_id": p["moving_id"], "source": p.get("source", ""),
                         "split": p["split"]}}
        if p.get("displacement"):
            from data_tools.phantom import load_displacement
            try:
                pair["displacement"] = load_displacement(folder / p["displacement"])
            except Exception as exc:
                raise PreparationError(f"true displacement {folder / p['displacement']} is unreadable ({exc})") from None
        yield f"{p['fixed_id']}--{p['moving_id']}".replace(".", "_"), pair


def _read_pairs_json(path: Path) -> dict:
    if not path.is_file():
        raise PreparationError(f"{path} not found (write it with `unireg prepare dataset` or `unireg prepare phantom`)")
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PreparationError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("pairs"), list):
        raise PreparationError(f"{path} has no 'pairs' list; is it a pairs.json written by `unireg prepare`?")
    return info


def _centre(img) -> np.ndarray:
    return (img.affine @ np.append((np.array(img.shape[:3]) - 1) / 2, 1))[:3]
