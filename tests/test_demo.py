"""`unireg demo`, the README's main job, end to end from the shell."""
import json
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
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "registered" / "demo.json").read_text())["intra"]["seconds"] > 0
