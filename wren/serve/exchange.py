"""One generating request's life, shared by every endpoint that generates: admission (or 429),
waiting for the results while watching for the client leaving, streaming with guaranteed
cleanup, and the closing log line and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from wren.errors import WrenError
from wren.infer.request import Result
from wren.serve.driver import EngineFailed, Generation, Job, QueueFull
from wren.serve.errors import APIError, error_payload
from wren.serve.responses import sse
from wren.serve.state import ServerState

logger = logging.getLogger("wren.serve")


class Exchange:
    """A generation and the bookkeeping around it: open with `start`, always `close` once."""

    def __init__(self, state: ServerState, request_id: str, path: str, choices_per_prompt: int) -> None:
        self.state = state
        self.request_id = request_id
        self.path = path
        self.choices_per_prompt = choices_per_prompt
        self.generation: Generation | None = None
        self.error: str | None = None

    def start(self, jobs: list[Job]) -> Generation:
        """Hand the jobs to the engine: 400 when they could never fit, 429 when the queue is full."""
        driver = self.state.driver
        if len(jobs) > driver.max_pending:
            raise APIError(
                400,
                f"the request asks for {len(jobs)} completions at once (prompts x n); this server "
                f"runs at most {driver.max_pending} (--max-concurrency)",
                param="n",
            )
        try:
            self.generation = driver.submit(jobs)
        except QueueFull as exc:
            raise APIError(
                429, f"the server is busy ({exc}); retry shortly", code="rate_limit_exceeded"
            ) from exc
        return self.generation

    async def results(self, request: Request) -> list[Result] | None:
        """Every choice's result, then `close`. None if the client left first (nobody reads the
        answer then); a 400 when the engine refused a job, a 500 when it failed."""
        assert self.generation is not None
        waiting = asyncio.ensure_future(self.generation.wait())
        leaving = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({waiting, leaving}, return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                return None
            try:
                return waiting.result()
            except (WrenError, EngineFailed) as exc:
                self.error = str(exc)
                raise APIError(400 if isinstance(exc, WrenError) else 500, str(exc)) from exc
        finally:
            waiting.cancel()
            leaving.cancel()
            self.close()

    def stream_error(self, exc: BaseException) -> str:
        """The SSE event reporting an error after the stream began."""
        if isinstance(exc, WrenError):
            payload = error_payload(400, str(exc))
        else:
            if not isinstance(exc, EngineFailed):
                logger.error("request %s failed mid-stream", self.request_id, exc_info=exc)
            payload = error_payload(500, str(exc) or type(exc).__name__)
        self.error = payload["error"]["message"]
        return sse(payload)

    def close(self) -> None:
        """Cancel what is unfinished, then log the request and count it. Idempotent."""
        generation, self.generation = self.generation, None
        if generation is None:
            return
        generation.close()
        results = [r for r in generation.results if r is not None]
        prompt_tokens = sum(len(job.prompt_ids) for job in generation.jobs[:: self.choices_per_prompt])
        completion_tokens = sum(r.completion_tokens for r in results)
        cancelled = not generation.finished and self.error is None
        now = time.perf_counter()
        ttft = None if generation.first_event_at is None else generation.first_event_at - generation.started
        duration = now - generation.started
        self.state.metrics.record_generation(prompt_tokens, completion_tokens, ttft, duration, cancelled)
        if self.error is not None:
            outcome = "error"
        elif cancelled:
            outcome = "cancelled"
        else:
            outcome = ",".join(sorted({r.finish_reason for r in results}))
        logger.info(
            "request id=%s path=%s choices=%d prompt_tokens=%d completion_tokens=%d ttft_ms=%s "
            "total_ms=%.1f outcome=%s",
            self.request_id,
            self.path,
            len(generation.jobs),
            prompt_tokens,
            completion_tokens,
            "-" if ttft is None else f"{ttft * 1000:.1f}",
            duration * 1000,
            outcome,
        )


async def _disconnected(request: Request) -> None:
    # After the body is read, the server's next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """A server-sent-event response that closes its exchange however the stream ends: finished,
    failed, or cut short by the client (Starlette then cancels the stream mid-await)."""

    def __init__(self, events: AsyncIterator[str], exchange: Exchange, headers: dict[str, Any]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            # No caching, and no buffering by a proxy in front (nginx reads X-Accel-Buffering).
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
        self.exchange = exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.exchange.close()
            # Runs the generator's own cleanup now rather than at garbage collection.
            with contextlib.suppress(RuntimeError, AttributeError):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
