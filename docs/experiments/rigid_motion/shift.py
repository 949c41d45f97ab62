"""Pure rigid motions of the real chest CT (bench/vs_optimisers.py's scan): how much the network alone recovers.

Run from the repository root: python docs/experiments/rigid_motion/shift.py MODEL (a shipped name or a folder)."""
import sys; sys.path[:0] = ["bench", "."]
import numpy as np, vs_optimisers as vo
from unireg import UniReg
m = UniReg.from_pretrained(sys.argv[1])
for name, kw in [("shift4", dict(rotation_deg=0, translation_mm=4, field_mm=0)),
                 ("shift8", dict(rotation_deg=0, translation_mm=8, field_mm=0)),
                 ("rot3", dict(rotation_deg=3, translation_mm=0, field_mm=0))]:
    out = []
    for seed in (0, 1):
        p = vo.real_pair("x", "chest", seed, 3000, **kw)
        r = m.register(p.fixed, p.moving, prompt="intra", refine=False, align="none")
        row = vo.score(p, r.displacement.astype(np.float32), r.seconds)
        ident = vo.score(p, np.zeros(r.displacement.shape, np.float32), 0)
        out.append((np.median(ident["errors"]), np.median(row["errors"])))
    print(name, " ".join("identity %.2f -> network %.2f" % o for o in out), flush=True)
