"""The bridge between the engine, which must be driven from one thread, and the asyncio server.

One engine thread owns the `Engine`: it takes submissions and cancellations from a queue between
steps, runs `step()` (blocking compute, so never on the event loop), and hands each request's new
events to the loop with one `call_soon_threadsafe` per step. When there is nothing to do it
blocks on the queue instead of spinning. The event loop side sees a `Generation`: the engine
requests of one HTTP request (one per choice) and an asyncio queue of their events.

The engine thread also builds the engine (wren.infer.shared.start_engine_thread), so that it is
the only thread of the server that runs PyTorch: with the model loaded on the main thread,
OpenMP's worker threads slept between operations (see wren.infer.shared), and one client's int8
stream ran at 97 tokens/s on 2 cores, against 176 (benchmarks/RESULTS.md, "Serving").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from wren.errors import WrenError
from wren.infer.engine import Engine
from wren.infer.request import Event, Request, Result
from wren.infer.sampling import SamplingParams
from wren.infer.shared import start_engine_thread

logger = logging.getLogger("wren.serve")


@dataclass(frozen=True)
class Job:
    """One engine request to run: a tokenised prompt and its sampling parameters."""

    prompt_ids: list[int]
    params: SamplingParams


class QueueFull(Exception):
    """More requests are in flight than the server accepts (--max-concurrency)."""


class EngineFailed(Exception):
    """The engine raised while running a request; the request cannot finish."""


class Generation:
    """The engine requests of one HTTP request, one per choice, seen from the event loop."""

    def __init__(self, driver: EngineDriver, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.results: list[Result | None] = [None] * len(jobs)
        self.started = time.perf_counter()
        self.first_event_at: float | None = None
        self.closed = False
        self._driver = driver
        self._events: asyncio.Queue[tuple[int, Event | BaseException]] = asyncio.Queue()

    @property
    def finished(self) -> bool:
        return all(result is not None for result in self.results)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, text delta or Result) as they arrive, until every choice has its
        Result. Raises the error that stopped a choice."""
        while not self.finished:
            index, event = await self._events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Result):
                self.results[index] = event
            yield index, event

    async def wait(self) -> list[Result]:
        """Every choice's Result, in choice order."""
        async for _ in self.events():
            pass
        return [result for result in self.results if result is not None]

    def close(self) -> None:
        """Done with this generation: unfinished choices are cancelled and free their slots.
        Safe to call more than once; every generation must be closed once."""
        if not self.closed:
            self.closed = True
            self._driver._release(self)

    def _deliver(self, index: int, events: list[Event | BaseException]) -> None:
        if self.first_event_at is None:
            self.first_event_at = time.perf_counter()
        for event in events:
            self._events.put_nowait((index, event))


_STOP = ("stop", None)


