"""`unireg prepare phantom | dataset | shards`: training data, from phantoms or real data sets."""
from __future__ import annotations

import json

from ..errors import UserError
from .common import add_verb

SPACING_HINT = ("the model's working_spacing_mm (isotropic) lets shards load as stored; at another spacing the "
                "loader resamples every pair onto the model's working grid")


def add_parser(subparsers) -> None:
    prepare = add_verb(subparsers, "prepare", "make phantom data, prepare real data sets, write pair shards", None,
                       long_running=True)
    sub = prepare.add_subparsers(dest="what", required=True, metavar="phantom|dataset|shards")

    p = add_verb(sub, "phantom", "CT-like torso phantoms as NIfTI (+ breathing phases, true fields)", run_phantom,
                 long_running=True)
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96], help="D H W voxels")
    p.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0], help="mm along D H W")
    p.add_argument("--intra-per-subject", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-png", action="store_true")

    d = add_verb(sub, "dataset", "TotalSegmentator / Learn2Reg / CSV -> prepared scans + pairs.json", run_dataset,
                 long_running=True)
    d.add_argument("--layout", required=True, choices=["totalsegmentator", "learn2reg", "csv"])
    d.add_argument("--root", required=True, help="data set folder (or the CSV file)")
    d.add_argument("--out", required=True)
    d.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.0],
                   help=f"mm along D H W; {SPACING_HINT}")
    d.add_argument("--seed", type=int, default=0)

    s = add_verb(sub, "shards", "WebDataset pair shards from a pairs.json or from new phantoms", run_shards,
                 long_running=True)
    s.add_argument("--out", required=True)
    s.add_argument("--from-pairs", help="pairs.json written by `unireg prepare dataset` or `prepare phantom`")
    s.add_argument("--split", choices=["train", "val", "test"], help="only pairs of this split")
    s.add_argument("--phantom-subjects", type=int, default=8, help="torso phantom subjects")
    s.add_argument("--head-subjects", type=int, default=0, help="head-and-neck phantom subjects")
    s.add_argument("--synth-pairs", type=int, default=0, help="SynthMorph-style synthetic pairs (random label maps)")
    s.add_argument("--organ-motion-subjects", type=int, default=0,
                   help="phantom subjects whose organs slide apart (--intra-per-subject pairs each): prompts matter there")
    s.add_argument("--known-motion", metavar="CSV",
                   help="real scans (csv layout: image, label, subject; label may be empty) each seen through "
                        "random known motions (rigid + smooth field): pairs with a true field from your own CT")
    s.add_argument("--known-motion-pairs", type=int, default=8, help="pairs per scan of --known-motion")
    s.add_argument("--ct-augment", type=float, default=0.0,
                   help="probability that a pair's scans get CT appearance augmentation (noise, thickness, contrast, ...)")
    s.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96])
    s.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0],
                   help=f"phantom mm along D H W; {SPACING_HINT}")
    s.add_argument("--intra-per-subject", type=int, default=1)
    s.add_argument("--inter-pairs", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-shard-mb", type=float, default=256.0)
    s.add_argument("--encoding", choices=["npy", "npz"], default="npy")


def run_phantom(args) -> int:
    from data_tools.phantom import write_phantom_dataset
    result = write_phantom_dataset(args.out, n_subjects=args.subjects, shape=tuple(args.shape),
                                   spacing=tuple(args.spacing), intra_per_subject=args.intra_per_subject,
                                   seed=args.seed, montage=not args.no_png)
    print(f"wrote {args.subjects} phantom subjects (+{args.intra_per_subject} breathing phases each) and "
          f"pairs.json {_split_counts(result['pairs'])} to {args.out}")
    return 0


def run_dataset(args) -> int:
    from data_tools.prepare import prepare_dataset
    result = prepare_dataset(args.layout, args.root, args.out, spacing=tuple(args.spacing), seed=args.seed)
    print(json.dumps({"scans": len(result["scans"]), "skipped": len(result["skipped"]),
                      "skipped_scans": result["skipped"], "pairs": _split_counts(result["pairs"])}, indent=1))
    return 0


def run_shards(args) -> int:
    from data_tools.shards import shards_from_pairs, write_shards
    if args.split and not args.from_pairs:
        raise UserError("--split selects pairs of a pairs.json: use it with --from-pairs")
    if args.from_pairs:
        index = shards_from_pairs(args.from_pairs, args.out, split=args.split, max_shard_bytes=args.max_shard_mb * 1e6,
                                  encoding=args.encoding)
    else:
        index = write_shards(_generated_pairs(args), args.out, args.max_shard_mb * 1e6, args.encoding)
    print(json.dumps(index["counts"]), f"-> {len(index['shards'])} shards in {args.out}")
    return 0


def _generated_pairs(args):
    """Phantom / head / synthetic / organ-motion pairs, then known-motion pairs of real scans."""
    import itertools

    from data_tools.known_motion import known_motion_pairs
    from data_tools.shards import training_mix
    sources = []
    if not args.known_motion or any((args.phantom_subjects, args.head_subjects, args.synth_pairs,
                                     args.organ_motion_subjects)):
        sources.append(training_mix(args.phantom_subjects, args.head_subjects, args.synth_pairs, tuple(args.shape),
                                    tuple(args.spacing), args.seed, args.intra_per_subject, args.inter_pairs,
                                    args.ct_augment, args.organ_motion_subjects))
    if args.known_motion:
        sources.append(known_motion_pairs(args.known_motion, args.known_motion_pairs, tuple(args.spacing), args.seed))
    return itertools.chain(*sources)


def _split_counts(pairs: list[dict]) -> dict:
    return {s: sum(p["split"] == s for p in pairs) for s in ("train", "val", "test")}
