"""Reading JSON Lines files in MiniMind's formats, with errors that point at the bad line.

This is the bottom floor: it imports only the standard library and `wren.errors`, so the
tokenizer, the data pipeline and the evaluators can all share one reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from wren.errors import WrenError

_BOM = "\ufeff"
_JSON_KINDS = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def expand_paths(paths: Iterable[Path | str]) -> list[Path]:
    """Files as given; each directory replaced by the *.jsonl files inside it, sorted by name."""
    expanded: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise WrenError(f"{path}: directory has no .jsonl files; expected JSON Lines data")
            expanded.extend(found)
        elif path.is_file():
            expanded.append(path)
        else:
            raise WrenError(f"{path}: no such file or directory")
    if not expanded:
        raise WrenError("no data files given; expected one or more .jsonl files or directories")
    return expanded


def iter_jsonl(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for every non-blank line of a JSON Lines file.

    Lines are decoded one at a time, so a huge file is streamed and a bad byte or bad line is
    reported with its own line number.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise WrenError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WrenError(f"{path}: is a directory; expected a .jsonl file") from None
    except OSError as error:
        raise WrenError(f"{path}: cannot read ({error.strerror}); expected a readable .jsonl file") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            parsed = parse_jsonl_line(raw, path, number)
            if parsed is not None:
                yield number, parsed[1]


def parse_jsonl_line(raw: bytes, path: Path, number: int) -> tuple[str, dict[str, Any]] | None:
    """One line of a JSON Lines file: (its text without surrounding whitespace, the object), or
    None for a blank line. A bad line raises WrenError starting with `path:number: `, so callers
    that want to go on past bad lines (`wren data check`) get the same messages as iter_jsonl."""
    text = _decode_line(raw, path, number)
    if number == 1:
        # Editors on Windows often start UTF-8 files with a byte-order mark.
        text = text.removeprefix(_BOM)
    if not text.strip():
        return None
    # Leading whitespace is kept so a bad line's column numbers match what an editor shows; the
    # line break is dropped so a line cut short is reported on its own line, not on the next.
    return text.strip(), _parse_object(text.rstrip("\r\n"), path, number)


def _decode_line(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise WrenError(
            f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start} of the line); "
            "expected UTF-8 text"
        ) from None


def _parse_object(text: str, path: Path, number: int) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        reason = f"{error.msg} at column {error.colno}"
        where = f"{path}:{number}"
        raise WrenError(f"{where}: invalid JSON ({reason}); expected one JSON object per line") from None
    if not isinstance(value, dict):
        raise WrenError(
            f"{path}:{number}: found a JSON {_kind(value)}; expected a JSON object {{...}} on each line"
        )
    return value


def _kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def row_texts(row: dict[str, Any], path: Path | str, line: int) -> list[str]:
    """The training text in one row: `{"text": ...}` gives [text]; `{"conversations": [...]}` gives
    each turn's content; a preference pair `{"chosen": [...], "rejected": [...]}` gives the turns
    of both. `path` and `line` are only used to say where a bad row is."""
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str):
            raise WrenError(f'{path}:{line}: "text" is a JSON {_kind(text)}; expected a string')
        return [text]
    if "conversations" in row:
        return _conversation_texts(row["conversations"], path, line, "conversations")
    if "chosen" in row and "rejected" in row:
        return [
            *_conversation_texts(row["chosen"], path, line, "chosen"),
            *_conversation_texts(row["rejected"], path, line, "rejected"),
        ]
    found = "keys " + ", ".join(sorted(row)) if row else "an empty object"
    raise WrenError(
        f'{path}:{line}: found {found}; expected a "text" field, a "conversations" list '
        'or "chosen" and "rejected" lists'
    )


def _conversation_texts(turns: Any, path: Path | str, line: int, field: str) -> list[str]:
    if not isinstance(turns, list):
        raise WrenError(
            f'{path}:{line}: "{field}" is a JSON {_kind(turns)}; '
            f'expected a "{field}" list of {{"role", "content"}} objects'
        )
    texts = []
    for index, turn in enumerate(turns):
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(content, str):
            raise WrenError(
                f'{path}:{line}: {field}[{index}] has no string "content"; '
                'expected {"role": ..., "content": "..."}'
            )
        texts.append(content)
    return texts
