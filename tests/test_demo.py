"""`unireg demo`, the README's main job, end to end from the shell."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_registers_phantom_pairs_with_the_shipped_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unireg.cli", "demo", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Dice" in proc.stdout
    report = json.loads((tmp_path / "demo.json").read_text())
    for kind in ("intra", "inter"):
        assert report[kind]["mean_dice_after"] > report[kind]["mean_dice_before"], report[kind]
        for name in ("warped.nii.gz", "displacement_itk.nii.gz", "warped_labels.nii.gz", "overview.png"):
            assert (tmp_path / kind / name).stat().st_size > 0


@pytest.mark.slow
def test_demo_train_runs_train_export_register(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unireg.cli", "demo", "--train", "--steps", "6", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run" / "train_log.csv") as f:
        log = list(csv.DictReader(f))
    assert [int(row["step"]) for row in log] == [6]                       # log_every 10: the last step is logged
    assert all(math.isfinite(float(row[k])) for row in log for k in ("loss", "similarity", "dice", "lr"))
    assert all(0.0 <= float(row["data_wait_frac"]) <= 1.0 and float(row["field_mean_abs"]) > 0 for row in log)
    with open(tmp_path / "run" / "eval_log.csv") as f:
        evaluation = list(csv.DictReader(f))
    assert [int(row["step"]) for row in evaluation] == [6] and math.isfinite(float(evaluation[0]["dice"]))
    from unireg import UniReg
    model = UniReg.from_pretrained(tmp_path / "run" / "export")             # the exported model loads
    assert model.config.size == "tiny"
    report = json.loads((tmp_path / "registered" / "demo.json").read_text())
    for kind in ("intra", "inter"):
        assert report[kind]["seconds"] > 0
        assert all(math.isfinite(report[kind][k]) for k in ("mean_dice_before", "mean_dice_after",
                                                           "nonpositive_jacobian_pct"))
        assert (tmp_path / "registered" / kind / "warped.nii.gz").stat().st_size > 0
