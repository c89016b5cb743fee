"""`POST /v1/completions`: raw text prompts (one or a list) continued as they are, no template."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from wren.infer.request import Result
from wren.serve.errors import APIError
from wren.serve.exchange import EventStream, Exchange
from wren.serve.prompts import encode_text, plan_jobs
from wren.serve.responses import SSE_DONE, Envelope, completion_choice, finish_reason, sse, usage_of
from wren.serve.schemas import CompletionRequest
from wren.serve.state import ServerState


async def completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt: the list of prompts is empty", param="prompt")
    prompt_ids = await run_in_threadpool(lambda: [encode_text(state.tokenizer, p) for p in prompts])
    jobs = plan_jobs(prompt_ids, body, body.n, state.context, "prompt")
    # Choice i continues prompt i // n, as OpenAI numbers them.
    echoes = [prompts[i // body.n] if body.echo else "" for i in range(len(jobs))]
    envelope = Envelope("cmpl", state.model_name)
    exchange = Exchange(state, envelope.id, request.url.path, body.n)
    exchange.start(jobs)
    headers = {"X-Request-Id": envelope.id}
    if body.stream:
        return EventStream(
            _completion_events(exchange, envelope, echoes, body.include_usage), exchange, headers
        )
    results = await exchange.results(request)
    if results is None:
        return Response(status_code=499)
    choices = [
        completion_choice(index, echoes[index] + result.text, finish_reason(result))
        for index, result in enumerate(results)
    ]
    payload = envelope.wrap("text_completion", choices=choices, usage=usage_of(results, body.n))
    return JSONResponse(payload, headers=headers)


async def _completion_events(
    exchange: Exchange, envelope: Envelope, echoes: list[str], include_usage: bool
) -> AsyncIterator[str]:
    """Text deltas per choice (the echoed prompt first), a finish chunk per choice, the usage
    chunk if asked for, then [DONE]."""
    assert exchange.generation is not None
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, reason: str | None = None) -> str:
        return sse(
            envelope.wrap("text_completion", choices=[completion_choice(index, text, reason)], **extra)
        )

    for index, echo in enumerate(echoes):
        if echo:
            yield chunk(index, echo)
    try:
        async for index, event in exchange.generation.events():
            if isinstance(event, Result):
                yield chunk(index, "", finish_reason(event))
            else:
                yield chunk(index, event)
        if include_usage:
            results = [r for r in exchange.generation.results if r is not None]
            n = exchange.choices_per_prompt
            yield sse(envelope.wrap("text_completion", choices=[], usage=usage_of(results, n)))
    except Exception as exc:
        yield exchange.stream_error(exc)
    yield SSE_DONE
