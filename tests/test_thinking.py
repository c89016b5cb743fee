"""`ThinkingStream` against `split_thinking`, on any text cut at any points (hypothesis), and on a
reply long enough that re-splitting the whole text per delta would take minutes."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wren.infer.thinking import (
    ANSWER_END,
    ANSWER_START,
    THINK_END,
    THINK_START,
    ThinkingStream,
    split_thinking,
)

# Tags, their fragments and whitespace, so that tags split across deltas and stripping are common.
PIECES = [
    THINK_START,
    THINK_END,
    ANSWER_START,
    ANSWER_END,
    "<",
    "</",
    "<th",
    "think>",
    "answer>",
    " ",
    "\n",
    "a",
]
TEXTS = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=24).map("".join)


@st.composite
def cut_texts(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(TEXTS)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[start:stop] for start, stop in itertools.pairwise(bounds)]


def streamed(deltas: list[str], opened: bool) -> list[tuple[str, str]]:
    stream = ThinkingStream(opened)
    return [stream.feed(delta) for delta in deltas] + [stream.finish()]


def closes_first(text: str) -> bool:
    """Whether the first reasoning tag closes a block: the prompt must have opened it."""
    start, end = text.find(THINK_START), text.find(THINK_END)
    return end != -1 and (start == -1 or end < start)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(cut_texts())
def test_any_cuts_concatenate_to_split_thinking(case):
    text, deltas = case
    start = min((i for i in (text.find(THINK_START), text.find(THINK_END)) if i != -1), default=len(text))
    # Text before the reasoning block that is already on screen cannot be taken back, so a
    # wrapper or tag there that the block later reinterprets (`<answer>a<think>...` unclosed,
    # `<ans<think>..</think>wer>`) cannot match; replies open with their reasoning.
    assume("<" not in text[:start])
    parts = streamed(deltas, opened=closes_first(text))
    thinking, answer = ("".join(part) for part in zip(*parts, strict=True))
    assert (thinking, answer) == split_thinking(text)


class ResplittingStream:
    """The previous ThinkingStream, quadratic but obviously right: split all the text so far."""

    def __init__(self, opened: bool) -> None:
        self.text = THINK_START if opened else ""
        self.sent = ("", "")

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        held = max(
            (size for tag in PIECES[:4] for size in range(1, len(tag)) if self.text.endswith(tag[:size])),
            default=0,
        )
        return self.deltas(self.text[: len(self.text) - held])

    def finish(self) -> tuple[str, str]:
        return self.deltas(self.text)

    def deltas(self, text: str) -> tuple[str, str]:
        parts = split_thinking(text)
        deltas = tuple(
            now[len(sent) :] if now.startswith(sent) else ""
            for now, sent in zip(parts, self.sent, strict=True)
        )
        self.sent = (self.sent[0] + deltas[0], self.sent[1] + deltas[1])
        return deltas


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(cut_texts(), st.booleans())
def test_every_delta_is_what_resplitting_gave(case, opened):
    # Including the odd texts the test above leaves out: the incremental stream changed the
    # cost, not one delta.
    _, deltas = case
    reference = ResplittingStream(opened)
    expected = [reference.feed(delta) for delta in deltas] + [reference.finish()]
    assert streamed(deltas, opened) == expected


def test_a_long_reply_in_one_character_deltas():
    # 200k characters: re-splitting the whole text on every delta took minutes for this.
    reasoning = "Let me add these up step by step.\n" * 3200
    answer = "<answer>\n" + "The total is 42, because 40 + 2 = 42. " * 2600 + "\n</answer>\n"
    text = THINK_START + "\n" + reasoning + THINK_END + "\n" + answer
    assert len(text) > 200_000
    parts = streamed(list(text), opened=False)
    thinking, answer_part = ("".join(part) for part in zip(*parts, strict=True))
    assert (thinking, answer_part) == split_thinking(text)
