"""One decode forward over many slots of a transformers model: their KV caches side by side.

Each slot is prefilled into its own `DynamicCache`. For decoding, the slots' keys and values are
stacked into one batched cache, left-padded to the longest; an attention mask hides the padding
and explicit position ids give every row its own positions, so each row computes what it would
alone while the weights are read once per step instead of once per stream. A decode step appends
one column to every row. The batch is rebuilt only when its slots change (a request joins or
leaves), at the cost of one copy of the caches.

Only models that can be batched this way are: transformers' own model code (remote code may ignore
the padding mask), a forward that takes `attention_mask` and `position_ids`, a cache of plain
full-attention layers (sliding-window and recurrent layers keep state a left pad would corrupt),
and rotary embeddings that do not depend on the batch (dynamic NTK and LongRoPE rescale by the
longest position in the batch, so a neighbour would change a row). transformers is imported only
when a batch is built.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def can_batch(model: Any) -> bool:
    """Whether `SlotBatch` gives this model the tokens it gives each slot alone."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not type(model).__module__.startswith("transformers."):
        return False
    accepted = inspect.signature(model.forward).parameters
    if "attention_mask" not in accepted or "position_ids" not in accepted:
        return False
    if _rope_types(getattr(model.config, "rope_parameters", None)) & _BATCH_DEPENDENT_ROPE:
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config the cache cannot read: decode slot by slot
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


_BATCH_DEPENDENT_ROPE = {"dynamic", "longrope"}


def _rope_types(parameters: Any) -> set[str]:
    """The rope types in a config's `rope_parameters` (one dict, or one per layer type)."""
    if not isinstance(parameters, dict):
        return set()
    if "rope_type" in parameters or "type" in parameters:
        return {parameters.get("rope_type", parameters.get("type"))}
    return set().union(*(_rope_types(value) for value in parameters.values()))


class SlotBatch:
    """The decoding slots' caches as one left-padded batch (see the module docstring)."""

    def __init__(self) -> None:
        self.slots: list[int | None] = []  # the slot of each row; None: its request left
        self.cache: Any = None
        self.padding = torch.zeros(0, dtype=torch.long)  # left padding of each row
        self._padded = False

    def drop(self, slot: int) -> None:
        """The slot's request left (or a new one is being prefilled into it): forget its row."""
        if slot in self.slots:
            self.slots[self.slots.index(slot)] = None

    def regroup(self, slots: list[int], loose: list[Any]) -> None:
        """Make the rows exactly `slots`, in order. A slot not in the batch brings its own
        prefilled cache from `loose`, which the batch takes over (its entry becomes None)."""
        from transformers import DynamicCache

        rows = {slot: row for row, slot in enumerate(self.slots) if slot is not None}
        parts = []  # per slot: its (keys, values) per layer, each (heads, length, dim), or None
        for slot in slots:
            if slot in rows:
                parts.append(self._row(rows[slot]))
            else:
                parts.append(_only_row(loose[slot]))
                loose[slot] = None
        lengths = [0 if kv is None else kv[0][0].shape[1] for kv in parts]
        longest = max(lengths)
        self.slots = list(slots)
        self.padding = torch.tensor([longest - length for length in lengths], dtype=torch.long)
        self._padded = bool(self.padding.any())
        if longest == 0:
            self.cache = DynamicCache()
            return
        template = next(kv for kv in parts if kv is not None)
        layers = []
        for layer, pair in enumerate(template):
            # Keys and values may differ in width (heads x dim), so each is stacked on its own.
            stacked = []
            for which, like in enumerate(pair):
                heads, _, dim = like.shape
                tensor = like.new_zeros(len(slots), heads, longest, dim)
                for row, kv in enumerate(parts):
                    if kv is not None:
                        tensor[row, :, longest - lengths[row] :] = kv[layer][which]
                stacked.append(tensor)
            layers.append((stacked[0], stacked[1]))
        self.cache = DynamicCache(ddp_cache_data=layers)

    def forward(self, model: Any, ids: list[int], positions: list[int], device: torch.device) -> torch.Tensor:
        """One token per row at its own position; next-token logits of shape (rows, vocab)."""
        mask = None
        if self._padded:
            columns = torch.arange(self.cache.get_seq_length() + 1)
            mask = (columns >= self.padding[:, None]).long().to(device)
        out = model(
            input_ids=torch.tensor(ids, device=device)[:, None],
            attention_mask=mask,
            position_ids=torch.tensor(positions, device=device)[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()

    def _row(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        start = int(self.padding[row])
        if start == self.cache.get_seq_length():
            return None
        return [(layer.keys[row, :, start:], layer.values[row, :, start:]) for layer in self.cache.layers]


def _only_row(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A one-row cache's keys and values per layer; None when it holds nothing (a 1-token prompt)."""
    if cache is None or cache.get_seq_length() == 0:
        return None
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]
