"""Token datasets to training batches: endless, shuffled per epoch, resumable, split over ranks.

Every rank walks the same global sequence of rows and takes its own slice, so the data a step
sees depends on the seed and the global batch only, never on how many processes share it: a
2-process run and a 1-process run with the same global batch train on identical rows.

Pretraining rows are windows of seq_len + 1 consecutive tokens of the packed corpus (documents
end to end, each closed by the end-of-text token): inputs are the first seq_len, targets the last
seq_len. Every position is a real token; nothing is padded.

SFT rows are whole conversations packed side by side (best fit, in shuffled groups), with the
positions restarting at 0 for each conversation and a document id per conversation so attention
never crosses from one into another. Targets are the next token where that token is part of an
assistant reply, else -100. The few positions left at the end of a row are padding: their
targets are -100 and they form a document of their own.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wren.data.shards import TokenDataset
from wren.errors import WrenError

IGNORE_INDEX = -100
# SFT conversations are packed in groups of this many (after shuffling): big enough that best fit
# leaves little room unused, small enough that packing an epoch of a million conversations takes
# a second or two.
PACKING_GROUP = 1024


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, seq) int64
    targets: torch.Tensor  # (batch, seq) int64, IGNORE_INDEX where nothing is learned
    positions: torch.Tensor | None  # (batch, seq) or None for 0..seq-1 on every row
    document_ids: torch.Tensor | None  # (batch, seq) or None when a row is one attention span
    n_target_tokens: int  # targets that are not IGNORE_INDEX

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


class _EpochStream:
    """An endless sequence of rows, epoch after epoch; each epoch's rows come from `_epoch_rows`.

    `state_dict` is (epoch, offset of the next unread row); restoring it rebuilds that epoch's
    rows from the seed, so resuming needs no more than those two numbers.
    """

    kind = ""

    def __init__(self, batch_size: int, seq_len: int, seed: int, rank: int, world_size: int) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.epoch = 0
        self.offset = 0
        self._rows: list[Any] | None = None

    def _require_items(self, dataset: TokenDataset, count: int, noun: str) -> None:
        # An epoch of no rows would leave _take_global_rows looping forever in search of one.
        if count == 0:
            raise WrenError(f"{dataset.directory}: no {noun}; expected at least one to train on")

    def _epoch_rows(self, epoch: int) -> list[Any]:
        raise NotImplementedError

    def _make_batch(self, rows: list[Any]) -> Batch:
        raise NotImplementedError

    def _take_global_rows(self) -> list[Any]:
        rows: list[Any] = []
        while len(rows) < self.global_batch:
            if self._rows is None:
                self._rows = self._epoch_rows(self.epoch)
            wanted = self.global_batch - len(rows)
            rows.extend(self._rows[self.offset : self.offset + wanted])
            self.offset += wanted
            if self.offset >= len(self._rows):
                self.epoch, self.offset, self._rows = self.epoch + 1, 0, None
        return rows

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rows = self._take_global_rows()
        return self._make_batch(rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("kind", "seq_len", "global_batch"):
            if state.get(name) != getattr(self, name):
                raise WrenError(
                    f"the checkpoint's data position was saved with {name}={state.get(name)!r}, this run "
                    f"has {name}={getattr(self, name)!r}; resume with the same settings"
                )
        self.seed = state["seed"]
        self.epoch, self.offset, self._rows = state["epoch"], state["offset"], None


class PretrainBatches(_EpochStream):
    """Non-overlapping windows of the packed corpus, in a new random order each epoch."""

    kind = "pretrain"

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(batch_size, seq_len, seed, rank, world_size)
        self.dataset = dataset
        self.n_windows = (dataset.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise WrenError(
                f"{dataset.directory}: {dataset.n_tokens} tokens is too little for one sequence of "
                f"{seq_len} + 1; use a shorter --seq-len or more data"
            )

    def _epoch_rows(self, epoch: int) -> list[int]:
        return _rng(self.seed, epoch).permutation(self.n_windows).tolist()

    def _make_batch(self, rows: list[int]) -> Batch:
        return _window_batch(self.dataset, rows, self.seq_len)


def _window_batch(dataset: TokenDataset, windows: list[int], seq_len: int) -> Batch:
    chunk = np.stack([dataset.tokens[w * seq_len : w * seq_len + seq_len + 1] for w in windows]).astype(
        np.int64
    )
    tokens = torch.from_numpy(chunk)
    return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), None, None, len(windows) * seq_len)


def pack_documents(
    lengths: np.ndarray, order: np.ndarray, capacity: int, group: int = PACKING_GROUP
) -> list[list[int]]:
    """Rows of document indices, each row's lengths summing to at most `capacity`.

    Documents are taken in `order`, `group` at a time; within a group each row starts with the
    longest document left and is filled with the longest that still fits (best fit decreasing).
    Documents longer than `capacity` get a row of their own (they are truncated later).
    """
    rows: list[list[int]] = []
    for start in range(0, len(order), group):
        members = order[start : start + group]
        sizes = np.minimum(lengths[members], capacity)
        by_size = np.argsort(sizes, kind="stable")
        keys = sizes[by_size].tolist()  # ascending
        items = members[by_size].tolist()
        while items:
            row = [items.pop()]
            room = capacity - keys.pop()
            while room > 0 and keys:
                fit = bisect.bisect_right(keys, room) - 1
                if fit < 0:
                    break
                room -= keys.pop(fit)
                row.append(items.pop(fit))
            rows.append(row)
    return rows


class PackedSFTBatches(_EpochStream):
    """Conversations packed into rows of seq_len, shuffled and re-packed each epoch."""

    kind = "sft"

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
    ) -> None:
        super().__init__(batch_size, seq_len, seed, rank, world_size)
        if dataset.mask is None:
            raise WrenError(f"{dataset.directory}: SFT batches need a dataset with a loss mask")
        self._require_items(dataset, dataset.n_docs, "conversations")
        self.dataset = dataset
        self.pad_id = pad_id
        self.lengths = np.asarray(dataset.lengths)
        self.n_truncated = int((self.lengths > seq_len).sum())

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        order = _rng(self.seed, epoch).permutation(len(self.lengths))
        return pack_documents(self.lengths, order, self.seq_len)

    def _make_batch(self, rows: list[list[int]]) -> Batch:
        return _packed_batch(self.dataset, rows, self.seq_len, self.pad_id)


def _packed_batch(dataset: TokenDataset, rows: list[list[int]], seq_len: int, pad_id: int) -> Batch:
    shape = (len(rows), seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    document_ids = np.full(shape, -1, dtype=np.int64)
    for r, documents in enumerate(rows):
        at = 0
        for d, index in enumerate(documents):
            ids = np.asarray(dataset.document(index)[:seq_len], dtype=np.int64)
            mask = np.asarray(dataset.document_mask(index)[: len(ids)], dtype=bool)
            n = len(ids)
            input_ids[r, at : at + n] = ids
            # Position i predicts token i + 1 of the same conversation, if the assistant said it.
            targets[r, at : at + n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            positions[r, at : at + n] = np.arange(n)
            document_ids[r, at : at + n] = d
            at += n
        # Padding gets positions 0.. of its own so no row ever shows one document's positions twice.
        positions[r, at:] = np.arange(seq_len - at)
    n_targets = int((targets != IGNORE_INDEX).sum())
    return Batch(
        torch.from_numpy(input_ids),
        torch.from_numpy(targets),
        torch.from_numpy(positions),
        torch.from_numpy(document_ids),
        n_targets,
    )


def eval_batches(
    dataset: TokenDataset,
    kind: str,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    pad_id: int = 0,
) -> Iterator[Batch]:
    """The validation set in file order, once, as at most `max_batches` batches (None: all)."""
    if kind == "pretrain" and 2 <= dataset.n_tokens <= seq_len:
        # Too short for one full window: evaluate it as one shorter sequence rather than not at all.
        yield _window_batch(dataset, [0], dataset.n_tokens - 1)
        return
    if kind == "pretrain":
        rows: list[Any] = list(range((dataset.n_tokens - 1) // seq_len))
    else:
        rows = pack_documents(np.asarray(dataset.lengths), np.arange(dataset.n_docs), seq_len)
    for count, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        chunk = rows[start : start + batch_size]
        yield (
            _window_batch(dataset, chunk, seq_len)
            if kind == "pretrain"
            else _packed_batch(dataset, chunk, seq_len, pad_id)
        )
