"""One engine shared by many threads: LangChain's `batch`, a web page's request handlers.

The engine itself is single-threaded. `SharedEngine` wraps one the caller built and guards it
with a lock: whichever caller holds the lock steps the engine for everyone, and each step advances
every running request, so callers in different threads still share one continuous batch.

`EngineThread` instead builds an engine and steps it on a thread of its own (`start_engine_thread`,
which the server's engine thread uses too), so that one thread runs all of its PyTorch work. With
OpenMP (PyTorch's CPU threads) each thread that runs parallel work keeps its own team of worker
threads; once two teams exist on a machine with no spare cores, the workers sleep between parallel
operations and each operation waits for them to wake. A model loaded on the main thread and
stepped from other threads decoded about half as fast (benchmarks/engine_threads.py;
benchmarks/RESULTS.md, "Serving").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from wren.infer.engine import Engine, Prompt
from wren.infer.request import Event, Request, Result
from wren.infer.sampling import SamplingParams


def start_engine_thread(
    load: Callable[[], Engine], run: Callable[[Engine], None]
) -> tuple[threading.Thread, Future[Engine]]:
    """Start a thread that builds an engine with `load` and then calls `run(engine)`. Returns the
    thread and a future of the engine, which raises what building it raised."""
    built: Future[Engine] = Future()

    def main() -> None:
        try:
            engine = load()
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(engine)
        run(engine)

    thread = threading.Thread(target=main, name="wren-engine", daemon=True)
    thread.start()
    return thread, built


class _Streams:
    """`complete` for anything with SharedEngine's `run`."""

    def run(self, prompt: Prompt, params: SamplingParams) -> Iterator[Event]:
        raise NotImplementedError

    def complete(self, prompt: Prompt, params: SamplingParams) -> Result:
        """Run `prompt` to the end and return its result."""
        for event in self.run(prompt, params):
            if isinstance(event, Result):
                return event
        raise AssertionError("a request's events always end with its Result")


class SharedEngine(_Streams):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()

    def run(self, prompt: Prompt, params: SamplingParams) -> Iterator[Event]:
        """Text deltas of `prompt`, then its `Result`. Closing the iterator early cancels it."""
        with self._lock:
            request = self.engine.submit(prompt, params)
        try:
            while True:
                with self._lock:
                    events = request.pop_events()
                    if not events:
                        self.engine.step()
                        events = request.pop_events()
                for event in events:
                    yield event
                    if isinstance(event, Result):
                        return
        finally:
            if not request.done:
                with self._lock:
                    self.engine.cancel(request)


class EngineThread(_Streams):
    """An engine built and stepped on one thread of its own (see the module docstring), for
    callers in other threads (a web page's handlers), with SharedEngine's `run` and `complete`.
    Callers only exchange requests and events with that thread."""

    def __init__(self, load: Callable[[], Engine]) -> None:
        """Start the thread and build the engine there with `load`; raises what building raised."""
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._thread, built = start_engine_thread(load, self._serve)
        self.engine = built.result()

    def run(self, prompt: Prompt, params: SamplingParams) -> Iterator[Event]:
        """Text deltas of `prompt`, then its `Result`. Closing the iterator early cancels it."""
        events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._inbox.put(("submit", (prompt, params, events)))
        request = events.get()  # the engine's Request, or why it refused the prompt
        if isinstance(request, BaseException):
            raise request
        finished = False
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                yield event  # type: ignore[misc]
                if isinstance(event, Result):
                    finished = True
                    return
        finally:
            if not finished:
                self._inbox.put(("cancel", request))

    def _serve(self, engine: Engine) -> None:
        readers: dict[Request, queue.SimpleQueue[object]] = {}
        while True:
            # Wait for a command when there is nothing to step; otherwise take what has come.
            try:
                command = self._inbox.get(block=not engine.has_work)
            except queue.Empty:
                command = None
            while command is not None:
                self._apply(engine, readers, *command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if engine.has_work:
                try:
                    engine.step()
                except Exception as exc:  # every running request fails; the thread lives on
                    for request, reader in readers.items():
                        reader.put(exc)
                        if not request.done:
                            engine.cancel(request)
                    readers.clear()
            for request, reader in list(readers.items()):
                for event in request.pop_events():
                    reader.put(event)
                if request.done:
                    del readers[request]

    @staticmethod
    def _apply(engine: Engine, readers: dict, kind: str, payload) -> None:
        if kind == "submit":
            prompt, params, reader = payload
            try:
                request = engine.submit(prompt, params)
            except Exception as exc:  # a prompt the engine refuses: the caller raises it
                reader.put(exc)
                return
            reader.put(request)
            readers[request] = reader
        elif not payload.done:  # cancel
            engine.cancel(payload)
            readers.pop(payload, None)
