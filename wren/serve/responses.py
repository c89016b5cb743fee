"""OpenAI's response and stream-chunk objects, and server-sent-event framing."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from wren.infer.request import Result

SSE_DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event. Compact JSON never holds a raw newline, so one data line suffices."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(result: Result) -> str:
    # "cancelled" only reaches a client that has gone; were it ever sent, "stop" is the nearest
    # reason OpenAI clients know.
    return "length" if result.finish_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def usage_of(results: list[Result], choices_per_prompt: int) -> dict[str, int]:
    """Each prompt counts once however many choices it has (as OpenAI counts it)."""
    prompt = sum(r.prompt_tokens for r in results[::choices_per_prompt])
    return usage(prompt, sum(r.completion_tokens for r in results))


class Envelope:
    """The fields every object of one response shares: id, object type, created, model."""

    def __init__(self, prefix: str, model: str) -> None:
        self.id = new_id(prefix)
        self.created = int(time.time())
        self.model = model

    def wrap(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}


def chat_message(content: str, reasoning: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def chat_choice(index: int, message: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}


def chat_chunk(
    envelope: Envelope, index: int, delta: dict[str, Any], reason: str | None = None, usage_null: bool = False
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    extra = {"usage": None} if usage_null else {}
    return envelope.wrap("chat.completion.chunk", choices=[choice], **extra)


def completion_choice(index: int, text: str, reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
