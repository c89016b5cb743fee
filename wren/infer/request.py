"""One request's life in the engine: its prompt, its tokens so far, and the text they stream.

The engine picks tokens; a `Request` turns each one into text (detokenising, cutting at stop
strings), decides when it is finished, and queues the events a caller reads. Nothing here runs
the model.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch

from wren.infer.sampling import SamplingParams, make_generator
from wren.infer.text import IncrementalDecoder, StopMatcher, SupportsDecode

FinishReason = Literal["stop", "length", "cancelled"]
_ids = itertools.count()


@dataclass(frozen=True)
class Result:
    """A finished request. completion_tokens counts every sampled token, a stop token included
    (as OpenAI and vLLM count them); token_ids leave the stop token out."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


Event = str | Result  # a text delta, or the final result (always the last event)


class Request:
    """A prompt and its sampling parameters, and the state of its generation.

    `events` fills with text deltas (never empty, never part of a stop string) and ends with the
    `Result`. `max_completion` is how many tokens it may sample: max_new_tokens, or fewer when the
    context would fill first.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: SupportsDecode,
        stop_ids: set[int],
        max_completion: int,
    ) -> None:
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator: torch.Generator | None = make_generator(params)
        self.stop_ids = stop_ids
        self.max_completion = max_completion
        self.output_ids: list[int] = []
        self.sampled = 0
        self.text = ""
        self.events: deque[Event] = deque()
        self.result: Result | None = None
        self.slot: int | None = None
        self._decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True, prompt_ids=prompt_ids)
        self._stops = StopMatcher(params.stop)

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def next_input(self) -> int:
        """The token the next decode step feeds: the last prompt token, then the last output."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def next_position(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def add_token(self, token: int) -> bool:
        """Take one sampled token; return True when it finishes the request."""
        self.sampled += 1
        if token in self.stop_ids:
            self._finish("stop")
            return True
        self.output_ids.append(token)
        self._emit(self._stops.feed(self._decoder.add(token)))
        if self._stops.stopped:
            self._finish("stop")
        elif self.sampled >= self.max_completion:
            self._finish("length")
        return self.done

    def cancel(self) -> None:
        if not self.done:
            self._finish("cancelled")

    def pop_events(self) -> list[Event]:
        events = list(self.events)
        self.events.clear()
        return events

    def _emit(self, delta: str) -> None:
        if delta:
            self.text += delta
            self.events.append(delta)

    def _finish(self, reason: FinishReason) -> None:
        if not self._stops.stopped:
            # Flush a trailing partial character, then the text held back for a possible stop.
            self._emit(self._stops.feed(self._decoder.finish()))
            self._emit(self._stops.finish())
            if self._stops.stopped and reason == "length":
                reason = "stop"  # the flushed tail completed a stop string
        self.result = Result(self.text, list(self.output_ids), len(self.prompt_ids), self.sampled, reason)
        self.events.append(self.result)
