"""Streaming text: token ids to text deltas, and stop strings held back until they are ruled out.

`IncrementalDecoder` turns generated ids into text as they arrive, without ever showing half a
character; `StopMatcher` sits after it and cuts the stream at the first stop string. Neither
needs torch, so the server and the chat loop can use them without loading a model.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, SupportsIndex

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first generated token, so that its leading space
# (SentencePiece "▁Hello") survives: decoded alone it would be stripped as a text start.
_CONTEXT_TOKENS = 6
# An unfinished UTF-8 character has at most 3 bytes, so it spans at most 3 tokens that carry text.
_MAX_INCOMPLETE_BYTES = 3
# A normal stream completes a character within a few tokens; past this many pending tokens the
# model is emitting invalid bytes, and the window is cut so it cannot grow with the output.
_MAX_PENDING = 8


class SupportsDecode(Protocol):
    """Any tokenizer with `decode(ids, skip_special_tokens=...)`: Wren's, transformers', `tokenizers`'."""

    def decode(self, ids: list[int], /, skip_special_tokens: bool = ...) -> Any: ...


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that concatenate to `decode(all ids)`.

    Each step decodes a short window of ids (the prefix/read offset scheme): the window starts
    with ids whose text was already emitted, and only what it decodes to beyond that text is
    new. That leading context makes decoders that depend on the previous token (a SentencePiece
    leading space, stripped at the start of a text; a character split over byte tokens) decode
    each new token as they do in the full sequence.

    While the text ends in U+FFFD, the last character may be an incomplete UTF-8 sequence that
    later tokens finish (a Chinese character or emoji split over byte tokens), so nothing is
    emitted until it is complete. `finish()` emits the rest at the end; then an incomplete
    sequence does decode to U+FFFD, as it does in `decode(all ids)`.

    Only the window's ids are kept, so each step costs O(window), not O(output). The window
    spans the last token or two that produced text, plus pending ones; a long run of invalid
    bytes is cut after `_MAX_PENDING` tokens. A long run of tokens that add no text at all
    (skipped special tokens) still widens it until text follows.

    Exact for byte-level BPE (Wren's, GPT-2's, Qwen's), whose invalid bytes each decode on their
    own. SentencePiece byte-fallback decoders turn a whole run of `<0xNN>` tokens into U+FFFD
    when any byte in it is invalid, so there a run of invalid bytes may stream as different
    replacement characters than `decode(all ids)` shows; valid text is unaffected.
    """

    def __init__(
        self,
        tokenizer: SupportsDecode,
        *,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[SupportsIndex] = (),
    ) -> None:
        """`prompt_ids`: the ids before the generated ones; their last few give the first
        generated token its context. Their text is never emitted."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [operator.index(token) for token in prompt_ids[-_CONTEXT_TOKENS:]]
        self._read = len(self._ids)  # window ids before this index have been emitted
        self._prefix_text = self._decode(self._ids)
        self._finished = False

    def add(self, token_ids: SupportsIndex | Iterable[SupportsIndex]) -> str:
        """Append one id or several; return the text they complete ("" while a character is
        incomplete or the ids add no text)."""
        if self._finished:
            raise RuntimeError("IncrementalDecoder.add after finish(); start a new decoder")
        # Any integers: ints, numpy values, tensors (a 0-d one is iterable in name only).
        if isinstance(token_ids, Iterable) and getattr(token_ids, "ndim", 1):
            self._ids.extend(operator.index(token) for token in token_ids)
        else:
            self._ids.append(operator.index(token_ids))
        if len(self._ids) == self._read:
            return ""
        text = self._decode(self._ids)
        if len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT_CHAR):
            return self._advance(text, len(self._ids))
        if len(self._ids) - self._read > _MAX_PENDING and text.endswith(REPLACEMENT_CHAR):
            return self._cut_invalid_run(text)
        return ""

    def finish(self) -> str:
        """The text not yet emitted, incomplete characters included (as U+FFFD). Call once at
        the end of generation; later calls return ""."""
        if self._finished:
            return ""
        self._finished = True
        text = self._decode(self._ids)
        delta = text[len(self._prefix_text) :]
        self._ids, self._read, self._prefix_text = [], 0, ""
        return delta

    def _advance(self, text: str, stable: int) -> str:
        """Emit `text` (the window up to `stable`) past the emitted part, then slide the window:
        the ids just emitted stay as the next step's context."""
        delta = text[len(self._prefix_text) :]
        self._ids = self._ids[self._read :]
        stable -= self._read
        self._read = stable
        self._prefix_text = self._decode(self._ids[:stable])
        return delta

    def _cut_invalid_run(self, text: str) -> str:
        """Emit all but the tail of a window stuck on U+FFFD. Only the last few text-carrying
        tokens can hold a character that is still incomplete, so the ids before them decode
        for good; cut there when decoding the two sides apart gives the same text."""
        cut, carrying = len(self._ids), 0
        while cut > self._read and carrying < _MAX_INCOMPLETE_BYTES:
            cut -= 1
            if self._decode(self._ids[cut : cut + 1]):
                carrying += 1
        if cut <= self._read:
            return ""
        head = self._decode(self._ids[:cut])
        # Not when the cut splits one U+FFFD group, or a decoder joins tokens across it.
        if len(head) <= len(self._prefix_text) or head + self._decode(self._ids[cut:]) != text:
            return ""
        return self._advance(head, cut)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


class StopMatcher:
    """Cuts a stream of text deltas at the first stop string, without ever leaking part of one.

    `feed` returns the text that is safe to show now: it holds back the longest suffix that
    could still grow into a stop string (at most `max(len(stop)) - 1` characters). The first
    stop string to complete ends the stream: `feed` returns the text right before it, and
    nothing after it is ever returned. If two complete at the same character, the longer one
    (starting earlier) wins. The result does not depend on how the text is split into deltas.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(dict.fromkeys(stops))  # unique, in order
        if any(not stop for stop in self.stops):
            raise ValueError("stop strings must be non-empty; an empty one would match at once")
        self.max_hold = max((len(stop) for stop in self.stops), default=1) - 1
        # Every proper prefix of a stop: the suffixes of the text worth holding back.
        self._prefixes = {stop[:size] for stop in self.stops for size in range(1, len(stop))}
        self._held = ""
        self.matched: str | None = None  # the stop string found, once one is

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    @property
    def held(self) -> str:
        """Text received but not yet returned, because a stop string may start in it."""
        return self._held

    def feed(self, delta: str) -> str:
        """Take the next piece of text; return what can be emitted now ("" once stopped)."""
        if self.stopped:
            return ""
        text = self._held + delta
        # The held text holds no whole stop (it would have matched), so one found here ends in
        # `delta`; the first to end is where a character-by-character stream would have stopped.
        found = [(index + len(stop), index, stop) for stop in self.stops if (index := text.find(stop)) >= 0]
        if found:
            _, start, self.matched = min(found, key=lambda item: (item[0], item[1]))
            self._held = ""
            return text[:start]
        hold = self._hold_size(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold]

    def finish(self) -> str:
        """Release the held-back text when generation ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _hold_size(self, text: str) -> int:
        for size in range(min(self.max_hold, len(text)), 0, -1):
            if text[len(text) - size :] in self._prefixes:
                return size
        return 0


__all__ = ["REPLACEMENT_CHAR", "IncrementalDecoder", "StopMatcher", "SupportsDecode"]
