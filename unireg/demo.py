"""`unireg demo`: the embedded default end to end.

Without flags: make a phantom intra-subject pair (breathing motion, true field known) and an
inter-subject pair, register both with the shipped model and a prompt, print Dice before and
after and the seconds taken, and write NIfTI outputs and overview PNGs.
With ``--train``: a short train -> export -> register run on freshly generated phantom shards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _phantom_pairs(out: Path, seed: int, shape, spacing):
    from data_tools.phantom import make_intra_pair, make_subject, save_subject
    a = make_subject(seed, shape=shape, spacing_mm=spacing)
    b = make_subject(seed + 1, shape=shape, spacing_mm=spacing)
    moving, _ = make_intra_pair(a, seed + 2)
    pairs = {}
    for name, subject in (("subject_a", a), ("subject_b", b), ("subject_a_exhale", moving)):
        save_subject(subject, out, name)
    for kind, fixed, mov, prompt in (("intra", "subject_a", "subject_a_exhale", "intra-subject | liver, spleen, lungs"),
                                     ("inter", "subject_a", "subject_b", "inter-subject | liver, kidneys, spleen")):
        pairs[kind] = {"fixed": out / f"{fixed}_ct.nii.gz", "moving": out / f"{mov}_ct.nii.gz",
                       "fixed_labels": out / f"{fixed}_labels.nii.gz", "moving_labels": out / f"{mov}_labels.nii.gz",
                       "prompt": prompt}
    return pairs


def run_demo(out_dir: "str | Path", model_name: str = "unireg-tiny-phantom", seed: int = 7,
             shape=(96, 96, 96), spacing=(4.0, 4.0, 4.0)) -> dict:
    from .api import UniReg
    out = Path(out_dir)
    data = out / "phantom"
    data.mkdir(parents=True, exist_ok=True)
    pairs = _phantom_pairs(data, seed, shape, spacing)
    model = UniReg.from_pretrained(model_name)
    report = {}
    for kind, p in pairs.items():
        result = model.register(p["fixed"], p["moving"], prompt=p["prompt"], moving_labels=p["moving_labels"],
                                fixed_labels=p["fixed_labels"])
        result.save(out / kind)
        m = result.metrics
        report[kind] = {"prompt": str(result.prompt), "mean_dice_before": round(m["mean_dice_before"], 4),
                        "mean_dice_after": round(m["mean_dice_after"], 4), "seconds": round(result.seconds, 2),
                        "nonpositive_jacobian_pct": round(result.jacobian["nonpositive_jacobian_pct"], 4),
                        "outputs": str(out / kind)}
        print(f"{kind:>5}: {result.prompt}\n       Dice {m['mean_dice_before']:.3f} -> {m['mean_dice_after']:.3f}  "
              f"({result.seconds:.2f} s, {result.jacobian['nonpositive_jacobian_pct']:.3f} % det J <= 0)  -> {out / kind}")
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    return report


def run_train_demo(out_dir: "str | Path", steps: int = 40) -> dict:
    """Generate shards, train tiny for a few steps through unireg-train, export, register."""
    from data_tools.shards import make_phantom_shards
    out = Path(out_dir)
    shards = out / "shards"
    for split, seed, n in (("train", 0, 6), ("val", 100, 2)):
        make_phantom_shards(shards / split, n_subjects=n, shape=(64, 64, 64), spacing=(5.0, 5.0, 5.0), seed=seed,
                            intra_per_subject=1, inter_pairs=n)
    config = out / "demo_train.yaml"
    config.write_text(DEMO_YAML.format(steps=steps))  # paths relative to the YAML, i.e. to ``out``
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    subprocess.run([sys.executable, "-m", "unireg.cli", "train", "--config", str(config), "--resume", "none"],
                   check=True, env=env)
    return run_demo(out / "registered", model_name=str(out / "run" / "export"), shape=(64, 64, 64),
                    spacing=(5.0, 5.0, 5.0))


DEMO_YAML = """model:
  preset: tiny
  overrides: {{working_spacing_mm: 5.0}}   # the shards' spacing: they load as stored, no resampling
data:
  train: shards/train
  val: shards/val
  patch_size: [48, 48, 48]
run:
  output_dir: run
  steps: {steps}
  log_every: 10
  eval_every: {steps}
  eval_pairs: 2
  checkpoint_every: {steps}
deepspeed:
  scheduler: {{params: {{warmup_num_steps: 5}}}}
"""