class EngineDriver:
    """Runs an Engine on its own thread for asyncio callers; see the module docstring.

    `max_pending` bounds the engine requests (waiting + running) of open generations: a
    submission beyond it raises QueueFull instead of queueing without limit. `launch()` builds the
    engine, on the engine thread; `start()`, on the event loop, connects that loop.
    """

    def __init__(self, load: Callable[[], Engine], max_pending: int | None = None) -> None:
        """`load` builds the engine; `max_pending` None: set it once `launch()` has returned."""
        self._load = load
        self.engine: Engine  # from launch()
        self.max_pending = max_pending or 0
        self.pending = 0  # engine requests of open generations; touched on the loop thread only
        # A snapshot of the engine's queue, written by the engine thread after every step.
        self.waiting = 0
        self.running = 0
        self._inbox: queue.SimpleQueue[tuple[str, Generation | None]] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Engine-thread state.
        self._owner: dict[Request, tuple[Generation, int]] = {}
        self._requests: dict[Generation, list[Request]] = {}
        self._outbox: list[tuple[Generation, int, list[Any]]] = []

    # -- event loop side ----------------------------------------------------------------------

    def launch(self) -> Engine:
        """Start the engine thread and build the engine there; return it once built, or raise
        what building it raised."""
        self._thread, built = start_engine_thread(self._load, self._serve)
        self.engine = built.result()
        return self.engine

    def start(self) -> None:
        """Connect the running event loop, which will read the events; after `launch()`."""
        self._loop = asyncio.get_running_loop()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> Generation:
        """Queue the jobs of one HTTP request; raises QueueFull when they would exceed max_pending."""
        if self.pending + len(jobs) > self.max_pending:
            raise QueueFull(f"{self.pending} requests are in flight; the server takes {self.max_pending}")
        generation = Generation(self, jobs)
        self.pending += len(jobs)
        self._inbox.put(("submit", generation))
        return generation

    def _release(self, generation: Generation) -> None:
        self.pending -= len(generation.jobs)
        if not generation.finished:
            self._inbox.put(("cancel", generation))

    # -- engine thread ------------------------------------------------------------------------

    def _serve(self, engine: Engine) -> None:
        self.engine = engine  # _run reads it, and launch() may not have set it yet
        self._run()

    def _run(self) -> None:
        running = True
        while running:
            try:
                running = self._take_commands(block=not self.engine.has_work)
                if running and self.engine.has_work:
                    self.engine.step()
            except Exception as exc:
                # The thread must outlive any failure: without it, every request would hang.
                logger.exception("the engine failed; its requests are stopped")
                self._fail_all(exc)
            self._publish()

    def _take_commands(self, block: bool) -> bool:
        """Apply queued submissions and cancellations, waiting for one if `block`.
        Returns False when told to stop."""
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, generation = command
            if kind == "stop":
                return False
            assert generation is not None
            if kind == "submit":
                self._start(generation)
            else:
                self._cancel(generation)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _start(self, generation: Generation) -> None:
        requests = []
        for index, job in enumerate(generation.jobs):
            try:
                request = self.engine.submit(job.prompt_ids, job.params)
            except WrenError as exc:
                self._outbox.append((generation, index, [exc]))
                continue
            except Exception as exc:
                logger.exception("the engine could not take a request")
                self._outbox.append((generation, index, [EngineFailed(f"{type(exc).__name__}: {exc}")]))
                continue
            self._owner[request] = (generation, index)
            requests.append(request)
        self._requests[generation] = requests

    def _cancel(self, generation: Generation) -> None:
        for request in self._requests.pop(generation, []):
            if not request.done:
                self.engine.cancel(request)
            self._owner.pop(request, None)

    def _fail_all(self, exc: Exception) -> None:
        error = EngineFailed(f"the engine failed: {type(exc).__name__}: {exc}")
        for generation, index in self._owner.values():
            self._outbox.append((generation, index, [error]))
        self._owner.clear()
        self._requests.clear()
        # Empty the engine, so that a failing step is not retried forever.
        for request in [*self.engine.waiting, *(r for r in self.engine.slots if r is not None)]:
            try:
                self.engine.cancel(request)
            except Exception:
                logger.exception("could not cancel a request after the failure")

    def _publish(self) -> None:
        """Hand every request's new events to the event loop, in one call."""
        batch, self._outbox = self._outbox, []
        for request, (generation, index) in list(self._owner.items()):
            events = request.pop_events()
            if events:
                batch.append((generation, index, events))
            if request.done:
                del self._owner[request]
                if all(r.done for r in self._requests.get(generation, ())):
                    self._requests.pop(generation, None)
        self.waiting = len(self.engine.waiting)
        self.running = sum(slot is not None for slot in self.engine.slots)
        if batch and self._loop is not None:
            # A closed loop means the server is shutting down: nobody is left to tell.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_deliver_all, batch)


def _deliver_all(batch: list[tuple[Generation, int, list[Any]]]) -> None:
    for generation, index, events in batch:
        if not generation.closed:
            generation._deliver(index, events)
