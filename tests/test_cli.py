"""One command line: every verb answers a user error with one line on stderr and exit status 2."""
import os
import subprocess
import sys

import pytest

from unireg.cli import build_parser, main


def _run(*args, env_extra=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "unireg.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_every_verb_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"register", "apply", "prepare", "train", "eval", "export", "card", "demo", "adapt", "app"}


@pytest.fixture(scope="module")
def junk(tmp_path_factory):
    d = tmp_path_factory.mktemp("junk")
    (d / "notes.txt").write_text("not a tar, not a config")
    (d / "bad.yaml").write_text("model:\n  preset: tiny\nrun:\n  stepz: 3\n")
    (d / "run").mkdir()
    return d


@pytest.mark.parametrize("verb, make_args, message", [
    ("register", lambda d: ["--fixed", str(d / "nope.nii.gz"), "--moving", str(d / "nope.nii.gz"), "--out",
                            str(d / "o")], "fixed image not found"),
    ("register", lambda d: ["--fixed", "a", "--moving", "b", "--out", str(d / "o2"), "--refine", "lots"],
     "refine must be 'auto', 'fast', 'accurate', False or a number"),
    ("register", lambda d: ["--fixed", "a"], "the following arguments are required"),
    ("prepare", lambda d: ["dataset", "--layout", "csv", "--root", str(d / "missing.csv"), "--out", str(d / "p")],
     "missing.csv"),
    ("prepare", lambda d: ["phantom", "--subjects", "two", "--out", str(d / "p")], "invalid int value"),
    ("train", lambda d: ["--config", str(d / "missing.yaml")], "not found"),
    ("train", lambda d: ["--config", str(d / "bad.yaml")], "run.stepz"),
    ("eval", lambda d: ["--data", str(d / "notes.txt"), "--model", "no-such-model"], "no UniReg model"),
    ("export", lambda d: ["--run", str(d / "run"), "--out", str(d / "model")], "run folder"),
    ("demo", lambda d: ["--model", "no-such-model", "--out", str(d / "demo")], "no UniReg model"),
])
def test_user_errors_are_one_line_with_exit_2(junk, verb, make_args, message, capsys):
    """In-process (a traceback would fail the test by raising); the shell path is checked below."""
    try:
        code = main([verb, *make_args(junk)])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " WARNING " not in line]
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"unireg {verb}"), err


def test_missing_optional_extra_names_the_extra(junk, tmp_path):
    """A verb whose extra is not installed says which one to install instead of vanishing."""
    blocker = tmp_path / "deepspeed"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('deepspeed is not installed', name='deepspeed')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = _run("train", "--config", str(junk / "bad.yaml"), env_extra=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "needs the 'train' extra" in proc.stderr and "pip install 'unireg[train]'" in proc.stderr
    assert "train" in _run("--help", env_extra=env).stdout  # the verb is still listed


def test_device_auto_resolves_without_cuda():
    import torch
    from unireg.cli.common import resolve_device
    from unireg.errors import UserError
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="--device must be"):
        resolve_device("tpu")


def test_the_command_line_is_built_without_the_model_stack():
    """`unireg --help`, `unireg prepare ...` and every parser are ready before torch, MONAI or the model load:
    importing them made each command wait ~5 s first (7.7 s for `unireg --help` on a 2-core CPU)."""
    code = ("import sys; from unireg.cli import build_parser; build_parser(); import unireg; "
            "heavy = sorted(m for m in ('torch', 'monai', 'segment_anything', 'transformers', 'deepspeed', 'gradio') "
            "if m in sys.modules); print(heavy); assert not heavy, heavy; "
            "from unireg import UniReg, parse_prompt; assert UniReg.__module__ == 'unireg.api'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
