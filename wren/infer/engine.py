"""The native inference engine: continuous batching over a fixed set of KV-cache slots.

Each running request owns one cache row (a slot). `step()` is the only place that runs the model:
it admits waiting requests into free slots, prefills their prompts (all but the last token, in
chunks), then runs one decode forward over every active slot at its own position and samples
one token per slot with that request's own parameters and generator. Requests join and leave
between steps, so a short request never waits for a long one.

A reused slot needs no clearing: attention masks every cached key past the query's position, and
a new occupant writes positions 0..p before any query at p reads them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from wren.errors import WrenError
from wren.infer.request import Request, Result
from wren.infer.sampling import SamplingParams, sample, update_counts
from wren.model import CausalLM, KVCache

Prompt = str | list[int] | list[dict[str, Any]]


class Engine:
    """Batched generation for one model. Not thread-safe: drive it from one thread (or task)."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(model.config, max_batch_size, self.max_seq_len, self.device, param.dtype)
        vocab = model.config.vocab_size
        # Per-slot penalty state, reset when a request takes the slot.
        self.output_counts = torch.zeros(max_batch_size, vocab, dtype=torch.int32, device=self.device)
        self.prompt_mask = torch.zeros(max_batch_size, vocab, dtype=torch.bool, device=self.device)
        self.slots: list[Request | None] = [None] * max_batch_size
        self.waiting: deque[Request] = deque()
        self._tokenizer_stops = set(getattr(tokenizer, "stop_token_ids", ()))

    # -- requests -----------------------------------------------------------------------------

    def submit(self, prompt: Prompt, params: SamplingParams | None = None) -> Request:
        """Queue a prompt: raw text, token ids, or chat messages (rendered with the chat template
        and a generation prompt). It starts on the next `step()` that finds a free slot."""
        params = params or SamplingParams()
        params.validate()
        prompt_ids = self._encode(prompt)
        if not prompt_ids:
            raise WrenError("the prompt is empty")
        room = self.max_seq_len - len(prompt_ids)
        if room < 1:
            raise WrenError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_seq_len}, "
                "with room for at least one generated token"
            )
        stop_ids = self._tokenizer_stops | set(params.stop_token_ids)
        request = Request(prompt_ids, params, self.tokenizer, stop_ids, min(params.max_new_tokens, room))
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now; its slot is free for the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        request.cancel()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(self.slots)

    # -- driving ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit and prefill waiting requests, then give every active request one token.
        Returns the requests that finished in this step."""
        self._admit()
        active = [r for r in self.slots if r is not None]
        if not active:
            return []
        tokens = self._decode(active)
        finished = []
        for request, token in zip(active, tokens.tolist(), strict=True):
            if request.add_token(token):
                self._release(request)
                finished.append(request)
        return finished

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Result]:
        """Run every prompt to the end, batched; results in input order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        requests = [self.submit(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        while not all(r.done for r in requests):
            self.step()
        return [r.result for r in requests]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt as they are generated. Closing the iterator early cancels it."""
        request = self.submit(prompt, params)
        try:
            while True:
                for event in request.pop_events():
                    if isinstance(event, Result):
                        return
                    yield event
                self.step()
        finally:
            if not request.done:
                self.cancel(request)

    # -- internals ----------------------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if prompt and all(isinstance(m, dict) for m in prompt):
            return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < self.model.config.vocab_size for t in prompt):
                raise WrenError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
            return list(prompt)
        raise WrenError("a prompt is a string, a list of token ids, or a list of chat messages")

    def _release(self, request: Request) -> None:
        if request.slot is not None:
            self.slots[request.slot] = None
            request.slot = None

    def _admit(self) -> None:
        for slot, occupant in enumerate(self.slots):
            if not self.waiting:
                return
            if occupant is None:
                request = self.waiting.popleft()
                request.slot = slot
                self.slots[slot] = request
                self.output_counts[slot].zero_()
                self.prompt_mask[slot].zero_()
                self.prompt_mask[slot, torch.tensor(request.prompt_ids, device=self.device)] = True
                self._prefill(request)

    def _prefill(self, request: Request) -> None:
        # The last prompt token goes through the decode step with everyone else, so that its
        # logits are sampled alongside the other slots'.
        ids = request.prompt_ids[:-1]
        rows = torch.tensor([request.slot], device=self.device)
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk]
            self.model(
                torch.tensor([chunk], device=self.device),
                positions=torch.arange(start, start + len(chunk), device=self.device)[None],
                cache=self.cache,
                cache_rows=rows,
            )

    def _decode(self, active: list[Request]) -> torch.Tensor:
        slots = [r.slot for r in active]
        ids = torch.tensor([[r.next_input] for r in active], device=self.device)
        positions = torch.tensor([[r.next_position] for r in active], device=self.device)
        # Slots 0..n-1 in order read the cache without a gather.
        rows = None if slots == list(range(len(slots))) else torch.tensor(slots, device=self.device)
        logits = self.model(ids, positions=positions, cache=self.cache, cache_rows=rows).logits[:, -1]
        params = [r.params for r in active]
        penalised = any(
            p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
            for p in params
        )
        index = torch.tensor(slots, device=self.device)
        tokens = sample(
            logits,
            params,
            self.output_counts[index] if penalised else None,
            self.prompt_mask[index] if penalised else None,
            [r.generator for r in active],
        )
        update_counts(self.output_counts, index, tokens)
        return tokens.cpu()
