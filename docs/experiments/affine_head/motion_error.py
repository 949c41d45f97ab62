"""How well a model's affine head finds a known repositioning on held-out pairs.

Each held-out pair's fixed scan, moved by a random rigid motion (as training draws them: up to 6 deg and 12 mm),
is registered to itself by the network alone; the head's affine is compared with the motion (mean distance in mm
over a lattice of the grid, ``unireg.losses.point_error``). The identity's error is the motion's own size.

Run from the repository root: python docs/experiments/affine_head/motion_error.py MODEL [SHARDS] [REPEATS]"""
import sys

import numpy as np
import torch

from unireg import UniReg
from unireg.data import RigidMotion, iterate_pairs, prepare_pair
from unireg.losses import point_error

model = UniReg.from_pretrained(sys.argv[1]).eval()
shards = sys.argv[2] if len(sys.argv) > 2 else "shards/mix6mm/test"
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 2
if model.affine is None:
    sys.exit(f"{sys.argv[1]} has no affine head")
spec = model.config.preprocessing
spacing = model.config.working_spacing_mm
urls = sorted(str(p) for p in __import__("pathlib").Path(shards).glob("*.tar"))
head, identity = [], []
with torch.no_grad():
    for sample in iterate_pairs(urls):
        for repeat in range(repeats):
            pair = prepare_pair(sample, None, repeat, 0, False, None, False, identity_prob=1.0, spec=spec,
                                rigid_motion=RigidMotion(1.0, 6.0, 12.0))
            out = model(pair["fixed"][None], pair["moving"][None], "intra-subject")
            truth, shape = pair["motion"][None], pair["fixed"].shape[1:]
            head.append(float(point_error(out.affine.float(), truth, shape)) * spacing)
            identity.append(float(point_error(torch.eye(3, 4)[None], truth, shape)) * spacing)
print(f"{len(head)} moved scans: mean error identity {np.mean(identity):.2f} mm -> head {np.mean(head):.2f} mm "
      f"(median {np.median(identity):.2f} -> {np.median(head):.2f}; {np.mean(np.array(head) < np.array(identity)):.0%} "
      f"closer)")
