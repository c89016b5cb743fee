"""`wren chat`: a multi-turn conversation in the terminal, streamed as the model writes.

Lines starting with "/" are commands: /clear, /undo (drop the last round), /regen (answer the
last question again), /exit; anything else is the next user message. After each reply a line on
stderr gives the prompt and reply sizes and the speed. `<think>` reasoning is hidden unless
`show_thinking`; earlier replies go back to the model without it, as reasoning templates expect.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from wren.errors import WrenError
from wren.infer.engine import Engine
from wren.infer.request import Result
from wren.infer.sampling import SamplingParams
from wren.infer.thinking import ThinkingStream, opens_thinking, split_thinking

COMMANDS = {
    "/clear": "forget the conversation (the system prompt stays)",
    "/undo": "drop the last question and its answer",
    "/regen": "answer the last question again",
    "/exit": "leave (so do Ctrl-D and Ctrl-C at the prompt)",
    "/help": "list these commands",
}


@dataclass
class Conversation:
    """The system prompt and the rounds so far, each a (question, reply) pair."""

    system: str | None = None
    rounds: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, question: str, first_round: int = 0) -> list[dict[str, str]]:
        """The chat messages that ask `question` after the rounds from `first_round` on."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for asked, reply in self.rounds[first_round:]:
            messages.append({"role": "user", "content": asked})
            messages.append({"role": "assistant", "content": split_thinking(reply)[1]})
        messages.append({"role": "user", "content": question})
        return messages


class ChatSession:
    """Reads lines, runs commands, streams replies. `read_line` returns None at end of input."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        system: str | None = None,
        show_thinking: bool = False,
        out: TextIO | None = None,
        info: TextIO | None = None,
    ) -> None:
        self.engine = engine
        self.params = params
        self.conversation = Conversation(system)
        self.show_thinking = show_thinking
        self.out = out or sys.stdout
        self.info = info or sys.stderr
        self._shown = ""  # which part of the current reply was written last: "thinking"/"answer"

    def run(self, read_line: Callable[[str], str | None]) -> None:
        self._note("Type a message; /help lists the commands.")
        while True:
            line = read_line("> ")
            if line is None or line.strip() == "/exit":
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                self._command(line)
            else:
                self._answer(line)

    def _command(self, line: str) -> None:
        rounds = self.conversation.rounds
        if line == "/clear":
            rounds.clear()
            self._note("(conversation cleared)")
        elif line == "/undo":
            if rounds:
                rounds.pop()
                self._note(f"(last round dropped; {len(rounds)} left)")
            else:
                self._note("(nothing to undo)")
        elif line == "/regen":
            if not rounds:
                self._note("(nothing to regenerate yet)")
                return
            question, _ = rounds.pop()
            self._answer(question)
        elif line == "/help":
            for name, description in COMMANDS.items():
                self._note(f"  {name:8} {description}")
        else:
            self._note(f"(unknown command {line}; /help lists them)")

    def _answer(self, question: str) -> None:
        try:
            request = self.engine.submit(self._fit(question), self.params)
        except WrenError as exc:
            self._note(f"error: {exc}")
            return
        prompt_text = self.engine.tokenizer.decode(request.prompt_ids[-8:])
        split = ThinkingStream(opened=opens_thinking(prompt_text))
        self._shown = ""
        started = time.perf_counter()
        result: Result | None = None
        events = self.engine.run(request)
        try:
            for event in events:
                if isinstance(event, Result):
                    result = event
                    self._show(*split.finish())
                else:
                    self._show(*split.feed(event))
        except KeyboardInterrupt:
            events.close()  # cancels the request and frees its slot
            self.out.write("\n")
            self._note("(reply stopped; it is not kept)")
            return
        self.out.write("\n")
        self.out.flush()
        if result is not None:
            self.conversation.rounds.append((question, result.text))
            self._stats(result, time.perf_counter() - started)

    def _fit(self, question: str) -> list[int]:
        """The prompt ids for `question`, leaving out the oldest rounds while the prompt would not
        leave room for a full reply in the context. Rendered once here; the engine takes the ids."""
        budget = self.engine.max_seq_len - min(self.params.max_new_tokens, self.engine.max_seq_len // 2)
        rounds = self.conversation.rounds
        for first in range(len(rounds) + 1):
            messages = self.conversation.messages(question, first)
            ids = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if len(ids) <= budget:
                if first:
                    del rounds[:first]
                    self._note(f"(the {first} oldest round(s) no longer fit the context and were dropped)")
                return ids
        return ids  # the question alone is too long: submit says by how much

    def _show(self, thinking: str, answer: str) -> None:
        if thinking and self.show_thinking:
            if self._shown != "thinking":
                self.out.write("(thinking) ")
                self._shown = "thinking"
            self.out.write(thinking)
        if answer:
            if self._shown == "thinking":
                self.out.write("\n(answer) ")
            self._shown = "answer"
            self.out.write(answer)
        self.out.flush()

    def _stats(self, result: Result, seconds: float) -> None:
        speed = result.completion_tokens / seconds if seconds > 0 else 0.0
        ending = "" if result.finish_reason == "stop" else f" · cut at {result.completion_tokens} tokens"
        thinking, _ = split_thinking(result.text)
        hidden = " · reasoning hidden (--show-thinking)" if thinking and not self.show_thinking else ""
        self._note(
            f"[prompt {result.prompt_tokens} tokens · reply {result.completion_tokens} tokens · "
            f"{speed:.1f} tokens/s{ending}{hidden}]"
        )

    def _note(self, text: str) -> None:
        if text:
            print(text, file=self.info, flush=True)


def read_terminal_line(prompt: str) -> str | None:
    """`input()` with line editing on a terminal; None at end of input or on Ctrl-C."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (gives input() history and editing)
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None
