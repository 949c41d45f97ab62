"""Instance optimisation settings on the benchmark's pairs: similarity, velocity grid, steps (issue 10).

    python docs/experiments/refine_similarity/sweep.py phantom_inter phantom_intra abdomen_native

Prints mean organ Dice, median TRE (where the case has a known field), % det J <= 0 and seconds per
pair for each setting, over seeds 0-2 of each case (bench/vs_optimisers.py's pairs).
"""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
import vs_optimisers as vo  # noqa: E402
import unireg.pipeline.register as pipeline  # noqa: E402
from unireg import UniReg  # noqa: E402

SETTINGS = (  # (velocity grid mm, register() keywords)
    (16.0, {}),                                           # the default: MIND-SSC, "auto" steps
    (8.0, {}),
    (16.0, {"similarity": "lncc"}),
    (16.0, {"similarity": "lncc", "refine": 400}),       # enough steps for the full-resolution level
    (8.0, {"similarity": "lncc", "refine": 400}),
)

model = UniReg.from_pretrained("unireg-tiny-phantom")
for case in sys.argv[1:]:
    pairs = [vo.CASES[case](seed, 3000) for seed in range(3)]
    for spacing, options in SETTINGS:
        pipeline.VELOCITY_SPACING_MM = spacing
        rows, levels = [], []
        for pair in pairs:
            result = model.register(pair.fixed, pair.moving, prompt=pair.prompt, **options)
            rows.append(vo.score(pair, result.displacement.astype(np.float32), result.seconds))
            levels = [lv["steps"] for s in result.metrics["stages"] if s["stage"] == "refine" for lv in s["levels"]]
        tre = (f"{np.median(np.concatenate([r['errors'] for r in rows])):.2f}"
               if rows[0].get("errors") is not None else "—")
        print(f"{case:15s} velocity {spacing:4.0f} mm {str(options):42s} Dice {np.mean([r['dice'] for r in rows]):.3f}  "
              f"TRE {tre}  folded {np.mean([r['folding_pct'] for r in rows]):.3f} %  "
              f"{np.mean([r['seconds'] for r in rows]):.1f} s  steps per level {levels}", flush=True)
