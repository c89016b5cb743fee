"""The request bodies the server accepts, as pydantic models (they also make the OpenAPI schema).

Types are strict (`"temperature": "1"` or `true` is an error, not 1.0), so a client's mistake is
reported instead of guessed at. Fields the server does not use (`logprobs`, `tools`, `user`,
`response_format` ...) are accepted and ignored, as the issue asks: clients send them by default.
Value ranges are checked by `SamplingParams.validate`, which names the field in its message.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# The SamplingParams fields a request may set, under the same names.
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "stop_token_ids",
    "seed",
    "ignore_eos",
)


def _encodable(text: str) -> str:
    # JSON may carry a lone surrogate ("\\ud800"), which is no character: tokenizers cannot take it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class SamplingFields(_Body):
    """How tokens are chosen, and how many: OpenAI's names plus vLLM's extras."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    # OpenAI's newer name for max_tokens; it wins when both are given.
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SAMPLING_FIELDS}

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class StreamOptions(_Body):
    include_usage: bool | None = None


class OpenAIFields(SamplingFields):
    model: Text | None = None  # optional: a request without one goes to the served model
    n: int = Field(default=1, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(_Body):
    # Any part type parses, so that a non-text part gets a clear "text only" error, not a
    # list of union mismatches.
    type: Text
    text: Text | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    # An earlier assistant turn's reasoning, for templates that show it.
    reasoning_content: Text | None = None


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(OpenAIFields):
    prompt: Text | list[Text]
    echo: bool | None = None  # put the prompt before the completion's text


class SimpleRequest(SamplingFields):
    """`POST /`: MiniMind's API. The prompt is one user message."""

    prompt: Text


class TokenizeRequest(_Body):
    """`POST /tokenize`: a text prompt, or chat messages rendered with the chat template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
