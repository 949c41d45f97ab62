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
                "--fixed-labels", str(files / "fixed_labels.nii.gz"), "--refine", "40", "--align", "none")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["prompt"] == "inter | liver, spleen"
    for name in ("warped.nii.gz", "displacement_itk.nii.gz", "warped_labels.nii.gz", "metrics.json", "overview.png"):
        assert (out / name).stat().st_size > 0, name
    warped = nib.load(out / "warped.nii.gz")
    assert warped.shape == (32, 32, 32) and np.allclose(warped.affine, AFFINE)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["dice_after"]) == {"liver", "spleen"}
    # an untrained network: the 40 refinement steps alone must bring the organs together
    assert metrics["mean_dice_after"] > metrics["mean_dice_before"] + 0.05, metrics
    assert [s["stage"] for s in metrics["stages"]] == ["load", "network", "refine", "mapping", "labels"]
    assert metrics["jacobian"]["nonpositive_jacobian_pct"] == 0.0


@pytest.mark.slow
def test_out_is_checked_before_registering_and_replaced_atomically(files):
    out = files / "out_atomic"
    args = ["register", "--fixed", str(files / "fixed.nii.gz"), "--moving", str(files / "moving.nii.gz"),
            "--out", str(out), "--model", str(files / "model"), "--refine", "off", "--align", "none"]
    first = _run(*args, "--moving-labels", str(files / "moving_labels.nii.gz"))
    assert first.returncode == 0, first.stderr
    assert (out / "warped_labels.nii.gz").exists()
    refused = _run(*args)
    assert refused.returncode == 2 and "not empty; pass --overwrite" in refused.stderr
    replaced = _run(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    # the earlier run's label output is gone: no mix of two runs in one folder
    assert not (out / "warped_labels.nii.gz").exists() and (out / "warped.nii.gz").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out_atomic.")]
    a_file = files / "a_file"
    a_file.write_text("x")
    proc = _run(*args[:-8], "--out", str(a_file), *args[-6:])
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--moving", "missing.nii.gz"], "moving image not found"),
    (["--prompt", "intra | lver"], "did you mean liver"),
    (["--model", "no-such-model"], "no UniReg model"),
    (["--prompt", "intra | liver", "--focus", None], "focus=True needs a label map that shows liver"),
])
def test_register_errors_are_one_line_with_exit_code_2(files, args, message):
    base = {"--fixed": str(files / "fixed.nii.gz"), "--moving": str(files / "moving.nii.gz"),
            "--out": str(files / "err"), "--model": str(files / "model")}
    base.update(dict(zip(args[::2], args[1::2])))
    if base["--moving"] == "missing.nii.gz":
        base["--moving"] = str(files / "missing.nii.gz")
    proc = _run("register", *[x for kv in base.items() for x in kv if x is not None])   # None: a flag
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
