"""`unireg register`: one pair of scans -> warped scan, ITK field, affine, labels, metrics, overview (and, with
--inverse, the inverse field and the fixed scan and labels on the moving grid); with --pairs, every pair of a CSV
with one model (``unireg.batch``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import add_model_flags, add_verb, resolve_device


def add_parser(subparsers) -> None:
    p = add_verb(subparsers, "register", "register a moving CT onto a fixed CT", run)
    p.add_argument("--fixed", help="fixed image (.nii/.nii.gz/.mha/.nrrd, or a folder holding one DICOM series)")
    p.add_argument("--moving", help="moving image")
    p.add_argument("--pairs", help="instead of --fixed/--moving: a CSV of pairs, columns fixed,moving and optionally "
                                   "name,prompt,fixed_labels,moving_labels,fixed_mask,moving_mask (paths relative to "
                                   "the CSV); each pair is written to --out/<name>/, finished pairs are skipped when "
                                   "run again, a failing pair is listed in --out/summary.csv and the others go on")
    p.add_argument("--prompt", default="", help='e.g. "intra-subject | liver, spleen | smooth=0.3 | rigid=vertebrae_L1"'
                                                " (with --pairs: for the rows without a prompt)")
    p.add_argument("--out", required=True, help="output folder (written atomically; with --pairs, one per pair)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out (with "
                                                            "--pairs: register finished pairs again)")
    add_model_flags(p)
    p.add_argument("--moving-labels", help="label map on the moving image's grid, warped with the field")
    p.add_argument("--fixed-labels", help="label map on the fixed grid: places rigid= structures and --focus "
                                          "organs; with --moving-labels, Dice before/after is reported")
    p.add_argument("--fixed-mask", help="mask on the fixed image's grid (non-zero inside): pre-alignment and instance "
                                        "optimisation compare the scans only there (leave out a table, metal "
                                        "artefacts, a lesion that changed); the network still sees both scans whole")
    p.add_argument("--moving-mask", help="mask on the moving image's grid, the same for the moving scan")
    p.add_argument("--refine", default="auto",
                   help="instance optimisation: auto (default), fast (about 0.8x the time, a little less accurate), "
                        "accurate (about 10%% lower error in 1.2x the time), off (network alone) or a number of steps")
    p.add_argument("--align", default="auto", choices=["auto", "none", "rigid", "affine"],
                   help="pre-alignment before the network (default auto: only when the scans are not aligned)")
    p.add_argument("--similarity", default="auto", choices=["auto", "mind_ncc", "mind", "lncc"],
                   help="similarity of instance optimisation (default auto: MIND-SSC plus local intensity with "
                        "--refine auto, MIND-SSC alone with fast; mind is contrast-invariant, for scans whose "
                        "intensities do not correspond)")
    p.add_argument("--focus", action="store_true",
                   help="instance optimisation favours the prompt's organs, placed by --fixed-labels (else "
                        "--moving-labels, else the model's organ map when it has one): for organs that move unlike their surroundings (another subject, "
                        "sliding organs); costs accuracy where the whole scan moves smoothly")
    p.add_argument("--adapter", help="few-shot adapter (.safetensors) made by `unireg adapt`")
    p.add_argument("--inverse", action="store_true",
                   help="also the other direction: the inverse field on the moving grid "
                        "(inverse_displacement_itk.nii.gz), the fixed scan on it (inverse_warped.nii.gz) and, with "
                        "--fixed-labels, the fixed labels on it (inverse_warped_labels.nii.gz)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..api import UniReg
    from ..errors import UserError
    from ..pipeline.register import check_align, check_refine
    from ..result import check_output_dir
    if args.pairs:
        if args.fixed or args.moving or args.fixed_labels or args.moving_labels or args.fixed_mask or args.moving_mask:
            raise UserError("--pairs lists the scans, label maps and masks itself: leave out --fixed, --moving, "
                            "--fixed-labels, --moving-labels and the masks (or give columns fixed_labels, "
                            "moving_labels, fixed_mask, moving_mask)")
        return _run_pairs(args)
    if not (args.fixed and args.moving):
        raise UserError("give --fixed and --moving (or --pairs with a CSV of pairs)")
    out = Path(args.out)
    check_output_dir(out, args.overwrite)          # before any work: a bad --out must not cost a registration
    refine = check_refine(args.refine)
    check_align(args.align)
    model = UniReg.from_pretrained(args.model, device=resolve_device(args.device))
    with _progress_bar(disabled=args.no_progress or refine == 0) as progress:
        result = model.register(args.fixed, args.moving, prompt=args.prompt, moving_labels=args.moving_labels,
                                fixed_labels=args.fixed_labels, fixed_mask=args.fixed_mask,
                                moving_mask=args.moving_mask, refine=refine,
                                align=args.align, similarity=args.similarity, focus=args.focus, adapter=args.adapter,
                                progress=progress)
    paths = result.save(out, overwrite=args.overwrite, inverse=args.inverse)
    from ..result import json_safe
    print(json.dumps(json_safe({"outputs": {k: str(v) for k, v in paths.items()}, **result.summary()}), indent=2))
    return 0


def _run_pairs(args) -> int:
    from ..api import UniReg
    from ..batch import read_pair_csv, register_batch
    from ..pipeline.register import check_align, check_refine
    pairs = read_pair_csv(args.pairs, args.prompt)    # the whole list checked before any work
    refine = check_refine(args.refine)
    check_align(args.align)
    model = UniReg.from_pretrained(args.model, device=resolve_device(args.device))
    rows = register_batch(model, pairs, args.out, overwrite=args.overwrite, inverse=args.inverse,
                          show_progress=not args.no_progress, refine=refine, align=args.align,
                          similarity=args.similarity, focus=args.focus, adapter=args.adapter)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("done", "done before", "failed")}
    print(json.dumps({"pairs": len(rows), **counts, "summary": str(Path(args.out) / "summary.csv")}, indent=2))
    if counts["failed"]:
        print(f"unireg register: {counts['failed']} of {len(rows)} pairs failed; their reasons are in "
              f"{Path(args.out) / 'summary.csv'}", file=sys.stderr)
        return 1
    return 0


class _progress_bar:
    """tqdm over instance-optimisation steps, one bar per resolution level."""

    def __init__(self, disabled: bool):
        self.disabled, self.bar, self.level = disabled, None, None

    def __enter__(self):
        return None if self.disabled else self.update

    def update(self, level: int, step: int, loss: float) -> None:
        from tqdm import tqdm
        if level != self.level:
            if self.bar is not None:
                self.bar.close()
            self.bar, self.level = tqdm(desc=f"refine level {level + 1}", unit="step", leave=False), level
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
