"""Pairs per second from WebDataset shards vs the same pairs from per-file .nii.gz (nibabel).

    python bench/data_loading.py [--pairs 24] [--size 96] [--patch 64]

Both paths do the same work after reading: HU normalisation, the same random crop, the same
prompt sampling (``unireg.data.prepare_pair``). Also prints the shard size of the raw ``.npy``
and zlib ``.npz`` encodings and the time to generate one 128^3 phantom subject.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_tools.phantom import make_subject  # noqa: E402
from data_tools.shards import phantom_pairs, write_shards  # noqa: E402
from unireg.data import iterate_pairs, make_loader, prepare_pair  # noqa: E402
from unireg.io import ijk_to_tensor_order  # noqa: E402
from unireg.organ_presence import organs_in_both  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--patch", type=int, default=64)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}")
    start = time.perf_counter()
    make_subject(0, shape=(128, 128, 128), spacing_mm=(3.0, 3.0, 3.0))
    print(f"one 128^3 phantom subject: {time.perf_counter() - start:.2f} s")

    shape, spacing = (args.size,) * 3, (384.0 / args.size,) * 3
    pairs = list(phantom_pairs(max(2, args.pairs // 2), shape, spacing, seed=0, intra_per_subject=1,
                               inter_pairs=args.pairs - max(2, args.pairs // 2)))
    patch = (args.patch,) * 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = {}
        for encoding in ("npy", "npz"):
            write_shards(iter(pairs), tmp / encoding, encoding=encoding, max_shard_bytes=64e6)
            sizes[encoding] = sum(p.stat().st_size for p in (tmp / encoding).glob("*.tar")) / 1e6
        nifti = tmp / "nifti"
        nifti.mkdir()
        affine = np.diag([*spacing, 1.0])
        for key, pair in pairs:
            for name in ("fixed", "moving", "fixed_seg", "moving_seg"):
                nib.save(nib.Nifti1Image(ijk_to_tensor_order(pair[name]), affine), nifti / f"{key}_{name}.nii.gz")

        def from_shards(encoding):
            urls = sorted(str(p) for p in (tmp / encoding).glob("*.tar"))
            return sum(len(b["key"]) for b in make_loader(urls, 1, patch, shuffle=False, augment=True))

        def from_nifti():
            n = 0
            for key, pair in pairs:
                arrays = {name: ijk_to_tensor_order(np.asanyarray(nib.load(nifti / f"{key}_{name}.nii.gz").dataobj))
                          for name in ("fixed", "moving", "fixed_seg", "moving_seg")}
                meta = {**pair["meta"], "organs": organs_in_both(arrays["fixed_seg"], arrays["moving_seg"])}
                prepare_pair({"key": key, **arrays, "meta": meta}, patch, 0, 0, True, (0.0, 1.0), True)
                n += 1
            return n

        rates = {}
        for name, fn in (("shards .npy", lambda: from_shards("npy")), ("shards .npz", lambda: from_shards("npz")),
                         ("nifti .nii.gz", from_nifti)):
            fn()  # warm the page cache so both read from memory
            start = time.perf_counter()
            n = fn()
            rates[name] = n / (time.perf_counter() - start)
        assert sum(1 for _ in iterate_pairs(sorted(str(p) for p in (tmp / "npy").glob("*.tar")))) == len(pairs)
    print(f"{len(pairs)} pairs of {args.size}^3, crop {args.patch}^3")
    print(f"shard size: npy {sizes['npy']:.1f} MB, npz {sizes['npz']:.1f} MB ({sizes['npy'] / sizes['npz']:.1f}x smaller)")
    for name, rate in rates.items():
        print(f"{name:<14} {rate:8.1f} pairs/s")
    print(f"ratio shards(.npy) / nifti: {rates['shards .npy'] / rates['nifti .nii.gz']:.1f}x")
    print(f"ratio shards(.npz) / nifti: {rates['shards .npz'] / rates['nifti .nii.gz']:.1f}x")


if __name__ == "__main__":
    main()
