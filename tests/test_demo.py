"""wren.data.demo: the generated pretraining and SFT corpora built from Python's own documentation."""

from __future__ import annotations

import ast
import functools
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from wren.data import demo
from wren.data.demo import demo_conversations, write_demo_corpus, write_demo_sft
from wren.jsonl import iter_jsonl, row_texts

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def generated() -> tuple[list[dict[str, Any]], set[str]]:
    """The default corpus, plus the modules that generating it imported (it should import none)."""
    demo._file_docs.cache_clear()
    demo._sft_entries.cache_clear()
    before = set(sys.modules)
    rows = demo_conversations()
    return rows, set(sys.modules) - before


@pytest.fixture(scope="module")
def rows(generated: tuple[list[dict[str, Any]], set[str]]) -> list[dict[str, Any]]:
    return generated[0]


def dialogue(row: dict[str, Any]) -> list[dict[str, str]]:
    """The user and assistant turns of a row, without its optional system turn."""
    return [turn for turn in row["conversations"] if turn["role"] != "system"]


def answers(rows: list[dict[str, Any]]) -> list[str]:
    return [turn["content"] for row in rows for turn in dialogue(row) if turn["role"] == "assistant"]


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def stdlib_docstrings(qualified: str) -> list[str]:
    """Docstrings of every definition that `qualified` ("json.dumps", "textwrap.TextWrapper.wrap")
    could name, read with ast the way a reader of the source would find them."""
    parts = qualified.split(".")
    found = []
    for split in range(len(parts) - 1, 0, -1):
        base = STDLIB.joinpath(*parts[:split])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if not path.is_file():
                continue
            nodes: list[ast.AST] = [parse(path)]
            for name in parts[split:]:
                nodes = [
                    child
                    for node in nodes
                    for child in ast.walk(node)
                    if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                    and child.name == name
                ]
            found += [doc for node in nodes if (doc := ast.get_docstring(node))]
    return found


def test_rows_are_minimind_sft(rows: list[dict[str, Any]]) -> None:
    assert len(rows) == 4000
    for row in rows:
        assert list(row) == ["conversations"]
        turns = row["conversations"]
        if turns[0]["role"] == "system":
            turns = turns[1:]
        assert turns and len(turns) % 2 == 0
        assert [turn["role"] for turn in turns] == ["user", "assistant"] * (len(turns) // 2)
        for turn in row["conversations"]:
            assert set(turn) == {"role", "content"}
            assert isinstance(turn["content"], str) and turn["content"].strip()


def test_generation_is_deterministic_and_seeded(rows: list[dict[str, Any]]) -> None:
    assert demo_conversations() == rows
    assert demo_conversations(seed=1) != rows
    assert demo_conversations(50) == demo_conversations(50)
    assert len(demo_conversations(50)) == 50
    assert demo_conversations(0) == []


def test_questions_come_in_several_phrasings(rows: list[dict[str, Any]]) -> None:
    templates = {re.sub(r"`[^`]+`", "`X`", dialogue(row)[0]["content"]) for row in rows}
    assert len({t for t in templates if "`X`" in t}) >= 15


def test_answers_are_short(rows: list[dict[str, Any]]) -> None:
    lengths = [len(answer) for answer in answers(rows)]
    assert max(lengths) <= 400
    assert sum(lengths) / len(lengths) < 200


def test_identity_turns_are_present(rows: list[dict[str, Any]]) -> None:
    identity = [row for row in rows if "I am Wren" in dialogue(row)[1]["content"]]
    assert len(identity) >= 0.03 * len(rows)
    assert len({dialogue(row)[0]["content"] for row in identity}) >= 10  # phrased several ways


def test_multi_turn_conversations_are_present(rows: list[dict[str, Any]]) -> None:
    multi = [row for row in rows if len(dialogue(row)) >= 4]
    assert len(multi) >= 0.1 * len(rows)
    follow_ups = {dialogue(row)[2]["content"] for row in multi}
    assert {"Show me its signature.", "Tell me more."} <= follow_ups
    assert any(row["conversations"][0]["role"] == "system" for row in rows)


def test_answers_are_quoted_from_the_docstrings(rows: list[dict[str, Any]]) -> None:
    checked = 0
    for row in rows:
        question, answer = (turn["content"] for turn in dialogue(row)[:2])
        match = re.fullmatch(r"What does `([\w.]+)` do\?", question)
        if not match or checked >= 25:
            continue
        docs = [" ".join(doc.split()).replace("``", "`") for doc in stdlib_docstrings(match[1])]
        assert any(answer.rstrip(".") in doc for doc in docs), (question, answer)
        checked += 1
    assert checked >= 10


def test_module_answers_name_the_defining_module(rows: list[dict[str, Any]]) -> None:
    checked = 0
    for answer in answers(rows):
        match = re.fullmatch(r"`(\w+)` is in the `([\w.]+)` module\. Import it with .*", answer)
        if match and checked < 30:
            name, module = match.groups()
            assert stdlib_docstrings(f"{module}.{name}"), answer
            checked += 1
    assert checked >= 20


def test_docstrings_are_read_without_importing_the_modules(
    generated: tuple[list[dict[str, Any]], set[str]],
) -> None:
    imported = generated[1]
    assert not imported & {"http.server", "tomllib", "zoneinfo", "tarfile", "unittest.mock", "pdb"}


def test_write_demo_sft_writes_readable_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "sft.jsonl"
    assert write_demo_sft(path, max_conversations=30) == 30
    read = [row for _, row in iter_jsonl(path)]
    assert read == demo_conversations(30)
    assert all(row_texts(row, path, 1) for row in read)


def test_write_demo_corpus_writes_both_files(tmp_path: Path) -> None:
    paths = write_demo_corpus(tmp_path / "demo", max_mb=0.05, max_conversations=100)
    assert paths == {"pretrain": tmp_path / "demo" / "pretrain.jsonl", "sft": tmp_path / "demo" / "sft.jsonl"}
    pretrain = [row for _, row in iter_jsonl(paths["pretrain"])]
    sft = [row for _, row in iter_jsonl(paths["sft"])]
    assert pretrain and all(set(row) == {"text"} for row in pretrain)
    assert len(sft) == 100 and all(set(row) == {"conversations"} for row in sft)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["pretrain.jsonl", "sft.jsonl"]
