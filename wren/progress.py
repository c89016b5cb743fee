"""One-line progress displays, redrawn in place on a terminal: training steps (step, loss,
tokens/s, ETA) and counted work items (done/total, tokens/s, ETA).

When stderr is not a terminal (CI, a log file) it prints a plain line every `every` steps instead,
so logs stay readable. No dependency beyond the standard library.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        every: int = 10,
        stream: TextIO | None = None,
        unit: str = "tok",
    ):
        self.total = total_steps
        self.unit = unit
        self.start_step = start_step
        self.every = every
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.started = time.perf_counter()

    def update(self, step: int, loss: float, units_per_second: float, extra: str = "") -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done else 0.0
        line = (
            f"step {step}/{self.total} | loss {loss:.4f} | {format_count(units_per_second)} {self.unit}/s"
            f" | ETA {format_duration(eta)}{' | ' + extra if extra else ''}"
        )
        if self.interactive:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line of its own, without breaking the progress line."""
        prefix = "\r\033[K" if self.interactive else ""
        print(prefix + text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


class ItemProgress:
    """`done/total items | tokens/s | ETA` for work counted in items (prompts, questions)."""

    def __init__(self, total: int, unit: str = "items", stream: TextIO | None = None, every: int = 100):
        self.total = total
        self.unit = unit
        self.every = every
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.started = time.perf_counter()
        self._printed = 0

    def update(self, done: int, tokens: int) -> None:
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - done) if done else 0.0
        rate = tokens / elapsed if elapsed > 0 else 0.0
        line = f"{done}/{self.total} {self.unit} | {format_count(rate)} tok/s | ETA {format_duration(eta)}"
        if self.interactive:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif done > self._printed and (done % self.every == 0 or done == self.total):
            self._printed = done
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
