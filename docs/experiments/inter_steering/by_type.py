"""Prompt specificity per registration type and organ on shards/mix6mm/test, with the field change naming an organ makes.
Usage: python docs/experiments/inter_steering/by_type.py [MODEL]"""
import sys
import numpy as np
from unireg import UniReg
from unireg.steering import pair_steering
from unireg.data import iterate_pairs
from unireg.evaluation import shard_list
model = UniReg.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "unireg-tiny-phantom")
rows = {}
for sample in iterate_pairs(shard_list(["shards/mix6mm/test"])):
    r = pair_steering(model, sample, lambdas=(0.0,))
    for o, v in r["organs"].items():
        rows.setdefault((r["type"], o), []).append(v)
for (t, o), vs in sorted(rows.items()):
    f = lambda k: np.mean([v[k] for v in vs])
    print("%-5s %-24s n%d id %.3f whole %.3f named %.3f spec %+.3f change %.2f mm" % (t, o, len(vs), f("identity"), f("whole_body"), f("named"), f("named") - f("whole_body"), f("field_change_mm")))
