"""`wren eval gsm8k`: grade-school maths, answered greedily, scored by exact match on the number.

Rows are GSM8K's `{"question", "answer"}`, the reference answer ending with `#### N`. The model's
answer is the number after its last `####` when it writes one (as models fine-tuned on GSM8K do),
otherwise the last number in its reply; reasoning inside <think>...</think> is ignored. Numbers
are compared as values: commas, a `$` sign and trailing zeros after the point do not matter
("1,000" = "1000", "18.0" = "18").

Prompts are chat messages by default (shots as earlier user/assistant turns), or with
`chat=False` plain text, "Question: ...\\nAnswer: ..." as lm-evaluation-harness writes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from wren.errors import WrenError
from wren.eval.tables import format_table
from wren.infer.engine import Engine
from wren.infer.sampling import SamplingParams
from wren.infer.thinking import split_thinking
from wren.jsonl import iter_jsonl

ANSWER_MARK = "####"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
# Where a plain-text answer ends: the model starting the next question.
_PLAIN_STOPS = ["Question:", "\n\n\n"]


def normalize_number(text: str) -> str | None:
    """A number as a canonical string ("1,000.50" -> "1000.5", "$18.0" -> "18"), or None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return normalize_number(match.group()) if match else None


def reference_answer(answer: str) -> str | None:
    """The number after the last `####` of a GSM8K reference answer."""
    _, mark, tail = answer.rpartition(ANSWER_MARK)
    return _first_number(tail) if mark else None


def extract_answer(reply: str) -> str | None:
    """The model's final number: after its last `####` if it wrote one, else its last number."""
    thinking, answer = split_thinking(reply)
    text = answer or thinking  # a reply cut off inside its reasoning still has numbers there
    if ANSWER_MARK in text:
        found = _first_number(text.rpartition(ANSWER_MARK)[2])
        if found is not None:
            return found
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


@dataclass(frozen=True)
class MathRow:
    path: Path
    line: int
    question: str
    answer: str  # the full reference solution
    target: str  # its normalised final number


def read_math_rows(path: str | Path) -> list[MathRow]:
    path = Path(path)
    rows = []
    for line, data in iter_jsonl(path):
        where = f"{path}:{line}"
        question, answer = data.get("question"), data.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise WrenError(
                f'{where}: expected a non-empty string "question" (keys found: {", ".join(data)})'
            )
        if not isinstance(answer, str):
            raise WrenError(f'{where}: expected a string "answer" ending with "#### <number>"')
        target = reference_answer(answer)
        if target is None:
            raise WrenError(f'{where}: "answer" has no "#### <number>"; expected GSM8K\'s format')
        rows.append(MathRow(path, line, question, answer, target))
    if not rows:
        raise WrenError(f'{path}: no rows; expected {{"question", "answer"}} objects, one per line')
    return rows


def build_messages(row: MathRow, shots: Sequence[MathRow]) -> list[dict[str, str]]:
    messages = []
    for shot in shots:
        messages += [
            {"role": "user", "content": shot.question},
            {"role": "assistant", "content": shot.answer},
        ]
    return [*messages, {"role": "user", "content": row.question}]


def build_plain_prompt(row: MathRow, shots: Sequence[MathRow]) -> str:
    examples = "".join(f"Question: {shot.question}\nAnswer: {shot.answer}\n\n" for shot in shots)
    return f"{examples}Question: {row.question}\nAnswer:"


@dataclass
class MathResult:
    shots: int
    chat: bool
    predictions: list[dict[str, Any]] = field(default_factory=list)
    fewer_shots: int = 0
    truncated: int = 0

    @property
    def rows(self) -> int:
        return len(self.predictions)

    @property
    def correct(self) -> int:
        return sum(p["correct"] for p in self.predictions)

    @property
    def accuracy(self) -> float:
        return self.correct / self.rows if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "shots": self.shots,
            "prompt": "chat" if self.chat else "plain",
            "fewer_shots": self.fewer_shots,
            "truncated": self.truncated,
        }


def _prompt_ids(
    engine: Engine, row: MathRow, shots: list[MathRow], chat: bool, room: int
) -> tuple[list[int], int, bool]:
    """(ids, shots used, cut on the left), encoded as the engine encodes prompts."""
    tokenizer = engine.tokenizer
    for used in range(len(shots), -1, -1):
        if chat:
            ids = list(
                tokenizer.apply_chat_template(build_messages(row, shots[:used]), add_generation_prompt=True)
            )
        else:
            ids = list(tokenizer.encode(build_plain_prompt(row, shots[:used])))
        if len(ids) <= room:
            return ids, used, False
    return ids[-room:], 0, True


def evaluate_gsm8k(
    engine: Engine,
    rows: Sequence[MathRow],
    shots: int = 0,
    shot_pool: Sequence[MathRow] | None = None,
    max_new_tokens: int = 256,
    chat: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> MathResult:
    """Generate a greedy reply to every row, batched by the engine, and grade it.
    Shots are the first `shots` rows of `shot_pool` (default `rows`), the row itself excluded.
    `progress(problems done, tokens generated by them)` is called as replies finish."""
    pool = list(shot_pool or rows)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=[] if chat else _PLAIN_STOPS)
    room = max(engine.max_seq_len - max_new_tokens, 1)
    result = MathResult(shots=shots, chat=chat)
    requests = []
    for row in rows:
        row_shots = [s for s in pool[: shots + 1] if (s.path, s.line) != (row.path, row.line)][:shots]
        ids, used, cut = _prompt_ids(engine, row, row_shots, chat, room)
        result.fewer_shots += used < len(row_shots)
        result.truncated += cut
        requests.append(engine.submit(ids, params))
    finished = generated = 0
    while engine.has_work:
        for request in engine.step():
            finished += 1
            generated += request.result.completion_tokens
            if progress is not None:
                progress(finished, generated)
    for row, request in zip(rows, requests, strict=True):
        reply = request.result.text
        predicted = extract_answer(reply)
        result.predictions.append(
            {
                "line": row.line,
                "question": row.question,
                "target": row.target,
                "reply": reply,
                "predicted": predicted,
                "correct": predicted == row.target,
            }
        )
    return result


def format_gsm8k(result: MathResult) -> str:
    table = format_table(
        ("task", "rows", "correct", "accuracy"),
        [("gsm8k", result.rows, result.correct, f"{100 * result.accuracy:.1f}%")],
    )
    note = f"{result.shots}-shot, {'chat' if result.chat else 'plain'} prompts, greedy"
    if result.fewer_shots or result.truncated:
        note += (
            f"; {result.fewer_shots} prompts dropped shots to fit, {result.truncated} were cut on the left"
        )
    return f"{table}\n{note}"
