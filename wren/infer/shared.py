"""One engine shared by many threads: LangChain's `batch`, a web page's request handlers.

The engine itself is single-threaded. `SharedEngine` guards it with a lock, and whichever caller
holds the lock steps the engine for everyone: each step advances every running request, so
callers in different threads still share one continuous batch without a thread of their own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from wren.infer.engine import Engine, Prompt
from wren.infer.request import Event, Result
from wren.infer.sampling import SamplingParams


class SharedEngine:
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

    def complete(self, prompt: Prompt, params: SamplingParams) -> Result:
        """Run `prompt` to the end and return its result."""
        for event in self.run(prompt, params):
            if isinstance(event, Result):
                return event
        raise AssertionError("a request's events always end with its Result")
