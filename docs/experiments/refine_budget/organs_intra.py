"""Per-organ Dice on the phantom breathing pair: the default pipeline against Greedy and no registration (two seeds).

    python docs/experiments/refine_budget/organs_intra.py
"""
import sys, numpy as np, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "bench"))
from vs_optimisers import CASES
from registration_scores import warp_labels
from optimiser_methods import unireg_pipeline, greedy
from unireg import UniReg
from unireg.metrics import organ_dice
from unireg.organs import ORGAN_TO_ID
ID_TO = {v: k for k, v in ORGAN_TO_ID.items()}
model = UniReg.from_pretrained("unireg-tiny-phantom")
runs = {"pipeline": unireg_pipeline(model), "greedy": greedy}
acc = {}
for seed in range(2):
    pair = CASES["phantom_intra"](seed, 100)
    ids = {ID_TO.get(int(i), str(i)): int(i) for i in np.unique(pair.fixed_labels) if i}
    for name, run in runs.items():
        field, s = run(pair.fixed, pair.moving, pair.prompt)
        w = warp_labels(pair.moving_labels, pair.moving.affine, field, pair.fixed.affine)
        d = organ_dice(pair.fixed_labels, w, ids)
        for k, v in d.items(): acc.setdefault(k, {}).setdefault(name, []).append(v)
    d0 = organ_dice(pair.fixed_labels, pair.moving_labels, ids)
    for k, v in d0.items(): acc.setdefault(k, {}).setdefault("identity", []).append(v)
rows = sorted(acc.items(), key=lambda kv: np.mean(kv[1]["pipeline"]) - np.mean(kv[1]["greedy"]))
for k, v in rows:
    print(f"{k:28s} id {np.mean(v['identity']):.3f} ours {np.mean(v['pipeline']):.3f} greedy {np.mean(v['greedy']):.3f} diff {np.mean(v['pipeline'])-np.mean(v['greedy']):+.3f}")
print("mean", {n: round(float(np.mean([np.mean(v[n]) for v in acc.values()])), 4) for n in ("identity","pipeline","greedy")})
