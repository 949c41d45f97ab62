"""bench/multitask_cost.py end to end at toy size: three trainers in one process, curves and the ratio line."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training_utils import training_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_multitask_cost_trains_three_models_and_prints_the_claim(tmp_path):
    env = training_env()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "multitask_cost.py"), "--steps", "10",
                           "--eval-every", "5", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # each task-specific model scored at steps 5 and 10, the unified one at 5..20 on both tasks
    table = re.findall(r"^\s+(\d+)((?:\s+\d\.\d{3})+)\s*$", out, flags=re.M)
    assert [int(step) for step, _ in table] == [5, 10, 15, 20], out
    assert all(0.0 <= float(v) <= 1.0 for _, cells in table for v in cells.split())
    assert re.search(r"task-specific final Dice: intra 0\.\d{3}, inter 0\.\d{3}", out), out
    assert re.search(r"^ratio: the unified model (matched both at step \d+ = \d\.\d\dx|did not match both within 20)",
                     out, flags=re.M), out
    for run in ("only_intra", "only_inter", "unified"):
        assert (tmp_path / "runs" / run / "train_log.csv").is_file()
