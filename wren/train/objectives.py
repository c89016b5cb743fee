"""Objectives: what differs between kinds of training is the data and the loss, nothing else.

An objective turns JSONL files into an endless, resumable stream of batches and a batch into a
summed loss plus the count it should be averaged over; where it needs to, it also builds the
model (LoRA adapters), loads a second one (a DPO reference, a distillation teacher) and decides
what a checkpoint holds. The loop (loop.py) owns everything else: devices, precision,
accumulation, the schedule, checkpoints, resume, logging and progress.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from wren.checkpoint import load_model, save_checkpoint
from wren.data.batching import Batch, PackedSFTBatches, PretrainBatches, eval_batches
from wren.data.bpb import token_byte_lengths
from wren.data.shards import PreparedData, prepare_datasets
from wren.errors import WrenError
from wren.model import CausalLM, preset_config
from wren.model.config import PRESETS
from wren.tokenizer import Tokenizer
from wren.train.config import TrainConfig


@dataclass
class LossResult:
    loss_sum: torch.Tensor  # summed over the batch's units (target tokens, for language modelling)
    count: int  # how many units loss_sum adds up
    aux_loss: torch.Tensor  # MoE load-balancing loss (0 for dense models), scaled by the loop
    # Further quantities to log, each summed over the same units as loss_sum: the loop adds them
    # up over micro-batches and ranks and divides by the global count, as it does the loss.
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)


def describe_data(data: PreparedData, kind: str, noun: str, docs_per_item: int = 1) -> str:
    """One line for the log: how much training and validation data there is, and what was skipped."""
    train, val = data.train, data.val
    summary = f"{kind} data: {train.n_docs // docs_per_item:,} {noun}, {train.n_tokens:,} tokens"
    if val is not None:
        summary += f"; validation {val.n_docs // docs_per_item:,} {noun}, {val.n_tokens:,} tokens"
    if data.skipped:
        summary += f"; skipped {data.skipped:,} bad lines"
    return summary


def initial_model(config: TrainConfig) -> tuple[CausalLM, Tokenizer]:
    """The starting model, fp32 on the CPU: a checkpoint, or a freshly initialised preset."""
    if config.init is not None:
        return load_model(config.init, dtype=torch.float32), Tokenizer.load(config.init)
    if config.preset not in PRESETS:
        raise WrenError(f"unknown preset {config.preset!r}; expected one of {', '.join(PRESETS)}")
    tokenizer = Tokenizer.load(config.tokenizer)
    values = dict(
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        max_seq_len=max(config.seq_len, PRESETS[config.preset].get("max_seq_len", 2048)),
    )
    values.update(config.model_overrides)
    try:
        model_config = preset_config(config.preset, **values)
    except (TypeError, ValueError) as exc:
        raise WrenError(f"invalid model settings: {exc}") from exc
    torch.manual_seed(config.seed)
    return CausalLM(model_config), tokenizer


class Objective:
    """What one kind of training trains on and minimises. The defaults suit training a whole
    model; LoRA, DPO and distillation override the hooks they need.

    The loop calls, in order: build_model, (moves the model to its device), setup, prepare,
    train_batches; then count and loss for every micro-batch, evaluate every eval_every steps,
    and save for every checkpoint.
    """

    name = ""
    unit = "tokens"  # what count() counts: the loop reports throughput in these

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device

    def build_model(self, resume_from: Path | None) -> tuple[CausalLM, Tokenizer]:
        """The model to train, fp32 on the CPU: the checkpoint to resume, else the starting one."""
        if resume_from is not None:
            return load_model(resume_from, dtype=torch.float32), Tokenizer.load(resume_from)
        return initial_model(self.config)

    def setup(self, model: CausalLM) -> None:
        """Called once the model is on its device, before the optimizer is made: load whatever
        else the loss needs (a reference or teacher model)."""

    def prepare(self, tokenizer: Tokenizer, cache_dir: Path, *, is_main: bool) -> str:
        """Build (or reuse) the tokenised data; returns a one-line summary. Only the main process
        writes; the others call again after a barrier and read what it wrote."""
        raise NotImplementedError

    def prepare_data(
        self, tokenizer: Tokenizer, cache_dir: Path, kind: str, *, is_main: bool
    ) -> PreparedData:
        """Tokenise (or reuse) config.data as `kind` rows with the run's split and error settings."""
        config = self.config
        return prepare_datasets(
            config.data,
            tokenizer,
            kind,
            cache_dir,
            val_fraction=config.val_fraction,
            skip_bad_lines=config.skip_bad_lines,
            workers=config.workers,
            progress=is_main,
        )

    def train_batches(self, rank: int, world_size: int) -> Any:
        """An endless iterator of this rank's micro-batches, with state_dict / load_state_dict."""
        raise NotImplementedError

    def count(self, batch: Any) -> int:
        """How many units (target tokens, preference pairs...) the batch's loss averages over."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> LossResult:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics named "val/...", the first of them "val/loss"; {} without a
        validation set."""
        return {}

    def save(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        target: Path,
        write_extra: Callable[[Path], None],
    ) -> None:
        """Write a checkpoint atomically, calling write_extra(staging) to add the trainer state."""
        save_checkpoint(model, target, tokenizer=tokenizer, write_extra=write_extra)


