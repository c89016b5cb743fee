"""Separating a reply's reasoning from its answer, for the chat, the server and the web page.

Reasoning models write `<think>reasoning</think>` and then the answer. Some chat templates put the
opening `<think>` in the prompt, so the generated text begins inside the reasoning and only the
closing tag appears; a reply still being streamed (or cut off by the token limit) may have opened
its reasoning without closing it yet. `split_thinking` handles all three, so calling it on the text
generated so far is enough to stream the two parts separately. Pure string work: no torch.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"
# MiniMind's R1 data wraps the answer in these; they are layout, not part of what the user reads.
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"


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
