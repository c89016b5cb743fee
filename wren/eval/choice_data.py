"""Multiple-choice rows: `{"subject", "question", "choices": [...], "answer"}`, one per line.

The answer is a letter ("A", "B", ...) or a 0-based index into the choices. The subject is
optional (rows without one are grouped under "all"); other keys are ignored. A bad row raises
WrenError naming its file and line and what was expected.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wren.errors import WrenError
from wren.jsonl import iter_jsonl

LETTERS = string.ascii_uppercase
NO_SUBJECT = "all"


@dataclass(frozen=True)
class ChoiceRow:
    path: Path
    line: int
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # 0-based index into choices


def read_choice_rows(path: str | Path) -> list[ChoiceRow]:
    """Every row of a multiple-choice JSONL file, in file order."""
    path = Path(path)
    rows = [_parse_row(data, path, line) for line, data in iter_jsonl(path)]
    if not rows:
        raise WrenError(
            f'{path}: no rows; expected {{"question", "choices", "answer"}} objects, one per line'
        )
    return rows


def _parse_row(data: dict[str, Any], path: Path, line: int) -> ChoiceRow:
    where = f"{path}:{line}"
    missing = [key for key in ("question", "choices", "answer") if key not in data]
    if missing:
        found = ", ".join(sorted(data)) or "none"
        raise WrenError(
            f"{where}: missing {', '.join(repr(k) for k in missing)} (keys found: {found}); "
            'expected {"subject", "question", "choices": [...], "answer"}'
        )
    question, choices, subject = data["question"], data["choices"], data.get("subject", NO_SUBJECT)
    if not isinstance(question, str) or not question.strip():
        raise WrenError(f'{where}: "question" must be a non-empty string')
    if not isinstance(subject, str) or not subject.strip():
        raise WrenError(f'{where}: "subject" must be a non-empty string')
    if (
        not isinstance(choices, list)
        or not 2 <= len(choices) <= len(LETTERS)
        or not all(isinstance(choice, str) for choice in choices)
    ):
        raise WrenError(f'{where}: "choices" must be a list of 2 to {len(LETTERS)} strings')
    answer = _answer_index(data["answer"], len(choices), where)
    return ChoiceRow(path, line, subject.strip(), question, tuple(choices), answer)


def _answer_index(answer: Any, n_choices: int, where: str) -> int:
    letters = LETTERS[:n_choices]
    expected = f"expected a letter {letters[0]}-{letters[-1]} or an index 0-{n_choices - 1}"
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < n_choices:
            return answer
        raise WrenError(f'{where}: "answer" {answer} is out of range for {n_choices} choices; {expected}')
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip() in letters:
        return letters.index(answer.strip())
    raise WrenError(f'{where}: "answer" is {answer!r}; {expected}')
