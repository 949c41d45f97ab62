"""DeepSpeed trainer: shards -> engine -> checkpoints -> exported model.

The same loop trains ``tiny`` in one CPU process (gloo) and ``vit_h`` on many GPU nodes under
the ``deepspeed`` launcher. The data stream is deterministic in (seed, epoch) and the trainer
records how many batches of the current epoch it consumed, so ``--resume auto`` continues
with the very batch a stopped run would have seen next.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..api import UniReg
from ..losses import RegistrationLoss
from ..modeling.text_encoder import WHOLE_BODY
from ..organs import ORGANS, organ_phrase
from ..prompt import parse_prompt
from .checkpoint import CheckpointError, CheckpointManager
from .config import ConfigError, TrainConfig
from .objective import affine_step, registration_step

logger = logging.getLogger(__name__)


def init_distributed() -> None:
    """Gloo on CPU, NCCL on GPU; a plain single process gets a one-rank group of its own."""
    import deepspeed
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl")


def on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR", "cuda") == "cpu"


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous (tests and benches launch ranks with it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(config: TrainConfig) -> UniReg:
    section = config.model
    if section.from_pretrained:
        local = config.resolve(section.from_pretrained)  # a folder relative to the YAML, else a name / hub id
        model = UniReg.from_pretrained(local if local.is_dir() else section.from_pretrained)
        if section.overrides:
            logger.warning("model.overrides are ignored when fine-tuning from %s", section.from_pretrained)
    else:
        model = UniReg(config.model_config())
    if section.controller_gain is not None:
        for controller in model.controllers:
            controller.set_gain(section.controller_gain)
        model.config.controller_gain = section.controller_gain
    if section.affine_head:
        model.add_affine_head()
    if section.organ_map:
        model.add_organ_map()
    if config.loss.affine_weight and model.affine is None:
        raise ConfigError("loss.affine_weight teaches an affine head, and this model has none: set "
                          "model.affine_head: true")
    if section.train_only:
        _train_only(model, section.train_only)
    if section.sam_checkpoint:
        report = model.load_sam_checkpoint(config.resolve(section.sam_checkpoint))
        logger.info("%s", report)
    model.backbone.gradient_checkpointing = section.activation_checkpointing
    if section.prompt_cache:  # embeddings made ahead: a GPU node without the text model trains on them
        from ..hub import read_safetensors
        model.embedder.cache.update(read_safetensors(config.prompt_cache_file()))
    # Cache the vocabulary once so training never waits on the text model mid-run.
    model.embedder.embed([organ_phrase(o) for o in ORGANS] + [WHOLE_BODY])
    return model.train()


def _train_only(model: UniReg, prefixes: list[str]) -> None:
    """Freeze every parameter whose name starts with none of ``prefixes`` (a head fine-tuned alone)."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unmatched:
        tops = sorted({n.split(".")[0] for n in names})
        raise ConfigError(f"model.train_only: no parameter starts with {unmatched}; the model's parts are {tops}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(name.startswith(p) for p in prefixes))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("training %d of %d parameters (model.train_only %s)", trained,
                sum(p.numel() for p in model.parameters()), prefixes)


