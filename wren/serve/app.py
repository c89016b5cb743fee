"""The FastAPI application: routes, the API key check, error handlers, the engine thread's life."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from wren import __version__
from wren.serve.auth import ApiKeyCheck
from wren.serve.chat import chat_completion, simple_reply
from wren.serve.completions import completion
from wren.serve.errors import APIError, install_error_handlers
from wren.serve.metrics import ResponseCounter
from wren.serve.prompts import chat_messages, encode_chat, encode_text
from wren.serve.schemas import ChatCompletionRequest, CompletionRequest, SimpleRequest, TokenizeRequest
from wren.serve.state import ServerState


def create_app(state: ServerState, api_key: str | None = None) -> FastAPI:
    """The server for one model. The engine thread starts and stops with the application."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.driver.start()
        try:
            yield
        finally:
            state.driver.stop()

    # A body without a Content-Type is read as JSON, as OpenAI's API reads it.
    app = FastAPI(title="Wren", version=__version__, lifespan=lifespan, strict_content_type=False)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    # Added last, so it runs first and counts the 401s too.
    app.add_middleware(ResponseCounter, metrics=state.metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.driver.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(state.driver), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        state.check_model(model)
        return state.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completion(state, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await completion(state, body, request)

    @app.post("/")
    async def simple(body: SimpleRequest, request: Request) -> Response:
        return await simple_reply(state, body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            tokens = await run_in_threadpool(encode_text, state.tokenizer, body.prompt)
        else:
            messages = chat_messages(body.messages or [])
            tokens, _ = await run_in_threadpool(
                encode_chat, state.tokenizer, messages, body.add_generation_prompt
            )
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.context}

    return app
