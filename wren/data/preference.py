"""Preference pairs to DPO batches: endless, shuffled per epoch, resumable, split over ranks.

A preference dataset (shards.py) holds each pair as two documents, chosen at 2i and rejected at
2i + 1, masked on their final assistant reply and ending with its closing token. A batch of B
pairs is 2B rows, chosen and rejected of each pair side by side (row 2j chosen, row 2j + 1
rejected), padded on the right to the longest row of the batch. Targets are the next token where
that token belongs to the final reply, else -100, so a row's summed log-likelihood over its
targets is log p(reply | prompt).

Rows are not packed: a pair's two rows must be scored whole, and DPO data are few rows of uneven
length, so the padding (up to the longest row of each batch) is the price of simple batches.
Padding sits after every real token of its row, so causal attention keeps it from changing what
the real tokens see, and it carries no target.

A pair longer than seq_len loses the start of its prompt, the same number of tokens from both
sides, just enough for the longer side to fit: the two replies keep the same context and the
reply, the part that is learned, stays whole. Only a reply that alone exceeds seq_len - 1 tokens
is cut, at its end (MiniMind cuts every sequence at the end, which can drop the reply entirely).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from wren.data.batching import IGNORE_INDEX, Batch, _EpochStream, _rng
from wren.data.shards import TokenDataset
from wren.errors import WrenError


@dataclass
class PreferenceBatch(Batch):
    """2 * n_pairs rows, chosen and rejected of each pair side by side; positions and document_ids
    are None (every row is one sequence starting at position 0)."""

    n_pairs: int


def check_preference_dataset(dataset: TokenDataset) -> None:
    """Raise WrenError unless `dataset` holds masked pairs (an even number of documents)."""
    if dataset.kind != "preference" or dataset.mask is None:
        raise WrenError(f"{dataset.directory}: a {dataset.kind} dataset; expected preference pairs")
    if dataset.n_docs % 2:
        raise WrenError(f"{dataset.directory}: {dataset.n_docs} documents; expected chosen/rejected pairs")


class PreferenceBatches(_EpochStream):
    """Pairs in a new random order each epoch, batch_size pairs (2 * batch_size rows) per rank."""

    kind = "preference"

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
        check_preference_dataset(dataset)
        self._require_items(dataset, dataset.n_docs // 2, "preference pairs")
        self.dataset = dataset
        self.pad_id = pad_id

    def _epoch_rows(self, epoch: int) -> list[int]:
        return _rng(self.seed, epoch).permutation(self.dataset.n_docs // 2).tolist()

    def _make_batch(self, rows: list[int]) -> PreferenceBatch:
        return preference_batch(self.dataset, rows, self.seq_len, self.pad_id)


def _reply_start(mask: np.ndarray) -> int:
    """Index of the first token of the final reply (the only masked span)."""
    return int(np.argmax(mask))


def preference_batch(
    dataset: TokenDataset, pairs: list[int], seq_len: int, pad_id: int = 0
) -> PreferenceBatch:
    """The batch of the given pair indices, truncated to seq_len as the module docstring says."""
    sides: list[tuple[np.ndarray, np.ndarray]] = []
    for pair in pairs:
        documents = [2 * pair, 2 * pair + 1]
        ids = [np.asarray(dataset.document(d), dtype=np.int64) for d in documents]
        masks = [np.asarray(dataset.document_mask(d), dtype=bool) for d in documents]
        # The prompt is shared, so both replies start at the same index; keep at least one prompt
        # token, since the first reply token is predicted from the one before it.
        prompt = min(_reply_start(mask) for mask in masks)
        cut = max(0, min(max(len(i) for i in ids) - seq_len, prompt - 1))
        sides.extend(
            (i[cut : cut + seq_len], m[cut : cut + seq_len]) for i, m in zip(ids, masks, strict=True)
        )
    width = max(len(ids) for ids, _ in sides)
    input_ids = np.full((len(sides), width), pad_id, dtype=np.int64)
    targets = np.full((len(sides), width), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, mask) in enumerate(sides):
        input_ids[row, : len(ids)] = ids
        targets[row, : len(ids) - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    n_targets = int((targets != IGNORE_INDEX).sum())
    return PreferenceBatch(
        torch.from_numpy(input_ids), torch.from_numpy(targets), None, None, n_targets, len(pairs)
    )


def eval_preference_batches(
    dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int | None = None, pad_id: int = 0
) -> Iterator[PreferenceBatch]:
    """The validation pairs in file order, once, batch_size pairs at a time, at most max_batches
    batches (None: all)."""
    check_preference_dataset(dataset)
    n_pairs = dataset.n_docs // 2
    for count, start in enumerate(range(0, n_pairs, batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        yield preference_batch(dataset, list(range(start, min(start + batch_size, n_pairs))), seq_len, pad_id)
