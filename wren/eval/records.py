"""evals.jsonl: evaluation results kept in a training run's directory.

`wren eval ... --save RUN_DIR` appends one JSON object per evaluation; `wren eval report` reads
them back. Each record holds the task, the model and data paths, the time, and the task's result.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wren.errors import WrenError
from wren.jsonl import iter_jsonl

EVALS_FILE = "evals.jsonl"


def save_record(run_dir: str | Path, task: str, model: str | Path, data: Any, result: dict[str, Any]) -> Path:
    """Append a record to RUN_DIR/evals.jsonl; returns the file's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WrenError(f"{run_dir}: not a directory; --save expects a training run directory")
    record = {
        "task": task,
        "model": str(model),
        "data": data,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result,
    }
    path = run_dir / EVALS_FILE
    # One write of a whole line to a file opened for appending: a crash cannot leave half a record
    # in the middle of the file, and evaluations running side by side do not interleave.
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record in RUN_DIR/evals.jsonl, oldest first ([] when there is none)."""
    path = Path(run_dir) / EVALS_FILE
    if not path.is_file():
        return []
    return [record for _, record in iter_jsonl(path)]
