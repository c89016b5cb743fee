"""Trainer state saved beside each checkpoint's weights, for exact resume.

trainer_state/
  state.json       step, tokens seen, the data iterator's position, Python/NumPy RNG states
  optimizer.pt     AdamW moments (torch.save; read back with weights_only=True), in the format of
                   `Optimizer.state_dict()`: parameters numbered in param-group order. Sharded
                   (FSDP) runs convert to and from parameter names, so a checkpoint resumes
                   with or without sharding, on any number of processes.
  rng.pt           torch CPU (and CUDA) generator states
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wren.errors import WrenError

STATE_DIR = "trainer_state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    portable = {
        "python": [python_version, list(python_state), python_gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return portable, tensors


def restore_rng(portable: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = portable["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = portable["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)


def write_state(directory: Path, optimizer_state: dict[str, Any], progress: dict[str, Any]) -> None:
    """Write trainer_state/ inside a checkpoint directory being staged."""
    target = directory / STATE_DIR
    target.mkdir()
    portable, tensors = capture_rng()
    (target / "state.json").write_text(json.dumps({**progress, "rng": portable}, indent=1) + "\n")
    torch.save(optimizer_state, target / "optimizer.pt")
    torch.save(tensors, target / "rng.pt")


def read_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(progress, optimizer state, rng tensors) from a checkpoint's trainer_state/."""
    target = checkpoint / STATE_DIR
    try:
        progress = json.loads((target / "state.json").read_text())
        optimizer_state = torch.load(target / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(target / "rng.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WrenError(
            f"{target}: cannot read trainer state ({exc}); expected a checkpoint written by wren train"
        ) from exc
    return progress, optimizer_state, rng


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The name of each parameter the optimizer holds, group by group, in the optimizer's order."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names[id(param)] for param in group["params"]] for group in optimizer.param_groups]


def optimizer_state_by_index(
    state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """A name-keyed optimizer state (torch.distributed.checkpoint's format) -> state_dict()'s,
    which numbers the parameters 0, 1, ... through the groups in the optimizer's order."""
    groups, index = [], {}
    for saved, names in zip(state["param_groups"], _parameter_names(model, optimizer), strict=True):
        offset = len(index)
        index.update((name, offset + i) for i, name in enumerate(names))
        groups.append({**saved, "params": [index[name] for name in names]})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(
    state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """state_dict()'s optimizer state -> keyed by parameter name, as set_optimizer_state_dict wants.
    Parameters are matched by position within their group, as Optimizer.load_state_dict does."""
    groups, name_of = [], {}
    current = _parameter_names(model, optimizer)
    saved_groups = state["param_groups"]
    if [len(names) for names in current] != [len(saved["params"]) for saved in saved_groups]:
        raise WrenError("the checkpoint's optimizer state does not match the model's parameters")
    for saved, names in zip(saved_groups, current, strict=True):
        name_of.update(zip(saved["params"], names, strict=True))
        groups.append({**saved, "params": names})
    return {"state": {name_of[i]: value for i, value in state["state"].items()}, "param_groups": groups}


def checkpoint_steps(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete step-N checkpoints, oldest first (staging directories are hidden, so never listed)."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_DIR / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> None:
    import shutil

    for _, path in checkpoint_steps(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
