"""`unireg prepare phantom | dataset | shards` (also ``python -m data_tools.cli prepare ...``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _phantom(args) -> int:
    from .phantom import make_intra_pair, make_subject, save_displacement, save_subject
    out = Path(args.out)
    for i in range(args.subjects):
        subject = make_subject(args.seed * 1000 + i, shape=args.shape, spacing_mm=args.spacing)
        save_subject(subject, out, f"subject_{i:03d}", montage=not args.no_png)
        for j in range(args.intra_per_subject):
            moving, disp = make_intra_pair(subject, args.seed * 1000 + 500 + i * 10 + j)
            save_subject(moving, out, f"subject_{i:03d}_phase{j}", montage=False)
            save_displacement(disp, subject, out / f"subject_{i:03d}_phase{j}_true_displacement.nii.gz")
    print(f"wrote {args.subjects} phantom subjects (+{args.intra_per_subject} breathing phases each) to {out}")
    return 0


def _dataset(args) -> int:
    from .prepare import prepare_dataset
    result = prepare_dataset(args.layout, args.root, args.out, spacing=tuple(args.spacing), seed=args.seed)
    counts = {s: sum(p["split"] == s for p in result["pairs"]) for s in ("train", "val", "test")}
    print(json.dumps({"scans": len(result["scans"]), "skipped": result["skipped"], "pairs": counts}, indent=1))
    return 0


def _shards(args) -> int:
    from .shards import make_phantom_shards, prepared_pairs, write_shards
    if args.from_pairs:
        index = write_shards(prepared_pairs(args.from_pairs, args.split), args.out, args.max_shard_mb * 1e6,
                             args.encoding, {"split": args.split})
    else:
        index = make_phantom_shards(args.out, n_subjects=args.phantom_subjects, shape=tuple(args.shape),
                                    spacing=tuple(args.spacing), seed=args.seed, intra_per_subject=args.intra_per_subject,
                                    inter_pairs=args.inter_pairs, max_shard_bytes=args.max_shard_mb * 1e6,
                                    encoding=args.encoding)
    print(json.dumps(index["counts"]), f"-> {len(index['shards'])} shards in {args.out}")
    return 0


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
    s.add_argument("--from-pairs", help="pairs.json written by `unireg prepare dataset`")
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
    from .prepare import PreparationError
    try:
        return int(args.func(args) or 0)
    except (PreparationError, FileNotFoundError, ValueError) as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
