"""`unireg apply`: a saved registration (the --out folder of `unireg register`) applied to another image, label map
or points file, either way, without registering again; with --target, the points' registration error."""
from __future__ import annotations

import json

from .common import add_verb


def add_parser(subparsers) -> None:
    p = add_verb(subparsers, "apply", "apply a saved registration to another image, label map or points file", run)
    p.add_argument("registration", help="the --out folder of `unireg register`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="image or label map on the moving scan's grid (with --inverse: on the fixed "
                                      "scan's), resampled onto the other grid")
    what.add_argument("--points", help="CSV with x, y, z columns (world mm, RAS unless --lps) or a 3D Slicer .fcsv, "
                                       "one point of the fixed scan per row (with --inverse: of the moving scan), "
                                       "carried into the other scan and written in the same format; other columns "
                                       "are kept")
    p.add_argument("--out", required=True, help="output file, written atomically: .nii/.nii.gz for --image, .csv "
                                                "(.fcsv for a Slicer file) for --points")
    p.add_argument("--inverse", action="store_true",
                   help="the other direction: moving-scan points to the fixed scan, a fixed-grid image onto the "
                        "moving grid (solved from the field, or read from a folder saved with --inverse)")
    p.add_argument("--interpolation", default="auto", choices=["auto", "linear", "nearest"],
                   help="for --image: nearest for label maps, linear for intensities (default auto: nearest for "
                        "integer images with no negative value and at most 1000 distinct values)")
    p.add_argument("--target", help="with --points: CSV of each point's true match in the other scan, row for row; "
                                    "adds an error_mm column and prints the target registration error before and "
                                    "after registration")
    p.add_argument("--lps", action="store_true", help="points CSVs are in LPS (ITK, DICOM) instead of RAS (NIfTI); "
                                                      "3D Slicer .fcsv files say which in their header")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from ..apply import apply_to_image, apply_to_points, check_out, read_points
    from ..errors import UserError
    from ..saved import load_registration
    if args.image and args.target:
        raise UserError("--target scores points: use it with --points")
    check_out(args.out, "points" if args.points else "image", args.overwrite)   # before the (large) field is read
    if args.points:          # every file read and checked before the registration is loaded
        points = read_points(args.points, lps=args.lps)
        target = read_points(args.target, lps=args.lps) if args.target else None
        registration = load_registration(args.registration)
        summary = apply_to_points(registration, points, args.out, inverse=args.inverse, target=target,
                                  lps=args.lps, overwrite=args.overwrite)
    else:
        registration = load_registration(args.registration)
        summary = apply_to_image(registration, args.image, args.out, interpolation=args.interpolation,
                                 inverse=args.inverse, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0
