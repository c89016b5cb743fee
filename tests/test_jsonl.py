"""wren.jsonl: line-numbered JSON Lines reading and MiniMind row formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wren.errors import WrenError
from wren.jsonl import iter_jsonl, row_texts


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_yields_objects_with_one_based_line_numbers(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", ['{"text": "one"}', '{"text": "two"}'])
    assert list(iter_jsonl(path)) == [(1, {"text": "one"}), (2, {"text": "two"})]


def test_blank_lines_are_skipped_but_still_counted(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", ["", '{"a": 1}', "   ", "\t", '{"a": 2}', ""])
    assert list(iter_jsonl(path)) == [(2, {"a": 1}), (5, {"a": 2})]


def test_accepts_str_path_crlf_and_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')
    assert list(iter_jsonl(str(path))) == [(1, {"a": 1}), (2, {"a": 2})]


def test_unicode_is_read_as_utf8(tmp_path: Path) -> None:
    row = {"text": "你好 👨‍👩‍👧 café"}
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(row, ensure_ascii=False)])
    assert list(iter_jsonl(path)) == [(1, row)]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(WrenError, match=r"nope\.jsonl: no such file"):
        list(iter_jsonl(path))


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WrenError, match="is a directory"):
        list(iter_jsonl(tmp_path))


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "ok"}', "", '{"text": oops}'])
    with pytest.raises(WrenError) as caught:
        list(iter_jsonl(path))
    message = str(caught.value)
    assert f"{path}:3: invalid JSON" in message
    assert "expected one JSON object per line" in message
    assert "\n" not in message


def test_a_line_cut_short_is_reported_at_its_own_end(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "cut.jsonl", ['{"text": "ok"}', '{"conversations": ['])
    with pytest.raises(WrenError, match=r"cut\.jsonl:2: invalid JSON \(Expecting value at column 20\)"):
        list(iter_jsonl(path))


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "array"), ('"text"', "string"), ("3", "number")])
def test_non_object_line_names_file_and_line(tmp_path: Path, line: str, kind: str) -> None:
    path = write_lines(tmp_path / "a.jsonl", ['{"a": 1}', line])
    with pytest.raises(WrenError, match=rf"a\.jsonl:2: found a JSON {kind}; expected a JSON object"):
        list(iter_jsonl(path))


def test_undecodable_bytes_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(WrenError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        list(iter_jsonl(path))


def test_rows_are_streamed_before_a_later_bad_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", ['{"a": 1}', '{"a": 2}', "not json"])
    rows = iter_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    assert next(rows) == (2, {"a": 2})
    with pytest.raises(WrenError, match=r"a\.jsonl:3"):
        next(rows)


def test_row_texts_of_a_pretraining_row() -> None:
    assert row_texts({"text": "hello"}, "f.jsonl", 1) == ["hello"]


def test_row_texts_of_a_conversation() -> None:
    row = {
        "conversations": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\nok\n</think>\n\nhello"},
        ]
    }
    assert row_texts(row, "f.jsonl", 1) == ["be brief", "hi", "<think>\nok\n</think>\n\nhello"]


def test_row_texts_of_a_preference_pair() -> None:
    chosen = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rejected = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]
    row = {"chosen": chosen, "rejected": rejected}
    assert row_texts(row, "f.jsonl", 1) == ["2+2?", "4", "2+2?", "5"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"prompt": "x"},
            r'f\.jsonl:7: found keys prompt; expected a "text" field, a "conversations" list or "chosen"',
        ),
        ({}, r'f\.jsonl:7: found an empty object; expected a "text" field'),
        ({"text": 5}, r'f\.jsonl:7: "text" is a JSON number; expected a string'),
        (
            {"conversations": "hi"},
            r'f\.jsonl:7: "conversations" is a JSON string; expected a "conversations" list',
        ),
        ({"conversations": [{"role": "user"}]}, r'f\.jsonl:7: conversations\[0\] has no string "content"'),
        ({"conversations": ["hi"]}, r"f\.jsonl:7: conversations\[0\]"),
        (
            {"chosen": [], "rejected": {}},
            r'f\.jsonl:7: "rejected" is a JSON object; expected a "rejected" list',
        ),
    ],
)
def test_row_texts_rejects_other_shapes(row: dict, expected: str) -> None:
    with pytest.raises(WrenError, match=expected):
        row_texts(row, "f.jsonl", 7)