class Trainer:
    def __init__(self, config: TrainConfig, max_steps: int | None = None):
        import deepspeed
        self.config = config
        self.run = config.run
        self.total_steps = config.run.steps
        self.stop_at = min(max_steps, self.total_steps) if max_steps else self.total_steps
        config.check_data()  # every shard the run reads, now rather than at the first evaluation
        self.train_urls = config.shard_urls("train")
        self.val_urls = config.shard_urls("val") if config.data.val else None
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if len(self.train_urls) < self.world:  # split_by_node hands out whole shards: a rank without one stalls the rest
            raise ConfigError(f"data.train has {len(self.train_urls)} shard(s) for {self.world} ranks; each rank reads "
                              f"whole shards, so write at least {self.world} (smaller --max-shard-mb)")
        torch.manual_seed(self.run.seed)
        self.output_dir = config.output_dir  # relative to the YAML, like every path in it
        self.model = build_model(config)
        ds_config = config.deepspeed_dict()
        if on_cpu():  # DeepSpeed's fused Adam is a GPU kernel: torch's AdamW on the CPU accelerator
            ds_config["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, model_parameters=[p for p in self.model.parameters() if p.requires_grad],
                                                    config=ds_config)
        self.batch_size = self.engine.train_micro_batch_size_per_gpu()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.dtype = next(self.engine.module.parameters()).dtype
        self.loss_fn = RegistrationLoss(**{k: v for k, v in vars(config.loss).items() if k != "affine_only"},
                                        map_hidden_organs=config.data.zero_shot_organs)
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", self.run.keep_last)
        self.task = parse_prompt(self.run.task) if self.run.task else None
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.train_seconds = 0.0         # training time so far, over resumes (the time box counts it)
        self.finished = False            # reached run.steps or spent run.max_minutes
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.engine.module.config.save(self.output_dir / "model_config.json")

    # ------------------------------------------------------------------------------------ data
    def _loader(self, epoch: int):
        from ..data import PromptSampling, RigidMotion, make_loader
        d = self.config.data
        return make_loader(self.train_urls, batch_size=self.batch_size,
                           patch_size=tuple(d.patch_size) if d.patch_size else None, seed=self.run.seed,
                           epoch=epoch, num_workers=d.num_workers, shuffle=True,
                           prompt_sampling=PromptSampling(d.prompt_sampling, d.whole_body_prob, d.group_prob,
                                                          zero_shot=tuple(d.zero_shot_organs)),
                           smoothness=tuple(d.smoothness) if d.smoothness else None, augment=d.augment,
                           identity_prob=d.identity_prob, spec=self.model.config.preprocessing,
                           rigid_motion=RigidMotion(d.rigid_motion_prob, *d.rigid_motion))

    def _batches(self):
        """Endless (epoch, batch) stream, starting where the last run stopped."""
        while True:
            stream = iter(self._loader(self.epoch))
            skipped = self.batch_in_epoch
            got_any = False
            for batch in itertools.islice(stream, skipped, None):
                got_any = True
                self.batch_in_epoch += 1
                yield batch
            if not got_any and skipped == 0:
                from ..data import skip_stats
                raise ConfigError(f"data.train: rank {self.rank} read no usable pair from its shards "
                                  f"(skipped: {dict(skip_stats.counts) or 'none'}; each rank needs at least "
                                  f"one shard with {self.batch_size} pairs)")
            self.epoch += 1
            self.batch_in_epoch = 0

    def _apply_task(self, batch: dict) -> dict:
        """Task-specific mode: every pair gets the same prompt and is scored on its organs only."""
        if self.task is None:
            return batch
        batch = dict(batch)
        batch["prompt"] = [self.task] * len(batch["prompt"])
        batch["organs"] = [list(self.task.organs) for _ in batch["prompt"]]
        return batch

    # ------------------------------------------------------------------------------------ loop
    def resume(self, spec: str | None) -> None:
        """``none``, ``auto`` (the latest complete checkpoint, if any) or a tag; CheckpointError for a tag
        that is unknown, broken, or was written by another number of ranks under ZeRO."""
        if not spec or spec == "none":
            return
        tag = self.checkpoints.latest() if spec == "auto" else spec
        if tag is None:
            logger.info("no checkpoint to resume from in %s; starting fresh", self.checkpoints.directory)
            return
        written_by = self.checkpoints.trainer_state(tag).get("world_size", self.world)
        if written_by != self.world and self.engine.zero_optimization_stage() > 0:
            raise CheckpointError(f"checkpoint {self.checkpoints.directory / tag} was written by {written_by} rank(s) "
                                  f"and this run has {self.world}: ZeRO cannot re-partition its optimizer state. "
                                  f"Resume with {written_by} rank(s), or train in another --output-dir")
        state = self.checkpoints.load(self.engine, tag)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.train_seconds = float(state.get("train_seconds", 0.0))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if self.rank == 0:
            logger.warning("resumed from %s at step %d (epoch %d, batch %d)", tag, self.step, self.epoch,
                           self.batch_in_epoch)

    def train(self) -> dict:
        from tqdm.auto import tqdm
        device = self.engine.device
        log_path = self.output_dir / "train_log.csv"
        progress = tqdm(total=self.stop_at, initial=self.step, disable=self.rank != 0, desc="train", unit="step")
        window_start, window_pairs, window_data_s = time.perf_counter(), 0, 0.0
        last = {}
        batches = self._batches()
        clock = time.perf_counter() - self.train_seconds
        time_up = self._out_of_time()  # a resumed run whose time box is spent only exports
        while self.step < self.stop_at and not time_up:
            for _ in range(self.grad_accum):
                waited = time.perf_counter()
                batch = self._apply_task(next(batches))
                window_data_s += time.perf_counter() - waited  # the loader is the bottleneck when this nears 1
                batch = {k: (v.to(device, dtype=self.dtype) if k in ("fixed", "moving") else
                             v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                if self.config.loss.affine_only:
                    terms = affine_step(self.engine.module, batch, self.loss_fn)
                else:
                    terms = registration_step(self.engine.module, batch, self.loss_fn, forward=self.engine)
                self.engine.backward(terms["loss"])
                self.engine.step()
                window_pairs += batch["fixed"].shape[0] * self.world
                if self.run.record_data_order:
                    self._record_batch(batch)
            self.step += 1
            self.train_seconds = time.perf_counter() - clock
            self._follow_time_box()
            time_up = self._out_of_time()
            progress.update(1)
            last = {k: float(v.detach()) for k, v in terms.items() if k != "displacement"}
            if self.step % self.run.log_every == 0 or self.step == self.stop_at:
                elapsed = time.perf_counter() - window_start
                # mean |displacement| (working-grid voxels) of the last batch: a field shrinking towards
                # identity while the loss stalls is the collapse a curve of losses alone hides
                row = {"step": self.step, "lr": self.engine.get_lr()[0], "pairs_per_s": window_pairs / elapsed,
                       "data_wait_frac": round(window_data_s / elapsed, 3), **{k: round(v, 5) for k, v in last.items()}}
                if "displacement" in terms:
                    row["field_mean_abs"] = round(float(terms["displacement"].detach().abs().mean()), 5)
                self._log(log_path, row)
                progress.set_postfix(loss=f"{last['loss']:.4f}", pairs_s=f"{row['pairs_per_s']:.2f}")
                window_start, window_pairs, window_data_s = time.perf_counter(), 0, 0.0
            if self.run.eval_every and self.step % self.run.eval_every == 0 and self.val_urls:
                self.evaluate()
            if self.step % self.run.checkpoint_every == 0 or self.step == self.stop_at or time_up:
                self.save_checkpoint()
        progress.close()
        self.finished = self.step >= self.total_steps or time_up
        if time_up and self.rank == 0:
            logger.warning("time box of %.1f min spent at step %d", self.run.max_minutes, self.step)
        return last

    # ------------------------------------------------------------------------------- time box
    def _out_of_time(self) -> bool:
        """True once run.max_minutes of training are spent; every rank agrees (rank 0's clock decides)."""
        if self.run.max_minutes is None:
            return False
        spent = torch.tensor([float(self.train_seconds >= 60.0 * self.run.max_minutes)])
        if self.world > 1:
            spent = spent.to(self.engine.device)
            dist.broadcast(spent, src=0)
        return bool(spent.item())

    def _follow_time_box(self) -> None:
        """Under a time box the learning-rate schedule runs on the larger of step and time progress,
        so warm-up and cosine decay end when the time does, however fast the hardware is."""
        scheduler = self.engine.lr_scheduler
        if self.run.max_minutes is None or scheduler is None or not hasattr(scheduler, "last_batch_iteration"):
            return
        by_time = int(self.total_steps * self.train_seconds / (60.0 * self.run.max_minutes))
        if by_time > scheduler.last_batch_iteration:
            scheduler.step(min(by_time, self.total_steps))

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "world_size": self.world, "torch_rng": torch.get_rng_state().tolist(),
                 "train_seconds": self.train_seconds}
        return self.checkpoints.save(self.engine, self.step, state)

    def evaluate(self) -> dict | None:
        """Held-out Dice / HD95 / Jacobian on rank 0 (ZeRO-3 parameters gathered for it)."""
        from ..evaluation import evaluate_shards
        with gathered_parameters(self.engine):
            if self.rank != 0:
                return None
            module = self.engine.module
            module.eval()
            summary = evaluate_shards(module, self.val_urls,
                                      max_pairs=self.run.eval_pairs, prompt=self.run.task,
                                      with_hd95=self.run.eval_hd95)
            module.train()
        self._log(self.output_dir / "eval_log.csv", {"step": self.step, **summary["mean"]})
        return summary

    def export(self, out_dir: "str | Path | None" = None) -> Path | None:
        """save_pretrained folder from the live engine (ZeRO-3 shards gathered to rank 0)."""
        out = Path(out_dir) if out_dir else self.config.export_dir
        with gathered_parameters(self.engine):
            if self.rank == 0:
                self.engine.module.save_pretrained(out)
        dist.barrier()
        return out if self.rank == 0 else None

    def _record_batch(self, batch: dict) -> None:
        """One line per pair: step, epoch, pair key and the prompt it was trained with."""
        folder = self.output_dir / "data_order"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{self.rank}.txt", "a") as f:
            f.write("".join(f"{self.step}\t{self.epoch}\t{k}\t{p}\n" for k, p in zip(batch["key"], batch["prompt"])))

    def _log(self, path: Path, row: dict) -> None:
        if self.rank != 0:
            return
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        logger.info("%s", json.dumps(row))


class gathered_parameters:
    """Context: full parameters on every rank under ZeRO-3, a no-op otherwise."""

    def __init__(self, engine):
        self.engine = engine
        self.ctx = None

    def __enter__(self):
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed
            self.ctx = deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False
