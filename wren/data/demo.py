"""A demo pretraining corpus generated from text that ships with Python itself.

The quickstart must run offline on a fresh machine without committing anyone's dataset, so it
builds its text from the interpreter's own documentation: the pydoc topic pages (the language
reference, shipped as `pydoc_data`) and the docstrings of the standard library's source files,
read with `ast` rather than imported so no module's import-time side effects run.
"""

from __future__ import annotations

import ast
import json
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from wren.atomic import atomic_write_text

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def _paragraph_chunks(text: str, max_chars: int) -> Iterator[str]:
    """Split on blank lines and regroup paragraphs into chunks of at most ~max_chars."""
    chunk: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if chunk and size + len(paragraph) > max_chars:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
        chunk.append(paragraph)
        size += len(paragraph) + 2
    if chunk:
        yield "\n\n".join(chunk)


def _pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package the docs separately
        return
    for name in sorted(topics):
        yield topics[name]


def _stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old escape sequences in some stdlib files
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    yield doc


def demo_texts(max_bytes: int = 4_000_000, max_chars: int = 1500) -> list[str]:
    """Documents of real English prose and code, deterministic for a given Python version."""
    texts: list[str] = []
    total = 0
    for source in (_pydoc_topics(), _stdlib_docstrings()):
        for document in source:
            for chunk in _paragraph_chunks(document, max_chars):
                if len(chunk) < 64:
                    continue
                texts.append(chunk)
                total += len(chunk.encode("utf-8"))
                if total >= max_bytes:
                    return texts
    return texts


def write_demo_pretrain(path: str | Path, max_bytes: int = 4_000_000) -> int:
    """Write the demo corpus as `{"text": ...}` JSON lines; returns the number of rows."""
    texts = demo_texts(max_bytes=max_bytes)
    lines = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    atomic_write_text(path, lines)
    return len(texts)
