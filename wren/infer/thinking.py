"""Separating a reply's reasoning from its answer, for the chat, the server and the web page.

Reasoning models write `<think>reasoning</think>` and then the answer. Some chat templates put the
opening `<think>` in the prompt, so the generated text begins inside the reasoning and only the
closing tag appears; a reply still being streamed (or cut off by the token limit) may have opened
its reasoning without closing it yet. `split_thinking` handles all three. `ThinkingStream` gives,
for a stream of deltas, what calling it on the text generated so far would, in time linear in the
reply's length rather than quadratic. Pure string work: no torch.
"""

from __future__ import annotations

from bisect import bisect_right

THINK_START = "<think>"
THINK_END = "</think>"
# MiniMind's R1 data wraps the answer in these; they are layout, not part of what the user reads.
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
_TAGS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)
_LONGEST_PARTIAL = max(len(tag) for tag in _TAGS) - 1


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of a generated reply, each stripped of surrounding whitespace.

    - "<think>a</think>b" -> ("a", "b"); text before <think> stays part of the answer;
    - "a</think>b" (the template opened the reasoning) -> ("a", "b");
    - "<think>a" (reasoning not closed yet) -> ("a", "");
    - no tags -> ("", text).
    A `<answer>...</answer>` wrapper around the answer is removed. Only the first reasoning block
    is taken apart; any later tags are left in the answer as written.
    """
    start, end = text.find(THINK_START), text.find(THINK_END)
    if start != -1 and (end == -1 or start < end):
        before, inside = text[:start], text[start + len(THINK_START) :]
        thinking, closed, after = inside.partition(THINK_END)
        if not closed:
            return thinking.strip(), before.strip()
        return thinking.strip(), _unwrap_answer(before + after)
    if end != -1:
        return text[:end].strip(), _unwrap_answer(text[end + len(THINK_END) :])
    return "", _unwrap_answer(text)


def _unwrap_answer(text: str) -> str:
    text = text.strip()
    if text.startswith(ANSWER_START):
        # An answer still being streamed may not have closed its wrapper yet.
        text = text[len(ANSWER_START) :].removesuffix(ANSWER_END)
    return text.strip()


def _partial_tag_length(text: str) -> int:
    """Length of the longest end of `text` that could still grow into a tag ("<thi", "</")."""
    # Every tag starts with "<", so only the ends starting at a "<" need comparing.
    start = text.find("<", max(0, len(text) - _LONGEST_PARTIAL))
    while start != -1:
        end = text[start:]
        if any(len(end) < len(tag) and tag.startswith(end) for tag in _TAGS):
            return len(end)
        start = text.find("<", start + 1)
    return 0


class _Text:
    """Append-only text that tracks where its stripped value lies.

    Reading a range costs its length, so a part that grows by one token at a time is never
    copied whole (a string grown with `+=` in an attribute is copied on every delta).
    """

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._starts: list[int] = []
        self.length = 0
        self._first = -1  # index of the first non-whitespace character; -1: none yet
        self._end = 0  # just past the last non-whitespace character
        self._last = ""  # the last non-whitespace character
        self._wrapped: bool | None = None  # whether the stripped text opens with <answer>
        self._first_from: tuple[int, int, int] = (-1, -1, -1)  # (from, scanned up to, found)
        self._end_before: tuple[int, int] = (-1, -1)  # (before, found)

    def append(self, text: str) -> None:
        if not text:
            return
        core = text.rstrip()
        if core:
            if self._first < 0:
                self._first = self.length + len(text) - len(text.lstrip())
            self._end = self.length + len(core)
            self._last = core[-1]
        self._chunks.append(text)
        self._starts.append(self.length)
        self.length += len(text)

    def read(self, start: int, stop: int) -> str:
        pieces = []
        index = bisect_right(self._starts, start) - 1
        while start < stop:
            chunk, offset = self._chunks[index], self._starts[index]
            piece = chunk[start - offset : stop - offset]
            pieces.append(piece)
            start += len(piece)
            index += 1
        return "".join(pieces)

    def stripped(self) -> tuple[int, int]:
        """The range of `text.strip()`; (0, 0) when it is empty."""
        return (self._first, self._end) if self._first >= 0 else (0, 0)

    def unwrapped(self) -> tuple[int, int]:
        """The range of `_unwrap_answer(text)`; (0, 0) when it is empty."""
        start, stop = self.stripped()
        if self._wrapped is None and stop - start >= len(ANSWER_START):
            # The first non-whitespace character never moves, so this is decided once.
            self._wrapped = self.read(start, start + len(ANSWER_START)) == ANSWER_START
        if not self._wrapped:
            return start, stop
        inner, end = start + len(ANSWER_START), stop
        closes = self._last == ">" and end - inner >= len(ANSWER_END)
        if closes and self.read(end - len(ANSWER_END), end) == ANSWER_END:
            end -= len(ANSWER_END)
        first = self._first_at_or_after(inner)
        if first < 0 or first >= end:
            return 0, 0
        return first, stop if end == stop else self._last_end_before(end)

    def _first_at_or_after(self, start: int) -> int:
        """Index of the first non-whitespace character from `start` on; -1: none yet. Each
        character is scanned once, however often this is asked."""
        since, scanned, found = self._first_from
        if since != start:
            scanned, found = start, -1
        if found < 0 and scanned < self.length:
            rest = self.read(scanned, self.length)
            skipped = len(rest) - len(rest.lstrip())
            if skipped < len(rest):
                found = scanned + skipped
            scanned = self.length
        self._first_from = (start, scanned, found)
        return found

    def _last_end_before(self, stop: int) -> int:
        """Just past the last non-whitespace character before `stop`. Called only when one
        exists; the scan is remembered, since trailing whitespace does not move `stop`."""
        if self._end_before[0] != stop:
            end = stop
            while self.read(end - 1, end).isspace():
                end -= 1
            self._end_before = (stop, end)
        return self._end_before[1]


class _Sent:
    """What one part has sent so far, and the delta that extends it to the part's new value."""

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._length = 0
        # (text, start, whether what was sent equals text[start:start + its length]); the text only
        # grows, so the answer stays true until the value starts elsewhere.
        self._anchor: tuple[_Text, int, bool] | None = None

    def extend(self, text: _Text, value: tuple[int, int]) -> str:
        start, stop = value
        if stop - start <= self._length:
            return ""
        # Stripping can only drop whitespace that later text brings back, so what was sent
        # stays a prefix; if it ever is not, send nothing rather than contradict it.
        if self._length and not self._is_prefix(text, start):
            return ""
        delta = text.read(start + self._length, stop)
        self._pieces.append(delta)
        self._length = stop - start
        self._anchor = (text, start, True)
        return delta

    def _is_prefix(self, text: _Text, start: int) -> bool:
        anchor = self._anchor
        if anchor is None or anchor[0] is not text or anchor[1] != start:
            # Rare: the value moved to another text or start (a tag or a wrapper appeared).
            sent = "".join(self._pieces)
            self._pieces = [sent]
            anchor = (text, start, text.read(start, start + self._length) == sent)
            self._anchor = anchor
        return anchor[2]


