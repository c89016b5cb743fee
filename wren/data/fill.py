"""`wren data fill`: replace `{{name}}`-style placeholders in a JSONL file's strings.

Identity datasets (LLaMA-Factory's identity.json and its copies) write the model's name and
author as `{{name}}` and `{{author}}`; filling them gives the conversations to fine-tune on.
Every string anywhere in a row is filled (keys are left alone), so any format works. A
placeholder without a value is an error, not something to train a model to say.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from wren.atomic import atomic_write_text
from wren.errors import WrenError
from wren.jsonl import iter_jsonl

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _fill(value: Any, values: dict[str, str], used: Counter, missing: set[str]) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in values:
                missing.add(name)
                return match.group(0)
            used[name] += 1
            return values[name]

        return PLACEHOLDER.sub(replace, value)
    if isinstance(value, list):
        return [_fill(item, values, used, missing) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, values, used, missing) for key, item in value.items()}
    return value


def fill_placeholders(source: str | Path, values: dict[str, str], out: str | Path) -> tuple[int, Counter]:
    """Write `source` to `out` (atomically; it may be the same file) with every {{key}} replaced
    by values[key]. Returns (rows written, how many times each key was filled)."""
    used: Counter = Counter()
    lines = []
    for number, row in iter_jsonl(source):
        missing: set[str] = set()
        lines.append(json.dumps(_fill(row, values, used, missing), ensure_ascii=False))
        if missing:
            names = ", ".join(f"{{{{{name}}}}}" for name in sorted(missing))
            sets = " ".join(f"--set {name}=..." for name in sorted(missing))
            raise WrenError(f"{source}:{number}: no value for {names}; pass {sets}")
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return len(lines), used
