"""Does a rigid pre-alignment cost the real abdomen accuracy, and would an ideal one? (run from the repo root:
    python docs/experiments/gpu_20261126b/rigid_start.py)
The ideal rigid is the least-squares (Kabsch) fit to the true fixed -> moving mapping at the TRE points; it
replaces the pipeline's pre-alignment by patching the pipeline's _align for the last run."""
import sys, numpy as np
sys.path.insert(0, "bench")  # run from the repository root
import vs_optimisers as vo
from unireg import UniReg
import unireg.pipeline.register as R
model = UniReg.from_pretrained("unireg-tiny-phantom")
pair = vo.CASES["abdomen_native"](0, 20000)
P, T = pair.points, pair.true_points
def kabsch(P, T):
    pc, tc = P.mean(0), T.mean(0)
    U, S, Vt = np.linalg.svd((P - pc).T @ (T - tc))
    d = np.sign(np.linalg.det(Vt.T @ U.T))
    Rm = Vt.T @ np.diag([1, 1, d]) @ U.T
    M = np.eye(4); M[:3, :3] = Rm; M[:3, 3] = tc - Rm @ pc
    return M
ideal = kabsch(P, T)
tre = lambda M: np.linalg.norm(P @ M[:3, :3].T + M[:3, 3] - T, axis=1)
print("identity TRE %.2f, ideal rigid alone %.2f" % (np.median(tre(np.eye(4))), np.median(tre(ideal))))
def run(label, **kw):
    res = model.register(pair.fixed, pair.moving, prompt="intra", **kw)
    row = vo.score(pair, res.displacement.astype(np.float32), res.seconds)
    print(label, "final TRE %.3f p95 %.2f" % (np.median(row["errors"]), np.percentile(row["errors"], 95)),
          "matrix-alone TRE %.2f" % np.median(tre(res.affine_matrix)), flush=True)
run("none ", align="none")
run("rigid", align="rigid")
cls = [c for c in vars(R).values() if isinstance(c, type) and hasattr(c, "_align")][0]
cls._align = lambda self, *a, **k: (ideal, {"mode": "ideal"})
run("ideal rigid", align="rigid")
