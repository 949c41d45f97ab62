"""Training: objective, DeepSpeed trainer, checkpoints and export."""
