"""What a training run directory holds, read for the report card.

train_config.json     the resolved settings
metrics.jsonl         one JSON object per logged step: "step", "train/loss", "train/lr",
                      "val/loss", "val/bpb", ...
checkpoints/step-N/   the last few checkpoints
final/                the finished model (a PEFT adapter directory for LoRA runs)
evals.jsonl           results saved by `wren eval ... --save` (see records.py)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from wren.errors import WrenError
from wren.jsonl import parse_jsonl_line

Curve = list[tuple[int, float]]


def read_train_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "train_config.json"
    if not Path(run_dir).is_dir():
        raise WrenError(f"{run_dir}: not a directory; expected a training run directory")
    if not path.is_file():
        raise WrenError(f"{path}: no such file; expected a training run directory (from wren train)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise WrenError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise WrenError(f"{path}: expected a JSON object of settings")
    return config


def read_curves(run_dir: str | Path) -> dict[str, Curve]:
    """Every logged metric as (step, value) pairs sorted by step. A step logged twice (a resumed
    run repeats the steps after its checkpoint) keeps its last value; non-finite values (logged
    as strings) are left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    by_name: dict[str, dict[int, float]] = {}
    lines = path.read_bytes().split(b"\n")
    # After the last newline: nothing, or a line still being written by a running job.
    for number, raw in enumerate(lines[:-1], start=1):
        parsed = parse_jsonl_line(raw, path, number)
        if parsed is None:
            continue
        row = parsed[1]
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise WrenError(f'{path}:{number}: expected an integer "step"')
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                by_name.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in by_name.items()}


def final_model(run_dir: str | Path) -> Path | None:
    """final/, or the newest checkpoints/step-N/ of a run that has not finished; None if neither."""
    run_dir = Path(run_dir)
    if (run_dir / "final").is_dir():
        return run_dir / "final"
    steps = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if path.is_dir() and suffix.isdigit():
            steps.append((int(suffix), path))
    return max(steps)[1] if steps else None


def is_adapter(path: Path) -> bool:
    """A LoRA run's model is a PEFT adapter directory, to be applied to the run's --init."""
    return (path / "adapter_config.json").is_file()