class ThinkingStream:
    """Splits a reply's text deltas into (reasoning delta, answer delta) as they arrive.

    Text that could be the start of a tag is held back until the next delta settles it, so a tag
    split across tokens never leaks into either part. `opened` says the prompt already opened the
    reasoning (the template ended with `<think>`): the reply then starts inside it. The deltas of
    each part concatenate to what `split_thinking` gives for the whole reply.

    Each delta costs time in proportion to its own length, not the reply's: the visible text is
    routed once to the part it belongs to (answer before any tag, reasoning inside the block,
    answer after it), and each part keeps just enough to know its stripped value's range.
    """

    def __init__(self, opened: bool = False) -> None:
        self._held = ""  # the end of the text that may be a partial tag
        self._inside = False  # after <think>, before </think>
        self._closed = False  # a reasoning block ended: the rest is answer
        self._thinking_text = _Text()
        self._answer_text = _Text()
        self._thinking = _Sent()
        self._answer = _Sent()
        if opened:
            self._route(THINK_START)

    def feed(self, delta: str) -> tuple[str, str]:
        # A tag never straddles text already routed: a held-back partial tag is always the
        # longest one, so any tag that completes begins within `_held + delta`.
        text = self._held + delta
        cut = len(text) - _partial_tag_length(text)
        self._held = text[cut:]
        self._route(text[:cut])
        return self._deltas()

    def finish(self) -> tuple[str, str]:
        """The deltas left once the reply is complete: a held-back partial tag is plain text."""
        self._route(self._held)
        self._held = ""
        return self._deltas()

    def _route(self, text: str) -> None:
        """Appends newly visible text to the part it belongs to, as `split_thinking` would."""
        while text:
            if self._closed:
                self._answer_text.append(text)
                return
            end = text.find(THINK_END)
            if self._inside:
                if end == -1:
                    self._thinking_text.append(text)
                    return
                self._thinking_text.append(text[:end])
                self._inside, self._closed = False, True
                text = text[end + len(THINK_END) :]
                continue
            start = text.find(THINK_START)
            if start != -1 and (end == -1 or start < end):
                self._answer_text.append(text[:start])
                self._inside = True
                text = text[start + len(THINK_START) :]
            elif end != -1:
                # Closed without opening (the template opened it): what came before was reasoning.
                self._answer_text.append(text[:end])
                self._thinking_text, self._answer_text = self._answer_text, _Text()
                self._closed = True
                text = text[end + len(THINK_END) :]
            else:
                self._answer_text.append(text)
                return

    def _deltas(self) -> tuple[str, str]:
        answer = self._answer_text
        # Like split_thinking: an unclosed block leaves the text before it stripped, not unwrapped.
        answer_value = answer.stripped() if self._inside else answer.unwrapped()
        thinking_delta = self._thinking.extend(self._thinking_text, self._thinking_text.stripped())
        return thinking_delta, self._answer.extend(answer, answer_value)


def opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an opened reasoning block (`...<think>\\n`)."""
    return prompt_text.rstrip().endswith(THINK_START)
