"""Tried in session 18 (issue 11), not adopted: prompt guidance at the network output, v = v_whole + s (v_named - v_whole),
like classifier-free guidance. Usage: python docs/experiments/inter_steering/guidance.py SCALE (1 = the plain prompt)."""
import sys
import time
import torch
from unireg import UniReg
from unireg.modeling.model import UniRegModel, FieldOutput
from unireg.modeling.transform import resize_field
from unireg.prompt import parse_prompt, Prompt
from unireg.steering import evaluate_steering

SCALE = float(sys.argv[1])
orig = UniRegModel.forward
def forward(self, fixed, moving, prompts, with_affine=True):
    out = orig(self, fixed, moving, prompts, with_affine)
    ps = [parse_prompt(p) for p in ([prompts] * fixed.shape[0] if isinstance(prompts, (str, Prompt)) else prompts)]
    if SCALE == 1.0 or not any(p.organs for p in ps):
        return out
    whole = [Prompt(type=p.type, smoothness=p.smoothness) for p in ps]
    base = orig(self, fixed, moving, whole, with_affine)
    named = torch.tensor([bool(p.organs) for p in ps]).view(-1, 1, 1, 1, 1)
    v = torch.where(named, base.velocity + SCALE * (out.velocity - base.velocity), out.velocity)
    deformation = resize_field(self.integrate(v), fixed.shape[2:])
    if out.affine is None:
        return FieldOutput(velocity=v, displacement=deformation)
    return FieldOutput(velocity=v, displacement=self._mapping(out.affine, deformation), affine=out.affine, deformation=deformation)
UniRegModel.forward = forward
model = UniReg.from_pretrained("unireg-tiny-phantom")
t = time.time()
s = evaluate_steering(model.model if hasattr(model, "model") else model, ["shards/mix6mm/test"], zero_shot=("gallbladder", "small_bowel"))
print("scale", SCALE, "seen %.4f zs %.4f" % (s["mean_specificity_seen"], s["mean_specificity_zero_shot"] or 0),
      {k: round(v["mean_specificity_seen"], 4) for k, v in s["by_type"].items()}, "%.0fs" % (time.time() - t))
for o, r in s["organs"].items():
    print("  %-16s id %.3f whole %.3f named %.3f spec %+.3f" % (o, r["identity"], r["whole_body"], r["named"], r["specificity"]))
