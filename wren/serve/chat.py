"""`POST /v1/chat/completions` and MiniMind's `POST /`: conversations in, assistant replies out.

A reasoning model's `<think>...</think>` goes to `reasoning_content`, the rest to `content`
(`wren.infer.thinking`); a stream splits its deltas the same way as they arrive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from wren.infer.request import Result
from wren.infer.thinking import THINK_START, ThinkingStream, split_thinking
from wren.serve.exchange import EventStream, Exchange
from wren.serve.prompts import chat_messages, encode_chat, plan_jobs
from wren.serve.responses import (
    SSE_DONE,
    Envelope,
    chat_choice,
    chat_chunk,
    chat_message,
    finish_reason,
    sse,
    usage_of,
)
from wren.serve.schemas import ChatCompletionRequest, SimpleRequest
from wren.serve.state import ServerState


def reply_parts(text: str, opened: bool) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply; `opened`: the prompt ended inside `<think>`."""
    return split_thinking(THINK_START + text if opened else text)


async def chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    messages = chat_messages(body.messages)
    prompt_ids, opened = await run_in_threadpool(encode_chat, state.tokenizer, messages)
    jobs = plan_jobs([prompt_ids], body, body.n, state.context, "messages")
    envelope = Envelope("chatcmpl", state.model_name)
    exchange = Exchange(state, envelope.id, request.url.path, body.n)
    exchange.start(jobs)
    headers = {"X-Request-Id": envelope.id}
    if body.stream:
        events = _chat_events(exchange, envelope, body.n, opened, body.include_usage)
        return EventStream(events, exchange, headers)
    results = await exchange.results(request)
    if results is None:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed"
    choices = []
    for index, result in enumerate(results):
        reasoning, content = reply_parts(result.text, opened)
        choices.append(chat_choice(index, chat_message(content, reasoning), finish_reason(result)))
    payload = envelope.wrap("chat.completion", choices=choices, usage=usage_of(results, body.n))
    return JSONResponse(payload, headers=headers)


async def _chat_events(
    exchange: Exchange, envelope: Envelope, n: int, opened: bool, include_usage: bool
) -> AsyncIterator[str]:
    """The role chunk, reasoning and content deltas, one finish chunk per choice, the usage chunk
    if asked for, then [DONE]. An error after the stream began becomes an error event."""
    assert exchange.generation is not None
    for index in range(n):
        yield sse(chat_chunk(envelope, index, {"role": "assistant", "content": ""}, usage_null=include_usage))
    splitters = [ThinkingStream(opened) for _ in range(n)]
    try:
        async for index, event in exchange.generation.events():
            if isinstance(event, Result):
                reasoning, content = splitters[index].finish()
            else:
                reasoning, content = splitters[index].feed(event)
            delta: dict[str, Any] = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            if delta:
                yield sse(chat_chunk(envelope, index, delta, usage_null=include_usage))
            if isinstance(event, Result):
                reason = finish_reason(event)
                yield sse(chat_chunk(envelope, index, {}, reason, usage_null=include_usage))
        if include_usage:
            results = [r for r in exchange.generation.results if r is not None]
            yield sse(envelope.wrap("chat.completion.chunk", choices=[], usage=usage_of(results, n)))
    except Exception as exc:
        yield exchange.stream_error(exc)
    yield SSE_DONE


async def simple_reply(state: ServerState, body: SimpleRequest, request: Request) -> Response:
    """MiniMind's API: `{"prompt"}` as one user turn -> `{"response", "status", "time"}`."""
    messages = [{"role": "user", "content": body.prompt}]
    prompt_ids, opened = await run_in_threadpool(encode_chat, state.tokenizer, messages)
    jobs = plan_jobs([prompt_ids], body, 1, state.context, "prompt")
    envelope = Envelope("simple", state.model_name)
    exchange = Exchange(state, envelope.id, request.url.path, 1)
    exchange.start(jobs)
    results = await exchange.results(request)
    if results is None:
        return Response(status_code=499)
    reasoning, answer = reply_parts(results[0].text, opened)
    payload: dict[str, Any] = {
        "response": answer,
        "status": 200,
        "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    }
    if reasoning:
        payload["reasoning"] = reasoning
    return JSONResponse(payload, headers={"X-Request-Id": envelope.id})
