"""The decode step under torch.compile, with the few input shapes that compiling needs.

A decode step is small and repeated thousands of times, so what it costs beyond the arithmetic
(Python, one kernel launch per operation) dominates. Compiled, the whole step is a handful of
fused kernels; on CUDA, `mode="reduce-overhead"` also records it as a CUDA graph and replays it
with one launch.

Both want few distinct shapes, and a running batch has many: any number of active slots, each
reading the cache up to its own length. So a step is padded to a bucket:
- the batch to the next power of two (capped at the slot count), the extra rows taken by free
  slots that decode a dummy token at position 0, which a later occupant overwrites before
  reading it (the same argument that lets a slot be reused without clearing);
- the span of cache that attention reads to the next power of two from `MIN_SPAN`, which only
  adds masked keys.
The bucket sizes are a handful; dynamo compiles the step once per batch bucket (twice: cache rows
in order, or gathered) and marks the span dynamic after the second length, and CUDA graphs are
recorded once per bucket pair. That can pass dynamo's default limit of 8 variants per function,
so compiling runs with a higher one.

Before each call dynamo checks its guards, ~1,800 of them here (every weight's and cache tensor's
dtype, shape and strides, the module attributes the code read), about 0.15 ms on our CPU: some 7%
of a small model's step. Once a bucket has run with every guard checked, a later call with the
same bucket differs from it only in tensor values, which no guard reads, so it runs with dynamo's
`skip_guard_eval_unsafe` stance: only the guards that tell the compiled variants apart. Where none
fits, dynamo raises instead of running one; the bucket then goes back to checking every guard.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from wren.model import CausalLM, KVCache

MIN_SPAN = 64
# Compiled variants of the step allowed: a few per batch bucket (cache rows in order or gathered,
# the first span and then any span), for every engine in the process, which all share the step's
# code. Dynamo's default, 8, runs the rest uncompiled.
RECOMPILE_LIMIT = 64
# (named cache_size_limit before PyTorch 2.6)
_LIMIT_SETTING = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
# The stance arrived after PyTorch 2.5, our lowest supported version; there every call checks all.
CAN_SKIP_GUARDS = hasattr(torch.compiler, "set_stance") and (
    "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters
)


def bucket(n: int, lowest: int, highest: int) -> int:
    """The smallest power of two >= n (and >= lowest), capped at highest."""
    size = lowest
    while size < n:
        size *= 2
    return min(size, highest)


class CompiledDecode:
    """Decode steps of `model` over `cache`, compiled; called like NativeRunner.decode."""

    def __init__(self, model: CausalLM, cache: KVCache, skip_guards: bool = True) -> None:
        """`skip_guards=False` checks every guard on every call (see the module docstring)."""
        self.model = model
        self.skip_guards = skip_guards and CAN_SKIP_GUARDS
        self.cache = cache
        self.device = cache.device
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda:
            # CUDA graphs replay fixed addresses: the cache is updated in place, never moved.
            for tensor in [*cache.keys, *cache.values]:
                torch._dynamo.mark_static_address(tensor)
        else:
            # One table lookup per step instead of sines and cosines per cached key (wren.model.rope).
            model.model.rotary_emb.build_table(cache.max_len)
        mode = "reduce-overhead" if self.on_cuda else None
        self._step = torch.compile(self._forward, mode=mode)
        self.failed = False
        # Buckets that have run with every guard checked: True while their later calls skip them.
        self._checked: dict[tuple[int, bool, int], bool] = {}

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None, span: int
    ) -> torch.Tensor:
        logits = self.model(tokens, positions=positions, cache=self.cache, cache_rows=rows, cache_span=span)
        return logits.logits[:, -1]

    def __call__(self, slots: list[int], ids: list[int], positions: list[int]) -> torch.Tensor | None:
        """Logits for the slots, or None once compiling has failed (the caller decodes eagerly)."""
        if self.failed:
            return None
        n = len(slots)
        size = bucket(n, 1, self.cache.batch_size)
        taken = set(slots)
        free = (slot for slot in range(self.cache.batch_size) if slot not in taken)
        padded_slots = slots + [next(free) for _ in range(size - n)]
        tokens = torch.tensor(ids + [0] * (size - n), device=self.device)[:, None]
        where = torch.tensor(positions + [0] * (size - n), device=self.device)[:, None]
        rows = None if padded_slots == list(range(size)) else torch.tensor(padded_slots, device=self.device)
        span = bucket(max(positions) + 1, MIN_SPAN, self.cache.max_len)
        if self.on_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            logits = self._run((size, rows is None, span), tokens, where, rows, span)
        except torch._dynamo.exc.TorchDynamoException as error:
            # Compiling fails before the step runs, so the cache is as it was: decode eagerly.
            warnings.warn(f"torch.compile failed, decoding without it: {error}", stacklevel=2)
            self.failed = True
            return None
        # On CUDA a copy: the next replay of a CUDA graph overwrites its output buffer.
        return logits[:n].clone() if self.on_cuda else logits[:n]

    def _run(self, key: tuple[int, bool, int], *args) -> torch.Tensor:
        """The compiled step for one bucket, skipping the guards once the bucket has been checked."""
        if self._checked.get(key) and self.skip_guards:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self._step(*args)
            except RuntimeError:
                # No compiled variant fits (dynamo raises before running anything), or the step
                # itself failed: either way, run with every guard checked, and keep checking them.
                self._checked[key] = False
        with torch._dynamo.config.patch(**{_LIMIT_SETTING: RECOMPILE_LIMIT}):
            logits = self._step(*args)
        self._checked.setdefault(key, True)
        return logits
