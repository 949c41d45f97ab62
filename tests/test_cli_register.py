"""`unireg register` end to end from the shell on generated NIfTI files."""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from synthetic import blob_volume
from unireg import UniReg

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def _run(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "unireg.cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    f_hu, f_lab = blob_volume((32, 32, 32), seed=0)
    m_hu, m_lab = blob_volume((32, 32, 32), shift=(2, -2, 1), seed=1)
    for name, data in (("fixed", f_hu), ("moving", m_hu), ("fixed_labels", f_lab), ("moving_labels", m_lab)):
        nib.save(nib.Nifti1Image(data, AFFINE), d / f"{name}.nii.gz")
    UniReg.from_config("tiny").save_pretrained(d / "model")
    return d


@pytest.mark.slow
def test_register_from_the_shell(files):
    out = files / "out"
    proc = _run("register", "--fixed", str(files / "fixed.nii.gz"), "--moving", str(files / "moving.nii.gz"),
                "--prompt", "inter | liver, spleen", "--out", str(out), "--model", str(files / "model"),
                "--moving-labels", str(files / "moving_labels.nii.gz"),
                "--fixed-labels", str(files / "fixed_labels.nii.gz"), "--optimize-steps", "20")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["prompt"] == "inter | liver, spleen"
    for name in ("warped.nii.gz", "displacement_itk.nii.gz", "warped_labels.nii.gz", "metrics.json", "overview.png"):
        assert (out / name).stat().st_size > 0, name
    warped = nib.load(out / "warped.nii.gz")
    assert warped.shape == (32, 32, 32) and np.allclose(warped.affine, AFFINE)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["dice_after"]) == {"liver", "spleen"}


@pytest.mark.parametrize("args, message", [
    (["--moving", "missing.nii.gz"], "moving image not found"),
    (["--prompt", "intra | lver"], "did you mean liver"),
    (["--model", "no-such-model"], "no UniReg model"),
])
def test_register_errors_are_one_line_with_exit_code_2(files, args, message):
    base = {"--fixed": str(files / "fixed.nii.gz"), "--moving": str(files / "moving.nii.gz"),
            "--out": str(files / "err"), "--model": str(files / "model")}
    base.update(dict(zip(args[::2], args[1::2])))
    if base["--moving"] == "missing.nii.gz":
        base["--moving"] = str(files / "missing.nii.gz")
    proc = _run("register", *[x for kv in base.items() for x in kv])
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
