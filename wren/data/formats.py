"""MiniMind's three JSONL formats: the rules a row must follow, reading rows, and `wren data check`.

- pretraining: `{"text": "..."}`, a non-empty string;
- SFT: `{"conversations": [{"role": ..., "content": "..."}, ...]}` with roles system, user and
  assistant, ending with a non-empty assistant reply;
- preference pairs: `{"chosen": [...], "rejected": [...]}`, two such conversations with the same
  prompt (every message but the last) and different final replies.

Extra keys are allowed and ignored. Problems name the message by its 0-based index in the list,
as in `conversations[2]`, so they point at the JSON exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wren.data.report import CheckReport, FileReport, Problem, format_check_report
from wren.errors import WrenError
from wren.jsonl import expand_paths, parse_jsonl_line

if TYPE_CHECKING:
    from wren.tokenizer import Tokenizer

KINDS = ("pretrain", "sft", "preference")
ROLES = ("system", "user", "assistant")
_MAX_SKIP_EXAMPLES = 10
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


# ---------------------------------------------------------------------------------------------
# Rules


def detect_kind(row: dict[str, Any]) -> str | None:
    """Which format a row claims to be, from its keys alone (it may still be invalid)."""
    if "text" in row:
        return "pretrain"
    if "conversations" in row:
        return "sft"
    if "chosen" in row and "rejected" in row:
        return "preference"
    return None


def row_problem(kind: str, row: dict[str, Any]) -> str | None:
    """None when `row` is a valid row of `kind`, else a short message saying what is wrong."""
    if kind == "pretrain":
        return _text_problem(row)
    if kind == "sft":
        if "conversations" not in row:
            return _missing("conversations", row)
        return _conversation_problem(row["conversations"], "conversations")
    if kind == "preference":
        return _preference_problem(row)
    raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")


def _text_problem(row: dict[str, Any]) -> str | None:
    if "text" not in row:
        return _missing("text", row)
    text = row["text"]
    if not isinstance(text, str):
        return f'"text" is a JSON {_json_type(text)}; expected a string'
    if not text.strip():
        return "empty text"
    return None


def _conversation_problem(messages: Any, name: str) -> str | None:
    if not isinstance(messages, list):
        return f'"{name}" is a JSON {_json_type(messages)}; expected a list of {{"role", "content"}} messages'
    if not messages:
        return f'"{name}" is empty; expected at least a user message and an assistant reply'
    for index, message in enumerate(messages):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            return f'{where} is a JSON {_json_type(message)}; expected {{"role", "content"}}'
        if "role" not in message:
            return f'{where} has no "role"; expected system, user or assistant'
        role = message["role"]
        if role not in ROLES:
            return f"{where} has unknown role {_show(role)}; expected system, user or assistant"
        if "content" not in message:
            return f'{where} has no "content"'
        content = message["content"]
        if not isinstance(content, str):
            return f'"content" of {where} is a JSON {_json_type(content)}; expected a string'
        # An empty reply would teach the model to end its turn without answering.
        if role == "assistant" and not content.strip():
            return f"{where} is an empty assistant reply"
    last = messages[-1]["role"]
    if last != "assistant":
        return f'"{name}" does not end with an assistant turn (the last message is {last})'
    return None


def _preference_problem(row: dict[str, Any]) -> str | None:
    for name in ("chosen", "rejected"):
        if name not in row:
            return _missing(name, row)
        problem = _conversation_problem(row[name], name)
        if problem is not None:
            return problem
    chosen, rejected = row["chosen"], row["rejected"]
    if _turns(chosen[:-1]) != _turns(rejected[:-1]):
        return (
            "chosen and rejected differ before their last message; expected the same prompt "
            "followed by two different assistant replies"
        )
    if chosen[-1]["content"] == rejected[-1]["content"]:
        return "chosen and rejected end with the same reply; expected two different replies"
    return None


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    # Only role and content make the prompt; other keys (names, ids) may differ.
    return [(message["role"], message["content"]) for message in messages]


def _missing(name: str, row: dict[str, Any]) -> str:
    found = ", ".join(sorted(row)) if row else "none"
    return f'missing "{name}" field (keys found: {found})'


def _json_type(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else f"a JSON {_json_type(value)}"


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Row:
    """One valid row. `raw` is the line's text without surrounding whitespace (the split hashes
    it); `nbytes` the line's size in the file, for progress."""

    path: Path
    line: int
    data: dict[str, Any]
    raw: str
    nbytes: int = 0


@dataclass
class SkipCounter:
    """Bad lines passed over with skip_bad_lines: how many, and the first few for the log."""

    count: int = 0
    examples: list[Problem] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        self.count += 1
        if len(self.examples) < _MAX_SKIP_EXAMPLES:
            self.examples.append(problem)


