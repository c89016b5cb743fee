"""The inference engine: continuous batching over a fixed set of slots.

Each running request owns one slot (a KV-cache row, kept by the runner). `step()` is the only
place that runs the model: it admits waiting requests into free slots, prefills their prompts (all
but the last token), then runs one decode forward over every active slot at its own position and
samples one token per slot with that request's own parameters and generator. Requests join and
leave between steps, so a short request never waits for a long one.

The model is Wren's own (`NativeRunner`) or a transformers model (`TransformersRunner`); sampling,
stop handling and streaming are the same for both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from wren.errors import WrenError
from wren.infer.request import Event, Request, Result
from wren.infer.runner import NativeRunner, Runner
from wren.infer.sampling import SamplingParams, sample, update_counts
from wren.model import CausalLM

Prompt = str | list[int] | list[dict[str, Any]]


class Engine:
    """Batched generation for one model. Not thread-safe: drive it from one thread (or task).

    `model` is Wren's CausalLM or a transformers causal LM (any `AutoModelForCausalLM`);
    `tokenizer` is Wren's Tokenizer or anything with the same encode / decode /
    apply_chat_template / stop_token_ids (see `wren.infer.transformers_backend.HFTokenizer`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        compile: bool | None = None,
    ) -> None:
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.runner = _make_runner(model, max_batch_size, max_seq_len, prefill_chunk, compile)
        self.max_seq_len = self.runner.max_seq_len
        self.device = self.runner.device
        vocab = self.runner.vocab_size
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
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self._tokenizer_stops
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

    def run(self, request: Request) -> Iterator[Event]:
        """Drive the engine until `request` finishes, yielding its events: text deltas, then its
        `Result`. Other requests in the batch advance too. Closing the iterator early cancels it."""
        try:
            while True:
                for event in request.pop_events():
                    yield event
                    if isinstance(event, Result):
                        return
                self.step()
        finally:
            if not request.done:
                self.cancel(request)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt as they are generated. Closing the iterator early cancels it."""
        for event in self.run(self.submit(prompt, params)):
            if isinstance(event, str):
                yield event

    # -- internals ----------------------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if prompt and all(isinstance(m, dict) for m in prompt):
            return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < self.runner.vocab_size for t in prompt):
                raise WrenError(f"prompt token ids must be in [0, {self.runner.vocab_size})")
            return list(prompt)
        raise WrenError("a prompt is a string, a list of token ids, or a list of chat messages")

    def _release(self, request: Request) -> None:
        if request.slot is not None:
            self.slots[request.slot] = None
            self.runner.release(request.slot)
            request.slot = None

    def _admit(self) -> None:
        admitted = []
        for slot, occupant in enumerate(self.slots):
            if not self.waiting:
                break
            if occupant is None:
                request = self.waiting.popleft()
                request.slot = slot
                self.slots[slot] = request
                if request.params.penalised:
                    self.output_counts[slot].zero_()
                    self.prompt_mask[slot].zero_()
                    self.prompt_mask[slot, torch.tensor(request.prompt_ids, device=self.device)] = True
                admitted.append(request)
        if admitted:
            # The last prompt token goes through the decode step with everyone else, so that
            # its logits are sampled alongside the other slots'.
            self.runner.prefill([r.slot for r in admitted], [r.prompt_ids[:-1] for r in admitted])

    def _decode(self, active: list[Request]) -> torch.Tensor:
        slots = [r.slot for r in active]
        logits = self.runner.decode(slots, [r.next_input for r in active], [r.next_position for r in active])
        params = [r.params for r in active]
        penalised = any(p.penalised for p in params)
        index = torch.tensor(slots, device=self.device) if penalised else None
        tokens = sample(
            logits,
            params,
            self.output_counts[index] if penalised else None,
            self.prompt_mask[index] if penalised else None,
            [r.generator for r in active],
        )
        if penalised:  # counts are read only by penalised rows, and only while one is active
            update_counts(self.output_counts, index, tokens)
        return tokens.cpu()


def _make_runner(
    model: Any, max_batch_size: int, max_seq_len: int | None, prefill_chunk: int, compile: bool | None
) -> Runner:
    if isinstance(model, CausalLM):
        if compile is None:
            compile = next(model.parameters()).device.type == "cuda"
        return NativeRunner(
            model, max_batch_size, max_seq_len or model.config.max_seq_len, prefill_chunk, compile
        )
    from wren.infer.transformers_backend import TransformersRunner

    return TransformersRunner(model, max_batch_size, max_seq_len, prefill_chunk)
