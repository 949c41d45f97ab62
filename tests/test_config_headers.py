"""Every command in a train_configs/*.yaml header runs as written (with tiny sizes).

The headers are the documentation users copy: each command is read from the YAML, sizes are
shrunk (subjects, shape, spacing, shard size), the real-data root is replaced by a small TotalSegmentator
tree written here, and the command runs through bash from a copy of the repository layout
(``train_configs/`` beside ``data/``, ``shards/``, ``runs/``). The YAML copies train 2 steps with
evaluation, so the shards and exports a header promises are really made and read. Commands that
need several GPU nodes are checked for the config they name and skipped. The configs share one
workspace in ``ORDER`` (tiny_phantom_finetune starts from tiny_phantom's export), so run the
module whole.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from unireg.io import ijk_to_tensor_order
from unireg.organs import ORGAN_TO_ID
from unireg.training.trainer import free_port

from training_utils import training_env

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"
#: Run in this order: tiny_phantom_finetune reads what tiny_phantom's commands make.
ORDER = ["tiny_cpu", "tiny_phantom", "tiny_phantom_finetune", "tiny_phantom_steer", "finetune_from_pretrained", "base_gpu",
         "large_multinode", "unireg_tiny_3mm", "unireg_tiny_3mm_steer"]
SHRINK = [(r"--subjects \d+", "--subjects 6"), (r"--phantom-subjects \d+", "--phantom-subjects 2"),
          (r"--inter-pairs \d+", "--inter-pairs 2"), (r"--shape \d+ \d+ \d+", "--shape 32 32 32"),
          (r"--spacing [\d.]+ [\d.]+ [\d.]+", "--spacing 12 12 12")]


def header_commands(path: Path) -> list[str]:
    """Shell commands of the leading comment block (lines ``#   cmd``, ``\\`` continuations joined)."""
    commands, current = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if not (current or text.startswith("   ")):
            continue                                              # prose, not a command
        current += " " + text.strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        commands.extend(c.strip() for c in current.split("&&"))
        current = ""
    return commands


def test_every_shipped_config_is_covered_and_has_commands():
    assert sorted(ORDER) == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    for name in ORDER:
        commands = header_commands(CONFIGS / f"{name}.yaml")
        assert any(f"train_configs/{name}.yaml" in c for c in commands), name
        assert all(c.split()[0] in ("unireg", "deepspeed", "unireg-train", "bash") or "=" in c.split()[0] for c in commands)


def shrink(command: str, ts_root: Path) -> str:
    """Tiny sizes: phantoms of 32^3 voxels of 12 mm, a few subjects, real data prepared at 12 mm."""
    for pattern, small in SHRINK:
        command = re.sub(pattern, small, command)
    if re.match(r"unireg prepare (phantom|shards)", command) and "--from-pairs" not in command \
            and "--shape" not in command:
        command += " --shape 32 32 32 --spacing 12 12 12"
    if command.startswith("unireg prepare dataset") and "--spacing" not in command:
        command += " --spacing 12 12 12"
    if command.startswith("unireg prepare shards") and "--max-shard-mb" not in command:
        command += " --max-shard-mb 1"          # several shards, as full-size data gives: one per rank at least
    if command.startswith("bash train_configs/"):
        command = "SHAPE=32 SPACING=12 " + command   # a recipe script: its phantoms at the tiny size
    return command.replace("/data/TotalSegmentator", str(ts_root))


def needs_cluster(command: str) -> bool:
    gpus = re.search(r"--num_gpus (\d+)", command)
    return "--hostfile" in command or (gpus is not None and "DS_ACCELERATOR=cpu" not in command)


def _small_run(config: dict) -> dict:
    run = config.setdefault("run", {})
    run.update(steps=2, checkpoint_every=2, log_every=1, eval_pairs=1, eval_hd95=False)
    if run.get("eval_every"):
        run["eval_every"] = 2
    if config.get("data", {}).get("patch_size"):
        config["data"]["patch_size"] = [32, 32, 32]
    if "working_spacing_mm" in config.get("model", {}).get("overrides", {}):
        config["model"]["overrides"]["working_spacing_mm"] = 12.0    # the phantoms' shrunk spacing
    return config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A repository-like folder: train_configs/ copies (2 steps each) and a small TotalSegmentator tree."""
    root = tmp_path_factory.mktemp("headers")
    (root / "train_configs").mkdir()
    for path in CONFIGS.iterdir():
        target = root / "train_configs" / path.name
        if path.suffix == ".yaml":
            header = "".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("#"))
            target.write_text(header + yaml.safe_dump(_small_run(yaml.safe_load(path.read_text()))))
        else:
            shutil.copy(path, target)
    ts = root / "TotalSegmentator"
    from data_tools.phantom import make_subject
    for i in range(15):                                   # 15 subjects: two land in val, so val has pairs
        subject = make_subject(40 + i, shape=(24, 24, 24), spacing_mm=(16.0,) * 3)
        (ts / f"s{i:04d}" / "segmentations").mkdir(parents=True)
        to_nifti = lambda a: nib.Nifti1Image(ijk_to_tensor_order(a), subject.affine)  # noqa: E731
        nib.save(to_nifti(subject.image), ts / f"s{i:04d}" / "ct.nii.gz")
        for organ in ("liver", "spleen", "kidney_left"):
            mask = (subject.labels == ORGAN_TO_ID[organ]).astype(np.uint8)
            nib.save(to_nifti(mask), ts / f"s{i:04d}" / "segmentations" / f"{organ}.nii.gz")
    return root, ts


@pytest.mark.slow
@pytest.mark.parametrize("name", ORDER)
def test_header_commands_run_as_written(workspace, name):
    root, ts = workspace
    env = training_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    ran = 0
    for command in header_commands(root / "train_configs" / f"{name}.yaml"):
        command = shrink(command, ts)
        if needs_cluster(command):
            config = re.search(r"--config (\S+)", command).group(1)
            assert (root / config).is_file(), command
            continue
        if "deepspeed" in command:
            command = command.replace("deepspeed ", f"deepspeed --master_port {free_port()} ", 1)
        proc = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        ran += 1
    if name == "large_multinode":
        assert ran == 0                                    # several GPU nodes: nothing runs here
        return
    assert ran >= 1
    if any("unireg-train" in c for c in header_commands(root / "train_configs" / f"{name}.yaml")) and name != "base_gpu":
        from unireg.training.config import TrainConfig
        config = TrainConfig.from_yaml(root / "train_configs" / f"{name}.yaml")
        assert (config.export_dir / "model.safetensors").is_file(), name      # trained to the end and exported
        if config.run.eval_every:
            assert (config.output_dir / "eval_log.csv").is_file(), name        # the validation shards were read
    if any(c.startswith("bash ") for c in header_commands(root / "train_configs" / f"{name}.yaml")):
        from unireg.training.config import TrainConfig
        run = TrainConfig.from_yaml(root / "train_configs" / f"{name}.yaml").output_dir
        assert (run / "export" / "model.safetensors").is_file(), name           # a recipe script trains, exports
        assert "Prompt specificity" in (run / "eval" / "steering.md").read_text(), name   # and evaluates
