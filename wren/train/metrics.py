"""Where training curves go: always `metrics.jsonl` in the run directory (one JSON object per
logged step, read by reports), plus TensorBoard by default or Weights & Biases when asked."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(
        self, out_dir: Path, backend: str, run_config: dict[str, Any], wandb_project: str | None = None
    ):
        out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._tensorboard = None
        self._wandb = None
        if backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "TensorBoard is not installed (pip install tensorboard); curves go to metrics.jsonl only",
                    stacklevel=2,
                )
            else:
                self._tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        elif backend == "wandb":
            try:
                import wandb
            except ImportError:
                warnings.warn(
                    "wandb is not installed (pip install wandb); curves go to metrics.jsonl only",
                    stacklevel=2,
                )
            else:
                self._wandb = wandb.init(project=wandb_project or "wren", config=run_config, dir=str(out_dir))

    def log(self, step: int, values: dict[str, float]) -> None:
        clean = {key: (value if math.isfinite(value) else str(value)) for key, value in values.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()  # a killed run keeps every step it logged
        finite = {key: value for key, value in values.items() if math.isfinite(value)}
        if self._tensorboard is not None:
            for key, value in finite.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(finite, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