def forward_batch(
    model: torch.nn.Module, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (logits, aux_loss) for a batch, with its positions and document ids if any."""
    input_ids = batch.input_ids.to(device, non_blocking=True)
    positions = batch.positions.to(device) if batch.positions is not None else None
    document_ids = batch.document_ids.to(device) if batch.document_ids is not None else None
    return model(input_ids, positions=positions, document_ids=document_ids)


def position_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats at every position (0 where targets are -100), shaped like targets."""
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return losses.view_as(targets)


def token_losses(
    model: torch.nn.Module, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy in nats (0 where targets are -100) and the MoE aux loss."""
    logits, aux_loss = forward_batch(model, batch, device)
    return position_losses(logits, batch.targets.to(device, non_blocking=True)), aux_loss


class LanguageModeling(Objective):
    """Next-token prediction. "pretrain": packed documents, every token a target. "sft": packed
    conversations with per-conversation attention, targets only on the assistant's tokens."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.name = self.kind = config.objective
        self.data: PreparedData | None = None
        self.tokenizer: Tokenizer | None = None
        self._byte_lengths: torch.Tensor | None = None

    def prepare(self, tokenizer: Tokenizer, cache_dir: Path, *, is_main: bool) -> str:
        self.tokenizer = tokenizer
        self.data = self.prepare_data(tokenizer, cache_dir, self.kind, is_main=is_main)
        return describe_data(self.data, self.kind, "rows")

    def train_batches(self, rank: int, world_size: int) -> PretrainBatches | PackedSFTBatches:
        config = self.config
        if self.kind == "pretrain":
            return PretrainBatches(
                self.data.train,
                config.batch_size,
                config.seq_len,
                seed=config.seed,
                rank=rank,
                world_size=world_size,
            )
        return PackedSFTBatches(
            self.data.train,
            config.batch_size,
            config.seq_len,
            seed=config.seed,
            rank=rank,
            world_size=world_size,
            pad_id=self.tokenizer.pad_token_id,
        )

    def count(self, batch: Batch) -> int:
        return batch.n_target_tokens

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossResult:
        losses, aux_loss = token_losses(model, batch, self.device)
        return LossResult(losses.sum(), batch.n_target_tokens, aux_loss)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if self.data is None or self.data.val is None:
            return {}
        if self._byte_lengths is None:
            self._byte_lengths = torch.as_tensor(token_byte_lengths(self.tokenizer), dtype=torch.long)
        config = self.config
        total_nats, total_tokens, total_bytes = 0.0, 0, 0
        extras: dict[str, float] = {}
        for batch in eval_batches(
            self.data.val,
            self.kind,
            config.batch_size,
            config.seq_len,
            config.eval_batches,
            pad_id=self.tokenizer.pad_token_id,
        ):
            logits, _ = forward_batch(model, batch, self.device)
            targets = batch.targets.to(self.device)
            losses = position_losses(logits, targets)
            real = batch.targets != -100
            total_nats += float(losses.sum())
            total_tokens += int(real.sum())
            total_bytes += int(self._byte_lengths[batch.targets[real]].sum())
            for name, value in self.validation_sums(logits, batch, targets).items():
                extras[name] = extras.get(name, 0.0) + float(value)
        if total_tokens == 0:
            return {}
        return {
            "val/loss": total_nats / total_tokens,
            "val/bpb": total_nats / (math.log(2) * max(total_bytes, 1)),
            **{f"val/{name}": value / total_tokens for name, value in extras.items()},
        }

    def validation_sums(
        self, logits: torch.Tensor, batch: Batch, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Further validation quantities, summed over the batch's target tokens, computed from the
        same forward pass as the loss; reported per target token as val/<name>."""
        return {}


# Every objective by name, as "module:class", imported when chosen: objectives live in modules
# of their own and import this one for the base class. config.OBJECTIVES lists the same names.
REGISTRY = {
    "pretrain": "wren.train.objectives:LanguageModeling",
    "sft": "wren.train.objectives:LanguageModeling",
    "lora": "wren.train.lora:LoRATraining",
    "dpo": "wren.train.dpo:DPO",
    "distill": "wren.train.distill:Distillation",
    "reason": "wren.train.reason:ReasoningSFT",
}


def make_objective(config: TrainConfig, device: torch.device) -> Objective:
    if config.objective not in REGISTRY:
        raise WrenError(f"unknown objective {config.objective!r}; expected one of {', '.join(REGISTRY)}")
    module_name, class_name = REGISTRY[config.objective].split(":")
    return getattr(importlib.import_module(module_name), class_name)(config, device)