def iter_rows(
    paths: Iterable[Path | str],
    kind: str,
    skip_bad_lines: bool = False,
    skipped: SkipCounter | None = None,
) -> Iterator[Row]:
    """Every valid row of `kind` in the files, in order. A bad line (invalid JSON, a row that
    breaks the rules) raises WrenError("file:line: problem"), or with `skip_bad_lines` is counted
    in `skipped` and passed over."""
    if kind not in KINDS:
        raise WrenError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    skipped = skipped if skipped is not None else SkipCounter()
    for path in expand_paths(paths):
        for line, nbytes, parsed in _read_lines(path):
            message = parsed if isinstance(parsed, str) else row_problem(kind, parsed[1])
            if message is None:
                raw, data = parsed
                yield Row(path, line, data, raw, nbytes)
            elif skip_bad_lines:
                skipped.add(Problem(path, line, message))
            else:
                raise WrenError(f"{path}:{line}: {message}")


def _read_lines(path: Path) -> Iterator[tuple[int, int, tuple[str, dict[str, Any]] | str]]:
    """(line number, bytes, (raw text, object) or the problem) for each non-blank line."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise WrenError(f"{path}: cannot read ({error.strerror}); expected a readable .jsonl file") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                parsed = parse_jsonl_line(raw, path, number)
            except WrenError as error:
                yield number, len(raw), str(error).removeprefix(f"{path}:{number}: ")
                continue
            if parsed is not None:
                yield number, len(raw), parsed


# ---------------------------------------------------------------------------------------------
# Checking


def check_files(
    paths: Iterable[Path | str], kind: str | None = None, tokenizer: Tokenizer | None = None
) -> CheckReport:
    """Read every line of every file and report all problems and the size of the data.

    With `kind` None each file's kind is taken from its first row that has a known field. With a
    tokenizer the report also counts tokens as training would produce them (pretraining: the
    text plus one end-of-text token; conversations: the chat template's rendering).
    """
    if kind is not None and kind not in KINDS:
        raise WrenError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    counter = _TokenCounter(tokenizer) if tokenizer is not None else None
    reports = [_check_file(path, kind, counter) for path in expand_paths(paths)]
    return CheckReport(reports, tokenized=counter is not None)


def _check_file(path: Path, kind: str | None, counter: _TokenCounter | None) -> FileReport:
    report = FileReport(path, kind)
    for line, _, parsed in _read_lines(path):
        report.rows += 1
        if isinstance(parsed, str):
            report.problems.append(Problem(path, line, parsed))
            continue
        row = parsed[1]
        if report.kind is None:
            report.kind = detect_kind(row)
        message = _missing_any(row) if report.kind is None else row_problem(report.kind, row)
        if message is not None:
            report.problems.append(Problem(path, line, message))
            continue
        report.valid_rows += 1
        _measure(report, row, counter)
    return report


def _missing_any(row: dict[str, Any]) -> str:
    found = ", ".join(sorted(row)) if row else "none"
    return (
        f'no "text", "conversations" or "chosen"/"rejected" field (keys found: {found}); '
        "expected a pretraining, SFT or preference row"
    )


def _measure(report: FileReport, row: dict[str, Any], counter: _TokenCounter | None) -> None:
    if report.kind == "pretrain":
        report.chars.append(len(row["text"]))
    elif report.kind == "sft":
        messages = row["conversations"]
        report.chars.append(sum(len(message["content"]) for message in messages))
        report.turns.append(len(messages))
    else:
        chosen, rejected = row["chosen"], row["rejected"]
        report.chars.append(sum(len(message["content"]) for message in chosen) + len(rejected[-1]["content"]))
        report.turns.append(len(chosen))
    if counter is not None:
        tokens, trained = counter.count(report.kind, row)
        report.tokens.append(tokens)
        report.trained_tokens += trained


class _TokenCounter:
    """Counts tokens per row the way data preparation will encode the row."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        from wren.data.chat import encode_conversation, end_of_text_id

        self.tokenizer = tokenizer
        self.encode_conversation = encode_conversation
        self.end_of_text = end_of_text_id(tokenizer)

    def count(self, kind: str, row: dict[str, Any]) -> tuple[int, int]:
        """(tokens in the row, tokens that carry a loss)."""
        if kind == "pretrain":
            tokens = len(self.tokenizer.encode(row["text"])) + 1
            return tokens, tokens
        conversations = [row["conversations"]] if kind == "sft" else [row["chosen"], row["rejected"]]
        total = trained = 0
        for messages in conversations:
            ids, mask = self.encode_conversation(self.tokenizer, messages)
            total += len(ids)
            trained += sum(mask)
        return total, trained


__all__ = [
    "KINDS",
    "CheckReport",
    "FileReport",
    "Problem",
    "Row",
    "SkipCounter",
    "check_files",
    "detect_kind",
    "expand_paths",
    "format_check_report",
    "iter_rows",
    "row_problem",
]
