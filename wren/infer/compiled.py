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

On the CPU even that leaves much between our call and the generated kernel: dynamo's remaining
guards, the AOT wrapper and its handling of ~150 inputs (without them the small preset's int8 step
went from 2.24 to 1.61 ms; benchmarks/RESULTS.md). So a CPU bucket, once compiled, is replayed:
its second call records the one call it makes into inductor's compiled graph (the flat list of
weights, cache tensors and inputs), and later calls make that call directly. Its inputs are the
bucket's own tensors, which each step fills in place, so the recorded list stays valid. A step
that does not reach inductor in exactly one call (an MoE step with graph breaks), or whose replay
does not reproduce the recorded logits bit for bit and rewrite the cache entries the step wrote
(blanked first), is not replayed: the cache check catches a graph that leaves the cache update to
the wrappers it skips. This leans on inductor's `CompiledFxGraph` being called with one list of
inputs; where that class is missing, nothing is recorded and steps run as above.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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

    def __init__(
        self, model: CausalLM, cache: KVCache, skip_guards: bool = True, replay: bool = True
    ) -> None:
        """`skip_guards=False` checks every guard on every call, `replay=False` never replays a
        CPU bucket (see the module docstring); both are there to measure what they save."""
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
        if self.on_cuda:
            self._step = torch.compile(self._forward, mode="reduce-overhead")
        else:
            # Without the check of every buffer's size and strides that inductor's Python wrapper
            # makes by default: some 150 calls a step, which the guards and the replay's fixed
            # inputs make redundant (about a tenth of the small preset's int8 step; RESULTS.md).
            self._step = torch.compile(self._forward, options={"size_asserts": False})
        self.failed = False
        # Buckets that have run with every guard checked: True while their later calls skip them.
        self._checked: dict[tuple[int, bool, int], bool] = {}
        # CPU only: CUDA replays its own graphs, and the bucket inputs are filled through numpy.
        self.replay = replay and not self.on_cuda and _CompiledGraph is not None
        # Per bucket: its input tensors, and its recorded call (None: not replayable).
        self._inputs: dict[tuple[int, bool, int], tuple[torch.Tensor, ...]] = {}
        self._replays: dict[tuple[int, bool, int], Callable[[], torch.Tensor] | None] = {}

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
        in_order = padded_slots == list(range(size))
        span = bucket(max(positions) + 1, MIN_SPAN, self.cache.max_len)
        key = (size, in_order, span)
        padding = [0] * (size - n)
        tokens, where, rows = self._step_inputs(key, ids + padding, positions + padding, padded_slots)
        replay = self._replays.get(key)
        if replay is not None:
            return replay()[:n]
        if self.on_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            logits = self._run(key, tokens, where, rows, span)
        except torch._dynamo.exc.TorchDynamoException as error:
            # Compiling fails before the step runs, so the cache is as it was: decode eagerly.
            warnings.warn(f"torch.compile failed, decoding without it: {error}", stacklevel=2)
            self.failed = True
            return None
        # On CUDA a copy: the next replay of a CUDA graph overwrites its output buffer.
        return logits[:n].clone() if self.on_cuda else logits[:n]

    def _step_inputs(
        self, key: tuple[int, bool, int], ids: list[int], positions: list[int], slots: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The step's token, position and cache-row tensors (rows None when the slots are 0..n-1).
        For replay, the bucket's own, made on its first call and filled in place; else new ones."""
        in_order = key[1]
        if not self.replay:
            rows = None if in_order else torch.tensor(slots, device=self.device)
            return (
                torch.tensor(ids, device=self.device)[:, None],
                torch.tensor(positions, device=self.device)[:, None],
                rows,
            )
        if key not in self._inputs:
            rows = None if in_order else torch.zeros(len(slots), dtype=torch.long)
            self._inputs[key] = (
                torch.zeros(len(ids), 1, dtype=torch.long),
                torch.zeros(len(ids), 1, dtype=torch.long),
                rows,
            )
        tokens, where, rows = self._inputs[key]
        tokens.numpy()[:, 0] = ids
        where.numpy()[:, 0] = positions
        if rows is not None:
            rows.numpy()[:] = slots
        return tokens, where, rows

    def _run(self, key: tuple[int, bool, int], *args) -> torch.Tensor:
        """The compiled step for one bucket, skipping the guards once the bucket has been checked,
        and recording it for replay on its second call."""
        if self._checked.get(key) and self.replay and key not in self._replays:
            return self._record(key, *args)
        if self._checked.get(key) and self.skip_guards:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self._step(*args)
            except RuntimeError:
                # No compiled variant fits (dynamo raises before running anything), or the step
                # itself failed: either way, run with every guard checked, and keep checking them.
                self._checked[key] = False
        logits = self._checked_step(args)
        self._checked.setdefault(key, True)
        return logits

    def _record(
        self,
        key: tuple[int, bool, int],
        tokens: torch.Tensor,
        where: torch.Tensor,
        rows: torch.Tensor | None,
        span: int,
    ) -> torch.Tensor:
        """The bucket's step with every guard checked, its call into the compiled graph recorded
        and kept for replay if repeating it gives the same logits and cache entries."""
        with _recording_compiled_graph_calls() as calls:
            logits = self._checked_step((tokens, where, rows, span))
        slots = range(len(tokens)) if rows is None else rows.tolist()
        written = [
            layer[slot, :, position]
            for layer in self.cache.keys + self.cache.values
            for slot, position in zip(slots, where[:, 0].tolist(), strict=True)
        ]
        self._replays[key] = _verified_replay(calls, logits, written)
        return logits

    def _checked_step(self, args: tuple) -> torch.Tensor:
        with torch._dynamo.config.patch(**{_LIMIT_SETTING: RECOMPILE_LIMIT}):
            return self._step(*args)


try:  # inductor's compiled graph, called with the flat list of a step's inputs
    from torch._inductor.output_code import CompiledFxGraph as _CompiledGraph
except ImportError:
    _CompiledGraph = None


@contextmanager
def _recording_compiled_graph_calls() -> Iterator[list[tuple[object, list, object]]]:
    """(graph, inputs, outputs) of every call into an inductor compiled graph meanwhile."""
    calls: list[tuple[object, list, object]] = []
    original = _CompiledGraph.__call__

    def record(graph, inputs):
        arguments = list(inputs)  # the graph empties the list it is given
        outputs = original(graph, inputs)
        calls.append((graph, arguments, outputs))
        return outputs

    _CompiledGraph.__call__ = record
    try:
        yield calls
    finally:
        _CompiledGraph.__call__ = original


def _verified_replay(
    calls: list[tuple[object, list, object]], logits: torch.Tensor, written: list[torch.Tensor]
) -> Callable[[], torch.Tensor] | None:
    """A call that repeats the one recorded graph call and returns the step's logits, or None if
    the step made other than one call, or its logits are not one of the graph's outputs, or the
    repeat does not give them again and rewrite the cache entries the step wrote (`written`,
    views of the cache, blanked first: a graph that left the cache update to the wrappers around
    it would not). Repeating a step is otherwise harmless: it writes the same keys and values at
    the same positions."""
    if len(calls) != 1:
        return None
    graph, arguments, outputs = calls[0]
    index = next((i for i, out in enumerate(outputs) if out is logits), None)
    if index is None:
        return None

    def replay() -> torch.Tensor:
        return graph(list(arguments))[index]

    saved = [entry.clone() for entry in written]
    for entry in written:
        entry.fill_(float("nan"))
    same = torch.equal(replay(), logits)
    same = same and all(torch.equal(entry, value) for entry, value in zip(written, saved, strict=True))
    if not same:
        for entry, value in zip(written, saved, strict=True):
            entry.copy_(value)
    return replay if same else None
