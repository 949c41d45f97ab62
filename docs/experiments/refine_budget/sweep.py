"""Patch pipeline constants, then run bench/vs_optimisers.py: python docs/experiments/refine_budget/sweep.py NAME=VALUE ... -- <vs_optimisers args>

NAME is a module constant of unireg.pipeline.register, .refine or .points, AUTO_<FIELD> a field of STEP_PRESETS["auto"],
KW_<arg> a default of refine_velocity, ALIGN_<NAME> a constant of .align or a default of align_pair, METHOD_<name> the
register() options of one of bench/vs_optimisers.py's UniReg methods (e.g. METHOD_pipeline="{'refine': 'fast'}"), and
PLAN=[n0, n1, ...] the Adam steps per refinement level, coarse to fine, wherever the pipeline has that many levels."""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "bench"))
import unireg.pipeline.register as R
import unireg.pipeline.refine as F
import unireg.pipeline.points as P
args = sys.argv[1:]
split = args.index("--") if "--" in args else len(args)
for kv in args[:split]:
    k, v = kv.split("=")
    val = eval(v)
    if k.startswith("ALIGN_"):
        import unireg.pipeline.align as A
        if hasattr(A, k[6:]):
            setattr(A, k[6:], val); print("align constant", k[6:], val); continue
        A.align_pair.__kwdefaults__[k[6:].lower()] = val; print("align", k[6:].lower(), val); continue
    if k == "PLAN":
        auto_steps = F._auto_steps
        F._auto_steps = lambda shapes, device, preset, plan=list(val): \
            list(plan) if len(shapes) == len(plan) else auto_steps(shapes, device, preset)
        print("plan", val); continue
    if k.startswith("METHOD_"):
        import vs_optimisers
        vs_optimisers.UNIREG_METHODS[k[7:]] = val; print("method", k[7:], val); continue
    if k.startswith("KW_"):
        F.refine_velocity.__kwdefaults__[k[3:]] = val; print("kw", k[3:], val); continue
    if k.startswith("AUTO_"):
        import dataclasses
        field = k[5:].lower()
        F.STEP_PRESETS["auto"] = dataclasses.replace(F.STEP_PRESETS["auto"], **{field: val})
        print("preset auto", F.STEP_PRESETS["auto"]); continue
    for mod in (R, F, P):
        if hasattr(mod, k):
            setattr(mod, k, val); print("patched", mod.__name__, k, val)
import vs_optimisers
sys.exit(vs_optimisers.main(args[split + 1:]))
