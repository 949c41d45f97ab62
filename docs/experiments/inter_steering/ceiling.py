"""How far a prompt could steer between subjects: Dice of ORGAN on the held-out inter-subject pairs of
shards/mix6mm/test, for each model given as NAME=PATH:PROMPT (PROMPT "whole" = the whole-body prompt).

    python docs/experiments/inter_steering/ceiling.py pancreas stage6=unireg-tiny-phantom:whole \
        stage6_named=unireg-tiny-phantom:"inter | pancreas" task=runs/task_pancreas/export:"inter | pancreas"
"""
import sys

import numpy as np

from unireg import UniReg
from unireg.data import iterate_pairs
from unireg.evaluation import evaluate_pair, shard_list
from unireg.organs import ORGAN_TO_ID
from unireg.prompt import Prompt, parse_prompt

organ, specs = sys.argv[1], sys.argv[2:]
samples = [s for s in iterate_pairs(shard_list(["shards/mix6mm/test"])) if s["meta"].get("type") == "inter"]
for spec in specs:
    name, rest = spec.split("=", 1)
    path, prompt_text = rest.split(":", 1)
    model = UniReg.from_pretrained(path)
    net = model.model if hasattr(model, "model") else model
    dice, ident = [], []
    for s in samples:
        if not ((s["fixed_seg"] == ORGAN_TO_ID[organ]).any() and (s["moving_seg"] == ORGAN_TO_ID[organ]).any()):
            continue
        prompt = Prompt(type="inter") if prompt_text == "whole" else parse_prompt(prompt_text)
        row = evaluate_pair(net, s["fixed"], s["moving"], s["fixed_seg"], s["moving_seg"], prompt,
                            tuple(s["meta"].get("spacing", (1.0, 1.0, 1.0))), with_hd95=False)
        dice.append(row["dice"][organ])
        ident.append(row["dice_identity"][organ])
    print(f"{name:<16} {organ}: identity {np.mean(ident):.3f}  Dice {np.mean(dice):.3f}  ({len(dice)} pairs)", flush=True)
