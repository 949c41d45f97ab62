"""Prompt specificity of a model under other default smoothness values (issue 11, session 21).

    python docs/experiments/smooth_range/specificity_by_lambda.py 0.3,0.5 0,0 0.1,0.2 0.6,0.75 0.9,1.0

Each argument is "λ inter,λ intra": the model's default smoothness per registration type for prompts that
do not set one (the shipped model's: 0.3, 0.5), as ``unireg eval --steering`` would use it on the held-out
``shards/mix6mm/test`` pairs (zero-shot gallbladder and small_bowel). Prints the mean specificity over seen
and zero-shot organs and over seen organs per type.
"""
import glob
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
import unireg.steering as steering  # noqa: E402
from unireg.modeling.model import UniRegModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
steering.LAMBDAS = (0.0,)          # the SDlogJ sweep is not what this measures
model = UniRegModel.from_pretrained(ROOT / "unireg/checkpoints/unireg-tiny-phantom")
urls = sorted(glob.glob(str(ROOT / "shards/mix6mm/test/*.tar")))
if not urls:
    sys.exit("no shards in shards/mix6mm/test: see the model card for the command that makes them")
for arg in sys.argv[1:] or ["0.3,0.5"]:
    inter, intra = (float(x) for x in arg.split(","))
    model.condition.default_smoothness = {"inter": inter, "intra": intra}
    r = steering.evaluate_steering(model, urls, zero_shot=("gallbladder", "small_bowel"))
    by_type = ", ".join(f"{t} {v['mean_specificity_seen']:+.3f}" for t, v in r["by_type"].items())
    print(f"λ inter {inter}, intra {intra}: seen {r['mean_specificity_seen']:+.3f}, "
          f"zero-shot {r['mean_specificity_zero_shot']:+.3f} ({by_type})", flush=True)
