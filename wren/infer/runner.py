"""Model runners: the one part of the engine that knows which model code it drives.

The engine schedules requests over numbered slots and samples tokens; a runner owns the model and
the slots' KV caches. It takes a slot's prompt (`prefill`) and returns next-token logits for a set
of slots, each at its own position (`decode`). `NativeRunner` drives Wren's own model over one
preallocated cache; the transformers backend (`wren.infer.transformers_backend`) drives any
`AutoModelForCausalLM` with the same two calls.
"""

from __future__ import annotations

from typing import Protocol

import torch

from wren.infer.weight_arena import pack_weights
from wren.model import CausalLM, KVCache
from wren.model.quant import load_cpu_kernels


class Runner(Protocol):
    vocab_size: int  # width of the logits; may exceed the tokenizer's vocabulary
    max_seq_len: int
    device: torch.device

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> None:
        """Fill each slot's cache with its prompt at positions 0..len-1 (a prompt may be empty)."""

    def decode(self, slots: list[int], ids: list[int], positions: list[int]) -> torch.Tensor:
        """Feed one token per slot at its position; return logits of shape (len(slots), vocab)."""

    def release(self, slot: int) -> None:
        """The slot's request has left; drop whatever it holds."""


class NativeRunner:
    """Wren's CausalLM over one preallocated KV cache: cache row i belongs to slot i.

    A reused row needs no clearing: attention masks every cached key past the query's position,
    and a new occupant writes positions 0..p before any query at p reads them.
    """

    def __init__(
        self,
        model: CausalLM,
        max_batch_size: int,
        max_seq_len: int,
        prefill_chunk: int,
        compile: bool = False,
    ) -> None:
        self.model = model.eval()
        param = next(model.parameters())
        self.device = param.device
        if self.device.type == "cpu":
            pack_weights(model)  # decoding streams every weight per token: make the stream fast
            load_cpu_kernels(model)  # before anything compiles the step (wren.kernels)
        self.vocab_size = model.config.vocab_size
        self.max_seq_len = min(max_seq_len, model.config.max_seq_len)
        self.prefill_chunk = prefill_chunk
        self.cache = KVCache(model.config, max_batch_size, self.max_seq_len, self.device, param.dtype)
        self.compiled = None
        if compile:
            from wren.infer.compiled import CompiledDecode

            self.compiled = CompiledDecode(model, self.cache)

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> None:
        """All the prompts in one forward pass per chunk of `prefill_chunk` positions.

        Shorter prompts are padded on the right. What the padding writes into the cache lies past
        the prompt's end, where attention masks it until the slot's own tokens overwrite it.
        """
        longest = max(map(len, prompts), default=0)
        for start in range(0, longest, self.prefill_chunk):
            pieces = [
                (slot, ids[start : start + self.prefill_chunk])
                for slot, ids in zip(slots, prompts, strict=True)
                if len(ids) > start
            ]
            width = max(len(piece) for _, piece in pieces)
            tokens = [piece + [0] * (width - len(piece)) for _, piece in pieces]
            positions = torch.arange(start, start + width, device=self.device).expand(len(pieces), -1)
            self.model(
                torch.tensor(tokens, device=self.device),
                positions=positions,
                cache=self.cache,
                cache_rows=torch.tensor([slot for slot, _ in pieces], device=self.device),
                logits_to_keep=0,
            )

    def decode(self, slots: list[int], ids: list[int], positions: list[int]) -> torch.Tensor:
        if self.compiled is not None:
            logits = self.compiled(slots, ids, positions)
            if logits is not None:
                return logits
        tokens = torch.tensor(ids, device=self.device)[:, None]
        where = torch.tensor(positions, device=self.device)[:, None]
        # The one-stream fast path, and any batch packed into slots 0..n-1: no row gather.
        rows = None if slots == list(range(len(slots))) else torch.tensor(slots, device=self.device)
        return self.model(tokens, positions=where, cache=self.cache, cache_rows=rows).logits[:, -1]

    def release(self, slot: int) -> None:
        pass
