"""Model card for an exported model: how it was trained, its training curve, its held-out table.

    unireg card --run runs/tiny_phantom --model unireg/checkpoints/unireg-tiny-phantom \
        --eval eval_out/tiny_phantom --command "DS_ACCELERATOR=cpu unireg-train --config ..." --train-minutes 45

Reads ``train_log.csv`` / ``eval_log.csv`` of the run and ``eval.md`` / ``eval.json`` (and
``steering.md`` when ``--steering`` was asked for) written by ``unireg eval``, draws
``training_curve.png`` and writes ``README.md`` into the model folder, so the numbers in the card
are the numbers the pipeline measured, never typed by hand.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..config import UniRegConfig  # noqa: E402


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_training_curve(run: Path, out: Path) -> Path:
    train, val = _read_csv(run / "train_log.csv"), _read_csv(run / "eval_log.csv")
    # No held-out curve when the run evaluated nothing on the way (run.eval_every: 0): one panel, not an empty one.
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10, 3.6) if val else (5.5, 3.6), squeeze=False)
    axes = axes[0]
    steps = [r["step"] for r in train]
    for key, label in (("loss", "total loss"), ("similarity", "LNCC term"), ("dice", "Dice loss (prompted organs)")):
        if train and key in train[0]:
            axes[0].plot(steps, _smooth([r[key] for r in train]), label=label)
    axes[0].set_xlabel("step")
    axes[0].set_title("training (moving average)")
    axes[0].legend(fontsize=8)
    if val:
        axes[1].plot([r["step"] for r in val], [r["dice"] for r in val], "o-", label="UniReg")
        axes[1].plot([r["step"] for r in val], [r["dice_identity"] for r in val], "--", label="identity")
        axes[1].legend(fontsize=8)
        axes[1].set_xlabel("step")
        axes[1].set_title("held-out mean organ Dice")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def write_model_card(run: Path, model_dir: Path, eval_dir: Path, command: str, data: str,
                     train_minutes: float | None, hardware: str = "this machine's CPU") -> Path:
    config = UniRegConfig.load(model_dir / "config.json")
    train = _read_csv(run / "train_log.csv")
    steps = int(train[-1]["step"]) if train else 0
    rate = sum(r["pairs_per_s"] for r in train) / len(train) if train else float("nan")
    plot_training_curve(run, model_dir / "training_curve.png")
    table = (eval_dir / "eval.md").read_text()
    by_type = json.loads((eval_dir / "eval.json").read_text())["by_type"]
    minutes = f"{train_minutes:.0f} min" if train_minutes else "see the log"
    lines = [
        f"# {model_dir.name}",
        "",
        f"A `{config.size}` UniReg ({_count_params(model_dir) / 1e6:.2f} M parameters) trained with this",
        "repository's DeepSpeed pipeline on data the project generates (phantoms and synthetic pairs) only.",
        "It demonstrates the whole product path (shards -> training -> export -> `from_pretrained` ->",
        "`register`) offline; it has never seen real CT in training and is not for clinical or research use",
        "on patient data.",
        "",
        "## Training",
        "",
        f"- data: {data}",
        f"- steps: {steps}, mean throughput {rate:.2f} pairs/s, wall time {minutes} on {hardware}",
        f"- working grid: {config.working_spacing_mm:g} mm isotropic, up to {config.max_working_size}³ voxels",
        "- loss: LNCC (window 9) + Dice on the prompted organs + λ·smoothness, λ sampled in [0, 1]",
        "",
        "```bash",
        command,
        "```",
        "",
        "![training curve](training_curve.png)",
        "",
        "## Held-out phantom pairs (subjects never seen in training), model vs identity",
        "",
        "Each pair is prompted with its type (inter / intra) and every organ present in both scans.",
        "",
        table,
        "Summary: " + "; ".join(f"{t}: Dice {s['dice_identity']:.3f} → {s['dice']:.3f}, "
                                f"{s['nonpositive_jacobian_pct']:.3f} % det J ≤ 0" for t, s in by_type.items()),
        "",
        *_steering_section(eval_dir),
        "## Limits",
        "",
        "- Phantom anatomy is procedural; real CT has texture, pathology and scanners the model never saw.",
        "- Coarse working grid (fast on CPU); fine structures below a few voxels are not resolved.",
        "",
    ]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def _steering_section(eval_dir: Path) -> list[str]:
    """``steering.md`` of ``unireg eval --steering`` (prompt specificity, SDlogJ per smooth=λ), when written."""
    path = eval_dir / "steering.md"
    if not path.is_file():
        return []
    return ["## Prompt steering on the same held-out pairs (network alone)", "", path.read_text(), ""]


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
