"""The one training loop.

It owns devices, precision, gradient accumulation, the learning-rate schedule, clipping,
checkpoints and exact resume, evaluation, logging and progress, and several processes under
torchrun (replicated with DDP, or sharded with FSDP2 under --fsdp). What it trains on and which
loss it minimises come from an objective (objectives.py).

Run layout:
    <out_dir>/train_config.json        the resolved settings
    <out_dir>/metrics.jsonl            one line per logged step (plus tensorboard/ when enabled)
    <out_dir>/checkpoints/step-N/      Hugging Face model directory + trainer_state/, last K kept
    <out_dir>/final/                   the finished model (also a checkpoint: training can go on)
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from wren.atomic import atomic_directory, atomic_write_text
from wren.errors import WrenError
from wren.progress import Progress, format_count
from wren.train import distributed as dist_utils
from wren.train.config import TrainConfig
from wren.train.metrics import MetricsLogger
from wren.train.objectives import Objective, make_objective
from wren.train.optim import make_optimizer
from wren.train.schedule import learning_rate
from wren.train.state import (
    checkpoint_steps,
    optimizer_state_by_index,
    optimizer_state_by_name,
    prune_checkpoints,
    read_state,
    restore_rng,
    write_state,
)


def _expert_load_metrics(model: torch.nn.Module) -> dict[str, float]:
    """Each MoE layer's share of routed tokens per expert in the last micro-batch, and the largest
    share averaged over layers: 1/E when balanced, 1 when every token goes to one expert."""
    metrics, largest = {}, []
    for index, layer in enumerate(model.model.layers):
        load = getattr(layer.mlp, "last_expert_load", None)
        if load is None:
            continue
        shares = (load.float() / max(float(load.sum()), 1.0)).tolist()
        metrics.update({f"moe/layer{index}_expert{e}_share": share for e, share in enumerate(shares)})
        largest.append(max(shares))
    if largest:
        metrics["moe/max_expert_share"] = sum(largest) / len(largest)
    return metrics


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.resume = resume
        self.out_dir = Path(config.out_dir)
        self.checkpoints_dir = self.out_dir / "checkpoints"
        self.env = dist_utils.init_distributed(config.device)
        self.device = self.env.device
        self.use_bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.use_bf16
            else contextlib.nullcontext()
        )
        # FSDP replaces DDP: the two never wrap the same model. A single process has nothing to
        # shard across, so --fsdp alone trains exactly as without it (after a note), rather than
        # failing: one config file then serves both a laptop run and a torchrun launch.
        self.sharded = config.fsdp and self.env.is_distributed

    # -- setup ------------------------------------------------------------------------------------

    def _log(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def _resume_point(self) -> Path | None:
        steps = checkpoint_steps(self.checkpoints_dir)
        if not self.resume:
            return None
        if not steps:
            self._log(f"no checkpoint in {self.checkpoints_dir} to resume from; starting from the beginning")
            return None
        return steps[-1][1]

    def _setup(self) -> None:
        config, env = self.config, self.env
        resume_from = self._resume_point()
        if resume_from is None and checkpoint_steps(self.checkpoints_dir) and env.is_main:
            raise WrenError(
                f"{self.checkpoints_dir}: already holds checkpoints; pass --resume to continue that run, "
                "or choose another --out"
            )
        self.objective: Objective = make_objective(config, self.device)
        self.model, self.tokenizer = self.objective.build_model(resume_from)
        if config.aux_loss_coef is not None:
            self.model.config.aux_loss_coef = config.aux_loss_coef
        if config.fsdp and not env.is_distributed:
            self._log("note: --fsdp shards across torchrun processes; one process trains unsharded")
        if self.sharded:
            # Every rank holds the same full fp32 weights on the CPU (fresh from the seed, or the
            # checkpoint): sharding keeps each rank's slice and moves it to the device.
            dist_utils.shard_model(self.model, env, bf16=self.use_bf16 and self.device.type == "cuda")
        else:
            self.model.to(self.device)
        self.objective.setup(self.model)

        cache_dir = Path(config.cache_dir) if config.cache_dir else self.out_dir / "data-cache"
        if env.is_main:
            self._log(self.objective.prepare(self.tokenizer, cache_dir, is_main=True))
        dist_utils.barrier(env)
        if not env.is_main:
            self.objective.prepare(self.tokenizer, cache_dir, is_main=False)

        self.batches = self.objective.train_batches(env.rank, env.world_size)
        # After sharding: the optimizer must hold the sharded parameters, and its moments are shards.
        self.optimizer = make_optimizer(self.model, config, self.device)
        self.step, self.tokens_seen = 0, 0
        if resume_from is not None:
            progress, optimizer_state, rng = read_state(resume_from)
            if self.sharded:  # every rank read the whole state; each keeps its slice
                by_name = optimizer_state_by_name(optimizer_state, self.model, self.optimizer)
                dist_utils.load_full_optimizer_state(self.model, self.optimizer, by_name)
            else:
                self.optimizer.load_state_dict(optimizer_state)
            self.batches.load_state_dict(progress["data"])
            self.step, self.tokens_seen = progress["step"], progress["tokens_seen"]
            restore_rng(progress["rng"], rng)
            self._log(f"resumed from {resume_from} at step {self.step}")

        # Sharded, self.model is itself the FSDP module (fully_shard works in place).
        self.train_model: torch.nn.Module = self.model
        if env.is_distributed and not self.sharded:
            self.train_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Experts that receive no token in a batch get no gradient.
                find_unused_parameters=self.model.config.is_moe,
            )
        if config.compile if config.compile is not None else self.device.type == "cuda":
            self.train_model = torch.compile(self.train_model)
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                self.out_dir / "train_config.json", json.dumps(config.to_dict(), indent=2) + "\n"
            )

    # -- checkpoints ------------------------------------------------------------------------------

    def _save(self, target: Path) -> None:
        """Write a checkpoint from rank 0. Sharded, every rank first sends rank 0 its shards of the
        weights and optimizer moments; the files are the same as an unsharded run's."""
        if self.sharded:
            model = dist_utils.gather_full_model(self.model)
            optimizer_state = dist_utils.gather_full_optimizer_state(self.model, self.optimizer)
            if self.env.is_main:
                optimizer_state = optimizer_state_by_index(optimizer_state, self.model, self.optimizer)
        elif self.env.is_main:
            model, optimizer_state = self.model, self.optimizer.state_dict()
        if self.env.is_main:
            progress = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.batches.state_dict()}
            self.objective.save(
                model,
                self.tokenizer,
                target,
                lambda staging: write_state(staging, optimizer_state, progress),
            )
        dist_utils.barrier(self.env)

    def _save_step_checkpoint(self) -> None:
        self._save(self.checkpoints_dir / f"step-{self.step:06d}")
        if self.env.is_main:
            prune_checkpoints(self.checkpoints_dir, self.config.keep_last)

    # -- the loop ---------------------------------------------------------------------------------

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        with self.autocast:
            metrics = self.objective.evaluate(self.model)
        self.model.train()
        return metrics

    def _no_sync(self, last: bool):
        """Gradients are summed across ranks once per optimizer step: skip the all-reduce (DDP) or
        reduce-scatter (FSDP) on every micro-batch but the last."""
        if last or not self.env.is_distributed:
            return contextlib.nullcontext()
        if self.sharded:
            return dist_utils.no_gradient_sync(self.model)
        return self.train_model.no_sync()

    def _train_step(self, batch_iter) -> dict[str, float]:
        config, env = self.config, self.env
        lr = learning_rate(
            self.step,
            max_lr=config.lr,
            total_steps=config.max_steps,
            warmup_steps=config.warmup_steps,
            schedule=config.schedule,
            min_lr_ratio=config.min_lr_ratio,
            decay_fraction=config.decay_fraction,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        micro_batches = [next(batch_iter) for _ in range(config.grad_accum)]
        # Average over every unit of the global batch, however the units fall across micro-batches
        # and ranks: each rank scales by world_size because DDP and FSDP average gradients over ranks.
        count = torch.tensor(sum(self.objective.count(b) for b in micro_batches), dtype=torch.float64)
        global_count = float(dist_utils.all_reduce_sum(count.to(self.device), env))
        aux_coef = self.model.config.aux_loss_coef if self.model.config.is_moe else 0.0
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        aux_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            with self._no_sync(last=index == len(micro_batches) - 1):
                with self.autocast:
                    result = self.objective.loss(self.train_model, batch)
                    loss = result.loss_sum * (env.world_size / max(global_count, 1.0))
                    loss = loss + aux_coef * result.aux_loss / len(micro_batches)
                loss.backward()
            loss_sum += result.loss_sum.detach().double()
            aux_sum += result.aux_loss.detach().float()
            for name, value in result.metric_sums.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value.detach().double()
        mean_loss = float(dist_utils.all_reduce_sum(loss_sum, env)) / max(global_count, 1.0)
        if not math.isfinite(mean_loss):
            raise WrenError(
                f"loss became {mean_loss} at step {self.step + 1}; stopped without saving. The last good "
                f"checkpoint is {self._last_checkpoint() or 'none (no checkpoint was written yet)'}. "
                "Try a lower --lr, more --warmup-steps or a smaller --grad-clip"
            )
        # Sharded parameters are DTensors: the norm is then computed across all shards.
        grad_norm = dist_utils.full_tensor(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(global_count)
        metrics = {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": float(grad_norm)}
        for name in sorted(metric_sums):  # the same order on every rank: these are collectives
            total = dist_utils.all_reduce_sum(metric_sums[name].reshape(()).to(self.device), env)
            metrics[f"train/{name}"] = float(total) / max(global_count, 1.0)
        if self.model.config.is_moe:
            metrics["train/aux_loss"] = float(aux_sum) / len(micro_batches)
            metrics.update(_expert_load_metrics(self.model))
        return {**metrics, "tokens": float(global_count)}

    def _last_checkpoint(self) -> Path | None:
        steps = checkpoint_steps(self.checkpoints_dir)
        return steps[-1][1] if steps else None

    def run(self) -> Path:
        """Train to max_steps; returns the final checkpoint directory."""
        try:
            self._setup()
            return self._run()
        finally:
            dist_utils.shutdown(self.env)

    def _run(self) -> Path:
        config, env = self.config, self.env
        logger = (
            MetricsLogger(self.out_dir, config.logger, config.to_dict(), config.wandb_project)
            if env.is_main
            else None
        )
        unit = self.objective.unit
        progress = Progress(
            config.max_steps,
            start_step=self.step,
            every=config.log_every,
            unit="tok" if unit == "tokens" else unit,
        )
        n_params = self.model.num_parameters()
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        shown = f"{n_params:,} parameters" + (f" ({trainable:,} trainable)" if trainable != n_params else "")
        processes = f" x{env.world_size}" if env.is_distributed else ""
        processes += " sharded (FSDP)" if self.sharded else ""
        self._log(
            f"training {shown} on {self.device}{processes}, "
            f"steps {self.step}->{config.max_steps}, "
            f"global batch {config.batch_size * config.grad_accum * env.world_size} "
            f"{'pairs' if unit == 'pairs' else 'sequences'} of up to {config.seq_len} tokens"
        )
        self.model.train()
        batch_iter = iter(self.batches)
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.step < config.max_steps:
                metrics = self._train_step(batch_iter)
                window_tokens += int(metrics.pop("tokens"))
                elapsed = time.perf_counter() - window_start
                tokens_per_second = window_tokens / max(elapsed, 1e-9)
                evaluated = {}
                if self.step % config.eval_every == 0 or self.step == config.max_steps:
                    evaluated = self._evaluate()
                if env.is_main:
                    metrics.update(evaluated, **{f"train/{unit}_per_second": tokens_per_second})
                    if self.step % config.log_every == 0 or evaluated or self.step == config.max_steps:
                        logger.log(self.step, metrics)
                    progress.update(self.step, metrics["train/loss"], tokens_per_second)
                    if evaluated:
                        shown = ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in evaluated.items())
                        progress.message(f"step {self.step}: validation {shown}")
                if self.step % config.save_every == 0 and self.step < config.max_steps:
                    self._save_step_checkpoint()
                if self.step % config.log_every == 0:
                    window_start, window_tokens = time.perf_counter(), 0
            self._save_step_checkpoint()
            final = self.out_dir / "final"
            if env.is_main:
                with atomic_directory(final) as staging:
                    shutil.copytree(self._last_checkpoint(), staging, dirs_exist_ok=True)
            dist_utils.barrier(env)
        finally:
            progress.close()
            if logger is not None:
                logger.close()
        self._log(
            f"done: {self.step} steps, {format_count(self.tokens_seen)} {self.objective.unit}; "
            f"model in {self.out_dir / 'final'}"
        )
        return self.out_dir / "final"
