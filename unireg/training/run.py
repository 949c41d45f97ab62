"""One training run from a YAML: what ``unireg train`` / ``unireg-train`` call, with explicit arguments.

Kept apart from the command line so a script, a notebook or a test can start the same run;
the command line only turns flags into these arguments and prints the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainingOutcome:
    step: int                     # the global step reached
    metrics: dict                 # last logged loss terms
    export_dir: Path | None       # the save_pretrained folder (rank 0, when the run reached run.steps or its time box)
    rank: int


def train_from_config(config: "str | Path", resume: str = "auto", max_steps: int | None = None,
                      output_dir: str | None = None, train_data: str | None = None,
                      export: bool = True) -> TrainingOutcome:
    """Train (or resume) the run a YAML describes; ``output_dir``/``train_data`` override the YAML's
    (paths relative to the working directory). Exports when the run reaches ``run.steps`` or spends
    ``run.max_minutes``.

    Raises ConfigError (a UserError) for an invalid config, missing data or a checkpoint that
    cannot be resumed, before any step is trained."""
    from .config import TrainConfig, command_line_overrides
    from .trainer import Trainer
    overrides = command_line_overrides(output_dir=output_dir, train_data=train_data)
    train_config = TrainConfig.from_yaml(config, overrides)
    trainer = Trainer(train_config, max_steps=max_steps)
    trainer.resume(resume)
    last = trainer.train()
    exported = trainer.export() if export and trainer.finished else None
    return TrainingOutcome(step=trainer.step, metrics=last, export_dir=exported, rank=trainer.rank)
