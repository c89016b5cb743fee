"""Separating a reply's reasoning from its answer, for the chat, the server and the web page.

Reasoning models write `<think>reasoning</think>` and then the answer. Some chat templates put the
opening `<think>` in the prompt, so the generated text begins inside the reasoning and only the
closing tag appears; a reply still being streamed (or cut off by the token limit) may have opened
its reasoning without closing it yet. `split_thinking` handles all three, so calling it on the text
generated so far is enough to stream the two parts separately; `ThinkingStream` does that for a
stream of deltas. Pure string work: no torch.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"
# MiniMind's R1 data wraps the answer in these; they are layout, not part of what the user reads.
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
_TAGS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)


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
    longest = 0
    for tag in _TAGS:
        for size in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:size]):
                longest = size
                break
    return longest


class ThinkingStream:
    """Splits a reply's text deltas into (reasoning delta, answer delta) as they arrive.

    Text that could be the start of a tag is held back until the next delta settles it, so a tag
    split across tokens never leaks into either part. `opened` says the prompt already opened the
    reasoning (the template ended with `<think>`): the reply then starts inside it. The deltas of
    each part concatenate to what `split_thinking` gives for the whole reply.
    """

    def __init__(self, opened: bool = False) -> None:
        self._text = THINK_START if opened else ""
        self._sent_thinking = ""
        self._sent_answer = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self._text += delta
        return self._deltas(self._text[: len(self._text) - _partial_tag_length(self._text)])

    def finish(self) -> tuple[str, str]:
        """The deltas left once the reply is complete: a held-back partial tag is plain text."""
        return self._deltas(self._text)

    def _deltas(self, text: str) -> tuple[str, str]:
        thinking, answer = split_thinking(text)
        # Stripping can only drop whitespace that later text brings back, so what was sent
        # stays a prefix; if it ever is not, send nothing rather than contradict it.
        thinking_delta = (
            thinking[len(self._sent_thinking) :] if thinking.startswith(self._sent_thinking) else ""
        )
        answer_delta = answer[len(self._sent_answer) :] if answer.startswith(self._sent_answer) else ""
        self._sent_thinking += thinking_delta
        self._sent_answer += answer_delta
        return thinking_delta, answer_delta


def opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an opened reasoning block (`...<think>\\n`)."""
    return prompt_text.rstrip().endswith(THINK_START)
