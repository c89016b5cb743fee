"""Weight files on disk <-> Wren state dicts.

Dense models use the stock Hugging Face tensor names as they are. The only reshaping is for
mixture-of-experts layers: on disk every expert is its own trio of matrices
(`mlp.experts.3.gate_proj.weight`), in memory they are stacked along a leading expert dimension
(`mlp.experts.gate_proj`) so routing can run each expert as one matmul.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wren.atomic import use_default_mode
from wren.errors import WrenError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# `wren quantize`'s weights (wren.checkpoint.quantized): a name transformers does not look for.
QUANTIZED_SAFETENSORS = "model.quantized.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pth", "consolidated.pth")

_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED_GATE_UP = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.gate_up_proj$")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise WrenError(f"{path}: cannot read safetensors weights ({exc})") from exc


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WrenError(f"{path}: cannot read PyTorch weights ({exc})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WrenError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def _shard_files(directory: Path, index_name: str) -> list[Path]:
    index_path = directory / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise WrenError(f'{index_path}: expected a shard index with a "weight_map" ({exc})') from exc
    return [directory / name for name in sorted(set(weight_map.values()))]


def read_weights(directory: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by its name on disk."""
    if (directory / QUANTIZED_SAFETENSORS).is_file():
        return _read_safetensors(directory / QUANTIZED_SAFETENSORS)
    if (directory / SAFETENSORS).is_file():
        return _read_safetensors(directory / SAFETENSORS)
    if (directory / SAFETENSORS_INDEX).is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in _shard_files(directory, SAFETENSORS_INDEX):
            state.update(_read_safetensors(shard))
        return state
    pickles = [directory / name for name in PICKLE_FILES if (directory / name).is_file()]
    if pickles and not allow_pickle:
        raise WrenError(
            f"{pickles[0]}: pickle weights can run code when loaded; pass --allow-pickle to read them "
            "(loaded with torch's weights_only=True), or convert the model to safetensors"
        )
    if pickles:
        files = _shard_files(directory, pickles[0].name) if pickles[0].name.endswith(".json") else pickles[:1]
        state = {}
        for file in files:
            state.update(_read_pickle(file))
        return state
    raise WrenError(f"{directory}: no weights found; expected {SAFETENSORS} (or {SAFETENSORS_INDEX})")


def stock_to_wren(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/stack on-disk tensors into Wren's parameter layout."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved this derived buffer
            continue
        if match := _EXPERT_KEY.match(key):
            experts[(match["prefix"], match["proj"])][int(match["expert"])] = tensor
        elif match := _FUSED_GATE_UP.match(key):  # transformers 5's in-memory layout, if saved as-is
            gate, up = tensor.chunk(2, dim=1)
            out[f"{match['prefix']}.gate_proj"] = gate
            out[f"{match['prefix']}.up_proj"] = up
        else:
            out[key] = tensor
    for (prefix, proj), by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise WrenError(f"{prefix}: expert indices are not contiguous from 0: {sorted(by_index)}")
        out[f"{prefix}.{proj}"] = torch.stack([by_index[i] for i in range(len(by_index))])
    return out


def wren_to_stock(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split stacked expert tensors back into one tensor per expert, as the stock format stores them."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix, _, proj = key.rpartition(".")
        if prefix.endswith(".mlp.experts") and proj in ("gate_proj", "up_proj", "down_proj"):
            for index, matrix in enumerate(tensor.unbind(0)):
                out[f"{prefix}.{index}.{proj}.weight"] = matrix
        else:
            out[key] = tensor
    return out


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    use_default_mode(path)
