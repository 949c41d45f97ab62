"""`unireg prepare phantom | dataset | shards` (also ``python -m data_tools.cli prepare ...``).

The verbs are thin: each calls one function with explicit arguments
(``phantom.write_phantom_dataset``, ``prepare.prepare_dataset``, ``shards.shards_from_pairs`` /
``shards.make_phantom_shards``) and prints a one-line summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _phantom(args) -> int:
    from .phantom import write_phantom_dataset
    result = write_phantom_dataset(args.out, n_subjects=args.subjects, shape=tuple(args.shape),
                                   spacing=tuple(args.spacing), intra_per_subject=args.intra_per_subject,
                                   seed=args.seed, montage=not args.no_png)
    print(f"wrote {args.subjects} phantom subjects (+{args.intra_per_subject} breathing phases each) and "
          f"pairs.json {_split_counts(result['pairs'])} to {args.out}")
    return 0


def _dataset(args) -> int:
    from .prepare import prepare_dataset
    result = prepare_dataset(args.layout, args.root, args.out, spacing=tuple(args.spacing), seed=args.seed)
    print(json.dumps({"scans": len(result["scans"]), "skipped": len(result["skipped"]),
                      "skipped_scans": result["skipped"], "pairs": _split_counts(result["pairs"])}, indent=1))
    return 0


def _shards(args) -> int:
    from .shards import make_phantom_shards, shards_from_pairs
    if args.from_pairs:
        index = shards_from_pairs(args.from_pairs, args.out, split=args.split, max_shard_bytes=args.max_shard_mb * 1e6,
                                  encoding=args.encoding)
    else:
        index = make_phantom_shards(args.out, n_subjects=args.phantom_subjects, shape=tuple(args.shape),
                                    spacing=tuple(args.spacing), seed=args.seed, intra_per_subject=args.intra_per_subject,
                                    inter_pairs=args.inter_pairs, max_shard_bytes=args.max_shard_mb * 1e6,
                                    encoding=args.encoding)
    print(json.dumps(index["counts"]), f"-> {len(index['shards'])} shards in {args.out}")
    return 0


def _split_counts(pairs: list[dict]) -> dict:
    return {s: sum(p["split"] == s for p in pairs) for s in ("train", "val", "test")}


def add_prepare_parser(subparsers) -> None:
    prepare = subparsers.add_parser("prepare", help="make phantom data, prepare real data, write shards")
    sub = prepare.add_subparsers(dest="what", required=True)

    p = sub.add_parser("phantom", help="CT-like torso phantoms as NIfTI (+ breathing phases, true fields)")
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96], help="D H W voxels")
    p.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0], help="mm along D H W")
    p.add_argument("--intra-per-subject", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-png", action="store_true")
    p.set_defaults(func=_phantom)

    d = sub.add_parser("dataset", help="TotalSegmentator / Learn2Reg / CSV -> prepared scans + pairs.json")
    d.add_argument("--layout", required=True, choices=["totalsegmentator", "learn2reg", "csv"])
    d.add_argument("--root", required=True, help="data set folder (or the CSV file)")
    d.add_argument("--out", required=True)
    d.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.0])
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_dataset)

    s = sub.add_parser("shards", help="WebDataset pair shards from a pairs.json or from new phantoms")
    s.add_argument("--out", required=True)
    s.add_argument("--from-pairs", help="pairs.json written by `unireg prepare dataset` or `unireg prepare phantom`")
    s.add_argument("--split", choices=["train", "val", "test"], help="only pairs of this split")
    s.add_argument("--phantom-subjects", type=int, default=8)
    s.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96])
    s.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0])
    s.add_argument("--intra-per-subject", type=int, default=1)
    s.add_argument("--inter-pairs", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-shard-mb", type=float, default=256.0)
    s.add_argument("--encoding", choices=["npy", "npz"], default="npy")
    s.set_defaults(func=_shards)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="data_tools")
    add_prepare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .prepare import PreparationError
    try:
        return int(args.func(args) or 0)
    except (PreparationError, FileNotFoundError, ValueError) as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
