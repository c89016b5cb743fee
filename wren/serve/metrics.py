"""Counters for `GET /metrics`, written in Prometheus' text format by hand (no extra dependency).

Everything here is touched from the event loop thread only; the engine's queue depth and busy
slots are read from the driver's snapshot, which the engine thread refreshes after every step.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wren.serve.driver import EngineDriver

# Seconds; time to first token on a CPU runs from milliseconds to seconds under load.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Paths counted under their own name; anything else is "other", so a scan of random URLs cannot
# grow the label set without bound.
COUNTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/", "/tokenize")


class Histogram:
    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{label}"}} {running}')
        lines += [f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]
        return lines


class ServerMetrics:
    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()  # (path, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cancelled = 0
        self.time_to_first_token = Histogram()
        self.request_duration = Histogram()

    def record_generation(
        self, prompt_tokens: int, completion_tokens: int, ttft: float | None, duration: float, cancelled: bool
    ) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        self.request_duration.observe(duration)
        self.cancelled += cancelled

    def render(self, driver: EngineDriver) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines])

        metric(
            "wren_requests_total",
            "counter",
            "HTTP responses by path and status.",
            [
                f'wren_requests_total{{path="{path}",status="{status}"}} {count}'
                for (path, status), count in sorted(self.responses.items())
            ],
        )
        metric(
            "wren_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished generations.",
            [f"wren_prompt_tokens_total {self.prompt_tokens}"],
        )
        metric(
            "wren_generation_tokens_total",
            "counter",
            "Tokens generated.",
            [f"wren_generation_tokens_total {self.generation_tokens}"],
        )
        metric(
            "wren_requests_cancelled_total",
            "counter",
            "Generations stopped because the client went away.",
            [f"wren_requests_cancelled_total {self.cancelled}"],
        )
        metric(
            "wren_requests_in_flight",
            "gauge",
            "Engine requests accepted and not finished (bounded by --max-concurrency).",
            [f"wren_requests_in_flight {driver.pending}"],
        )
        metric(
            "wren_requests_waiting",
            "gauge",
            "Engine requests queued for a free slot.",
            [f"wren_requests_waiting {driver.waiting}"],
        )
        metric(
            "wren_slots_active",
            "gauge",
            "Batch slots generating now.",
            [f"wren_slots_active {driver.running}"],
        )
        metric(
            "wren_slots_total",
            "gauge",
            "Batch slots (--max-batch-size).",
            [f"wren_slots_total {len(driver.engine.slots)}"],
        )
        metric(
            "wren_time_to_first_token_seconds",
            "histogram",
            "From request arrival to its first generated token.",
            self.time_to_first_token.lines("wren_time_to_first_token_seconds"),
        )
        metric(
            "wren_request_duration_seconds",
            "histogram",
            "From request arrival to its last generated token.",
            self.request_duration.lines("wren_request_duration_seconds"),
        )
        return "\n".join(out) + "\n"


class ResponseCounter:
    """ASGI middleware counting responses by path and status (pure ASGI: streaming and
    disconnect detection pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in COUNTED_PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.responses[(path, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)
