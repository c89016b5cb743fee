"""Where the web page's replies come from: a model in this process, or an OpenAI-compatible server.

Both backends expose one generator, `stream(messages, settings)`: it yields `Progress` (the
reasoning and the answer so far) as the reply grows, then one `Stats`. Errors are raised as they
come (WrenError, openai's errors); the page turns them into a message.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from wren.errors import WrenError
from wren.infer.thinking import ThinkingStream, opens_thinking

if TYPE_CHECKING:
    from wren.infer.shared import EngineThread, SharedEngine

Message = dict[str, str]


@dataclass(frozen=True)
class Settings:
    """The sampling knobs the page offers."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Progress:
    reasoning: str
    answer: str


@dataclass(frozen=True)
class Stats:
    completion_tokens: int
    seconds: float
    finish_reason: str | None

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        ending = "" if self.finish_reason in (None, "stop") else f" · {self.finish_reason}"
        return f"{self.completion_tokens} tokens · {self.tokens_per_second:.1f} tokens/s{ending}"


class Backend(Protocol):
    description: str

    def stream(self, messages: list[Message], settings: Settings) -> Iterator[Progress | Stats]: ...


class _Accumulator:
    """Sums a ThinkingStream's deltas into the two parts so far."""

    def __init__(self, opened: bool) -> None:
        self._split = ThinkingStream(opened=opened)
        self.reasoning = ""
        self.answer = ""

    def feed(self, delta: str) -> Progress:
        return self._add(*self._split.feed(delta))

    def finish(self) -> Progress:
        return self._add(*self._split.finish())

    def add_reasoning(self, delta: str) -> Progress:
        """Reasoning the server already split off (`reasoning_content`)."""
        return self._add(delta, "")

    def _add(self, reasoning: str, answer: str) -> Progress:
        self.reasoning += reasoning
        self.answer += answer
        return Progress(self.reasoning, self.answer)


class LocalBackend:
    """A model in this process. Closing the stream early (Stop) closes the engine's iterator,
    which cancels the request and frees its slot."""

    def __init__(self, engine: SharedEngine | EngineThread, description: str) -> None:
        self.engine = engine
        self.description = description

    def stream(self, messages: list[Message], settings: Settings) -> Iterator[Progress | Stats]:
        from wren.infer.request import Result
        from wren.infer.sampling import SamplingParams

        params = SamplingParams(
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_new_tokens=int(settings.max_new_tokens),
            repetition_penalty=settings.repetition_penalty,
        )
        params.validate()
        tokenizer = self.engine.engine.tokenizer
        # Rendering here (not in the engine) shows whether the template opened a <think> block.
        prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        parts = _Accumulator(opens_thinking(tokenizer.decode(prompt_ids[-8:])))
        started = time.perf_counter()
        events = self.engine.run(prompt_ids, params)
        try:
            for event in events:
                if isinstance(event, Result):
                    yield parts.finish()
                    seconds = time.perf_counter() - started
                    yield Stats(event.completion_tokens, seconds, event.finish_reason)
                    return
                yield parts.feed(event)
        finally:
            events.close()  # cancels the request when the page stopped reading


class ApiBackend:
    """An OpenAI-compatible server (`wren serve`, vLLM, ...), streamed through the openai SDK."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None) -> None:
        import openai

        # No retries: a server that is down should say so at once, not after a back-off.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=120)
        self.base_url = base_url
        self._model = model
        self.description = f"{model or 'the served model'} at {base_url}"

    def model(self) -> str:
        """The model to ask for: --model, else the first one the server lists (asked once)."""
        if self._model is None:
            models = self.client.models.list().data
            if not models:
                raise WrenError(f"{self.base_url} serves no models; pass --model")
            self._model = models[0].id
        return self._model

    def stream(self, messages: list[Message], settings: Settings) -> Iterator[Progress | Stats]:
        import openai

        try:
            yield from self._stream(messages, settings)
        except openai.APIError as exc:
            raise WrenError(self._explain(exc)) from exc

    def _explain(self, exc: Exception) -> str:
        """openai's error as one line a person can act on."""
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return f"{self.base_url} did not answer in time"
        if isinstance(exc, openai.APIConnectionError):
            return f"cannot reach the server at {self.base_url} ({exc.__cause__ or exc})"
        if isinstance(exc, openai.AuthenticationError):
            return f"the server at {self.base_url} refused the API key (pass --api-key)"
        if isinstance(exc, openai.APIStatusError):
            return f"the server answered {exc.status_code}: {_body_message(exc.body) or exc.message}"
        return str(exc)

    def _stream(self, messages: list[Message], settings: Settings) -> Iterator[Progress | Stats]:
        started = time.perf_counter()
        chunks = self.client.chat.completions.create(
            model=self.model(),
            messages=messages,  # type: ignore[arg-type]
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=int(settings.max_new_tokens),
            stream=True,
            stream_options={"include_usage": True},
            # Not an OpenAI parameter; vLLM and `wren serve` read it from the body.
            extra_body={"repetition_penalty": settings.repetition_penalty},
        )
        parts = _Accumulator(opened=False)
        counted, usage_tokens, finish_reason = 0, None, None
        try:
            for chunk in chunks:
                if chunk.usage is not None:
                    usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    delta: Any = choice.delta
                    finish_reason = choice.finish_reason or finish_reason
                    reasoning = getattr(delta, "reasoning_content", None) or ""
                    content = delta.content or ""
                    if not reasoning and not content:
                        continue
                    counted += 1
                    if reasoning:
                        yield parts.add_reasoning(reasoning)
                    if content:
                        yield parts.feed(content)
            yield parts.finish()
        finally:
            chunks.close()  # drops the connection, so the server cancels the request
        tokens = usage_tokens if usage_tokens is not None else counted
        yield Stats(tokens, time.perf_counter() - started, finish_reason)


def _body_message(body: object) -> str | None:
    """The message of an OpenAI-style error body ({"error": {"message"}} or {"message"})."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return None
