"""A preallocated key/value cache addressed by explicit positions.

Each batch row writes its keys and values at the positions it is given, so rows may be at
different lengths (continuous batching) and a prompt may be fed in chunks. Attention reads the
cache up to the furthest position written and masks every key whose position is after the query's,
which also hides whatever a previous, longer occupant of the row left behind.
"""

from __future__ import annotations

import torch

from wren.model.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        # One tensor per layer, not one for all: a compiled step then updates each in place,
        # where an update through a view of a shared tensor makes inductor copy all of it.
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.dtype = dtype
        self.device = self.keys[0].device
        self._rows = torch.arange(batch_size, device=device)[:, None]

    @property
    def batch_size(self) -> int:
        return self._rows.shape[0]

    def update(
        self,
        layer: int,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        span: int,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (batch, kv_heads, seq, head_dim) at positions (batch, seq).

        Batch row i uses cache row rows[i] (a 1-D index tensor), or row i when rows is None.
        Returns this layer's cache for positions [0, span) of those rows.
        """
        n = positions.shape[0]
        index = self._rows[:n] if rows is None else rows[:, None]
        # Advanced indices split by a slice put the indexed dims first: (batch, seq, heads, dim).
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        layer_keys[index, :, positions] = keys.transpose(1, 2).to(self.dtype)
        layer_values[index, :, positions] = values.transpose(1, 2).to(self.dtype)
        if rows is None:
            return layer_keys[:n, :, :span], layer_values[:n, :, :span]
        # An arbitrary set of rows (a continuous batch's active slots) costs one gather.
        return layer_keys[:, :, :span][rows], layer_values[:, :, :span][rows]
