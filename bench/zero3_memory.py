"""DeepSpeed's ZeRO-3 memory estimate per GPU for ``large_multinode`` (vit_h) at 8 / 64 / 256 GPUs.

    python bench/zero3_memory.py [--config train_configs/large_multinode.yaml] [--gpus-per-node 8]

The network is built on the ``meta`` device (no memory, no weights), its parameters counted,
and DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs_all_cold``) prints the
model-state memory per GPU and per node for each cluster size. Activations come on top; the
config turns activation checkpointing on for them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "train_configs" / "large_multinode.yaml"))
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256])
    args = parser.parse_args()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from unireg.modeling.model import UniRegModel
    from unireg.modeling.text_encoder import TextEmbedder
    from unireg.training.config import TrainConfig

    config = TrainConfig.from_yaml(args.config).model_config()
    with torch.device("meta"):
        model = UniRegModel(config, TextEmbedder(config.text_model))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    print(f"{args.config}: preset {config.size}, {total / 1e6:.1f} M trainable parameters, "
          f"largest layer {largest / 1e6:.2f} M")
    for gpus in args.gpus:
        nodes = max(1, gpus // args.gpus_per_node)
        print(f"\n=== {gpus} GPUs ({nodes} node(s) x {min(gpus, args.gpus_per_node)}) ===")
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=min(gpus, args.gpus_per_node),
                                                       num_nodes=nodes)


if __name__ == "__main__":
    main()
