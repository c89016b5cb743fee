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
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self._rows = torch.arange(batch_size, device=device)[:, None]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

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
        self.keys[layer][index, :, positions] = keys.transpose(1, 2).to(self.keys.dtype)
        self.values[layer][index, :, positions] = values.transpose(1, 2).to(self.values.dtype)
        if rows is None:
            return self.keys[layer, :n, :, :span], self.values[layer, :n, :, :span]
        # An arbitrary set of rows (a continuous batch's active slots) costs one gather.
        return self.keys[layer, :, :, :span][rows], self.values[layer, :, :, :span][rows]
