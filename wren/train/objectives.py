"""Objectives: what differs between kinds of training is the data and the loss, nothing else.

An objective turns JSONL files into an endless, resumable stream of batches and a batch into a
summed loss plus the count it should be averaged over. The loop (loop.py) owns everything else:
devices, precision, accumulation, the schedule, checkpoints, resume, logging and progress.
Later objectives (LoRA, DPO, distillation, reasoning SFT) implement the same three methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from wren.data.batching import Batch, PackedSFTBatches, PretrainBatches, eval_batches
from wren.data.bpb import token_byte_lengths
from wren.data.shards import prepare_datasets
from wren.tokenizer import Tokenizer


@dataclass
class LossResult:
    loss_sum: torch.Tensor  # summed over the batch's units (target tokens, for language modelling)
    count: int  # how many units loss_sum adds up
    aux_loss: torch.Tensor  # MoE load-balancing loss (0 for dense models), scaled by the loop
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    loss: float  # mean nats per target token
    bits_per_byte: float  # comparable across tokenizers


class Objective(Protocol):
    name: str

    def prepare(self, paths: list[str], tokenizer: Tokenizer, cache_dir: Path, *, is_main: bool) -> str:
        """Build (or reuse) the tokenised data; returns a one-line summary. Only the main process
        writes; the others call again after a barrier and read what it wrote."""

    def train_batches(self, batch_size: int, seq_len: int, seed: int, rank: int, world_size: int): ...

    def count(self, batch: Batch) -> int: ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossResult: ...

    def evaluate(
        self, model: torch.nn.Module, batch_size: int, seq_len: int, max_batches: int
    ) -> EvalResult | None: ...


def token_losses(
    model: torch.nn.Module, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy in nats (0 where targets are -100) and the MoE aux loss."""
    input_ids = batch.input_ids.to(device, non_blocking=True)
    targets = batch.targets.to(device, non_blocking=True)
    positions = batch.positions.to(device) if batch.positions is not None else None
    document_ids = batch.document_ids.to(device) if batch.document_ids is not None else None
    logits, aux_loss = model(input_ids, positions=positions, document_ids=document_ids)
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return losses.view_as(targets), aux_loss


class LanguageModeling:
    """Next-token prediction. "pretrain": packed documents, every token a target. "sft": packed
    conversations with per-conversation attention, targets only on the assistant's tokens."""

    def __init__(self, kind: str, *, val_fraction: float, skip_bad_lines: bool, workers: int | None, device):
        self.name = kind
        self.kind = kind
        self.val_fraction = val_fraction
        self.skip_bad_lines = skip_bad_lines
        self.workers = workers
        self.device = device
        self.data = None
        self.tokenizer: Tokenizer | None = None
        self._byte_lengths: torch.Tensor | None = None

    def prepare(self, paths: list[str], tokenizer: Tokenizer, cache_dir: Path, *, is_main: bool) -> str:
        self.tokenizer = tokenizer
        self.data = prepare_datasets(
            paths,
            tokenizer,
            self.kind,
            cache_dir,
            val_fraction=self.val_fraction,
            skip_bad_lines=self.skip_bad_lines,
            workers=self.workers,
            progress=is_main,
        )
        train, val = self.data.train, self.data.val
        summary = f"{self.kind} data: {train.n_docs:,} rows, {train.n_tokens:,} tokens"
        if val is not None:
            summary += f"; validation {val.n_docs:,} rows, {val.n_tokens:,} tokens"
        if self.data.skipped:
            summary += f"; skipped {self.data.skipped:,} bad lines"
        return summary

    def train_batches(self, batch_size: int, seq_len: int, seed: int, rank: int, world_size: int):
        batches = PretrainBatches if self.kind == "pretrain" else PackedSFTBatches
        kwargs = {} if self.kind == "pretrain" else {"pad_id": self.tokenizer.pad_token_id}
        return batches(
            self.data.train, batch_size, seq_len, seed=seed, rank=rank, world_size=world_size, **kwargs
        )

    def count(self, batch: Batch) -> int:
        return batch.n_target_tokens

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossResult:
        losses, aux_loss = token_losses(model, batch, self.device)
        return LossResult(losses.sum(), batch.n_target_tokens, aux_loss)

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, batch_size: int, seq_len: int, max_batches: int
    ) -> EvalResult | None:
        if self.data is None or self.data.val is None:
            return None
        if self._byte_lengths is None:
            self._byte_lengths = torch.as_tensor(token_byte_lengths(self.tokenizer), dtype=torch.long)
        total_nats, total_tokens, total_bytes = 0.0, 0, 0
        for batch in eval_batches(self.data.val, self.kind, batch_size, seq_len, max_batches):
            losses, _ = token_losses(model, batch, self.device)
            real = batch.targets != -100
            total_nats += float(losses.sum())
            total_tokens += int(real.sum())
            total_bytes += int(self._byte_lengths[batch.targets[real]].sum())
        if total_tokens == 0:
            return None
        return EvalResult(total_nats / total_tokens, total_nats / (math.log(2) * max(total_bytes, 1)))


def make_objective(
    name: str, *, val_fraction: float, skip_bad_lines: bool, workers: int | None, device
) -> Objective:
    if name in ("pretrain", "sft"):
        return LanguageModeling(
            name, val_fraction=val_fraction, skip_bad_lines=skip_bad_lines, workers=workers, device=device
        )
    raise ValueError(f"unknown objective {name!r}")
