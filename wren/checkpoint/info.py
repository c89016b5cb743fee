"""`wren model info`: what a checkpoint holds, read from its headers without loading the weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

from wren.checkpoint import read_model_config
from wren.checkpoint.quantized import read_quantization
from wren.checkpoint.weights import QUANTIZED_SAFETENSORS, SAFETENSORS, SAFETENSORS_INDEX, read_weights
from wren.errors import WrenError


def _tensor_headers(path: Path, allow_pickle: bool) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) for every stored tensor."""
    if (path / QUANTIZED_SAFETENSORS).is_file():
        files = [path / QUANTIZED_SAFETENSORS]
    elif (path / SAFETENSORS).is_file():
        files = [path / SAFETENSORS]
    elif (path / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:  # pickles: no header to read, so load them (read_weights enforces --allow-pickle)
        state = read_weights(path, allow_pickle=allow_pickle)
        return {k: (list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in state.items()}
    headers = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor_slice = f.get_slice(key)
                    headers[key] = (list(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except Exception as exc:
            raise WrenError(f"{file}: cannot read safetensors header ({exc})") from exc
    return headers


def describe_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    path = Path(path)
    config = read_model_config(path)
    hf = json.loads((path / "config.json").read_text())
    headers = _tensor_headers(path, allow_pickle)
    quantization = read_quantization(path)
    if quantization is None:
        n_params = sum(_numel(shape) for shape, _ in headers.values())
        dtypes = Counter(dtype for _, dtype in headers.values())
    else:
        n_params = sum(
            _quantized_parameters(name, shape, config.tie_embeddings) for name, (shape, _) in headers.items()
        )
        dtypes = Counter(dtype for name, (_, dtype) in headers.items() if name.endswith((".weight", ".bias")))
    embedding = _numel(headers.get("model.embed_tokens.weight", ([0], ""))[0])
    layer0 = {
        name.removeprefix("model.layers.0."): shape
        for name, (shape, _) in headers.items()
        if name.startswith("model.layers.0.")
    }
    return {
        "path": str(path),
        "architecture": (hf.get("architectures") or [hf.get("model_type")])[0],
        "parameters": n_params,
        "non_embedding_parameters": n_params - embedding * (1 if config.tie_embeddings else 2),
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "quantization": quantization.describe() if quantization else None,
        "vocab_size": config.vocab_size,
        "context_length": config.max_seq_len,
        "rope": {
            "theta": config.rope_theta,
            "scaling": config.rope_scaling.kind if config.rope_scaling else None,
        },
        "dim": config.dim,
        "layers": config.n_layers,
        "heads": config.n_heads,
        "kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "ffn_dim": config.ffn_dim,
        "tied_embeddings": config.tie_embeddings,
        "experts": (
            {
                "routed": config.n_experts,
                "per_token": config.n_experts_per_token,
                "expert_ffn_dim": config.expert_ffn_dim,
                "shared_expert_ffn_dim": config.shared_expert_ffn_dim,
            }
            if config.is_moe
            else None
        ),
        "tensors": len(headers),
        "layer_0_shapes": layer0,
        "has_tokenizer": (path / "tokenizer.json").is_file(),
    }


def _quantized_parameters(name: str, shape: list[int], tied: bool) -> int:
    """The parameters a tensor of a `wren quantize` checkpoint stands for: two per int4 byte, none
    for scales and zeros, none for the output layer's own copy of a tied embedding."""
    layer, _, leaf = name.rpartition(".")
    if tied and layer == "lm_head":
        return 0
    return _numel(shape) * {"weight_int4": 2, "scale": 0, "zero": 0}.get(leaf, 1)


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def format_info(info: dict[str, Any]) -> str:
    rows = [
        ("architecture", info["architecture"]),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.2f}M)"),
        ("non-embedding", f"{info['non_embedding_parameters']:,}"),
        ("dtype", info["dtype"]),
        *([("quantization", info["quantization"])] if info.get("quantization") else []),
        ("vocab", f"{info['vocab_size']:,}"),
        ("context length", f"{info['context_length']:,}"),
        (
            "rope",
            f"theta {info['rope']['theta']:g}"
            + (f", {info['rope']['scaling']}" if info["rope"]["scaling"] else ""),
        ),
        (
            "shape",
            f"dim {info['dim']}, {info['layers']} layers, {info['heads']} q heads, "
            f"{info['kv_heads']} kv heads, head dim {info['head_dim']}, ffn {info['ffn_dim']}",
        ),
        ("tied embeddings", "yes" if info["tied_embeddings"] else "no"),
    ]
    if info["experts"]:
        e = info["experts"]
        rows.append(
            (
                "experts",
                f"{e['routed']} routed (top-{e['per_token']}, ffn {e['expert_ffn_dim']}), "
                f"shared ffn {e['shared_expert_ffn_dim']}",
            )
        )
    rows.append(("tokenizer", "included" if info["has_tokenizer"] else "none"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("layer 0 tensors:")
    lines += [f"  {name:<40} {'x'.join(map(str, shape))}" for name, shape in info["layer_0_shapes"].items()]
    return "\n".join(lines)
