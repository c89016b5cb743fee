"""Wren's one model format: a Hugging Face model directory.

    config.json               stock architecture (Llama / Qwen2 / Mistral / Qwen2-MoE / Qwen3 / Qwen3-MoE)
    model.safetensors         stock tensor names
    generation_config.json    eos / bos / pad ids
    tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
    trainer_state/            optional, written by the trainer for exact resume

transformers and vLLM load it with no custom code; Wren loads its own directories and any
Llama-, Mistral-, Qwen2-, Qwen2-MoE-, Qwen3- or Qwen3-MoE-shaped checkpoint written by someone else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from wren.atomic import atomic_directory
from wren.checkpoint.hf_config import UnsupportedConfig, config_from_hf, config_to_hf
from wren.checkpoint.weights import read_weights, stock_to_wren, wren_to_stock, write_safetensors
from wren.errors import WrenError
from wren.model import CausalLM, ModelConfig
from wren.model.rope import RotaryEmbedding

__all__ = ["init_checkpoint", "load_model", "read_model_config", "save_checkpoint"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_checkpoint(
    model: CausalLM,
    out_dir: str | Path,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` (and its tokenizer) as a Hugging Face directory, atomically.

    `write_extra(staging_dir)` may add files (the trainer's state) inside the same atomic write.
    """
    config = model.config
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the stock format stores a tied matrix once
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    stored_dtype = dtype or next(model.parameters()).dtype
    try:
        hf_config = config_to_hf(config, dtype=_dtype_name(stored_dtype))
    except UnsupportedConfig as exc:
        raise WrenError(f"cannot save to {out_dir}: {exc}") from exc
    generation = {
        key: value
        for key, value in (
            ("bos_token_id", config.bos_token_id),
            ("eos_token_id", config.eos_token_id),
            ("pad_token_id", config.pad_token_id),
        )
        if value is not None
    }
    with atomic_directory(out_dir) as staging:
        write_safetensors(wren_to_stock(state), staging / "model.safetensors")
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(staging)
        if write_extra is not None:
            write_extra(staging)
    return Path(out_dir)


def read_model_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory, from its config.json."""
    config_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise WrenError(f"{path}: not a directory; expected a model directory with config.json")
    try:
        hf = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise WrenError(f"{config_path}: no such file; expected a Hugging Face model directory") from None
    except ValueError as exc:
        raise WrenError(f"{config_path}: invalid JSON ({exc})") from exc
    try:
        return config_from_hf(hf)
    except UnsupportedConfig as exc:
        raise WrenError(f"{config_path}: {exc}") from exc
    except KeyError as exc:
        raise WrenError(f"{config_path}: missing field {exc.args[0]!r}") from exc


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype config.json declares (`torch_dtype`, or transformers 5's `dtype`), if any."""
    hf = json.loads((Path(path) / "config.json").read_text())
    return _DTYPES.get(hf.get("dtype") or hf.get("torch_dtype") or "")


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    adapter: str | Path | None = None,
    quantized: bool = False,
) -> CausalLM:
    """Load a checkpoint directory into Wren's model, in eval mode.

    dtype None keeps the dtype the weights are stored in. `adapter`, a PEFT LoRA adapter
    directory, is merged into the weights (see wren.checkpoint.adapter.apply_adapter).
    `quantized` accepts a checkpoint written by `wren quantize` (wren.checkpoint.quantized): its
    linear layers load as int8/int4 layers, for inference only. Without it such a checkpoint is
    refused, since whoever asked wants float weights to train, merge or export.
    """
    from wren.checkpoint.quantized import read_quantization, refuse_quantized

    path = Path(path)
    config = read_model_config(path)
    quantization = read_quantization(path)
    if quantization is not None and (not quantized or adapter is not None):
        refuse_quantized(path, "merging a LoRA adapter into it needs" if quantized else None)
    state = stock_to_wren(read_weights(path, allow_pickle=allow_pickle))
    tied = config.tie_embeddings and quantization is None  # a quantised output layer is its own copy
    if tied:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")

    # Build on the meta device (no memory, no random init), then adopt the loaded tensors.
    with torch.device("meta"):
        model = CausalLM(config)
        if quantization is not None:
            from wren.model.quant import quantize_linears

            quantize_linears(model, quantization.bits, quantization.group_size, cpu_kernels=False)
    # Quantised weights and scales keep their dtype, and are copied: safetensors hands out tensors
    # at any byte offset, and PyTorch's CPU int8 kernel crashes on weights not 16-byte aligned.
    buffers = dict(model.named_buffers())
    if dtype is None:
        floats = (
            t.dtype for k, t in state.items() if k not in buffers and t is not None and t.is_floating_point()
        )
        dtype = next(floats, torch.float32)
    state = {
        k: v.to(device=device, copy=True) if k in buffers else v.to(device=device, dtype=dtype)
        for k, v in state.items()
        if v is not None
    }
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WrenError(f"{path}: weights do not match config.json ({_first_line(exc)})") from exc
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialise_buffers(model, config, device)
    if quantization is not None:
        from wren.model.quant import pack_for_cpu

        pack_for_cpu(model)
    if adapter is not None:
        from wren.checkpoint.adapter import apply_adapter

        apply_adapter(model, adapter, merge=True, base=path)
    return model.eval()


def _materialise_buffers(model: CausalLM, config: ModelConfig, device: str | torch.device) -> None:
    """Re-create the non-persistent buffers the meta-device build left empty."""
    with torch.device(device):
        model.model.rotary_emb = RotaryEmbedding(config)
    for module in model.modules():
        if hasattr(module, "last_expert_load"):
            module.last_expert_load = torch.zeros(config.n_experts, dtype=torch.long, device=device)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3])


def init_checkpoint(
    preset: str,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> CausalLM:
    """A randomly initialised preset model sized to the tokenizer, saved with it as a checkpoint."""
    from wren.model.config import PRESETS, preset_config
    from wren.tokenizer import Tokenizer

    if preset not in PRESETS:
        raise WrenError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    tokenizer = Tokenizer.load(tokenizer_path)
    # The vocabulary is the tokenizer's, whatever size the preset suggests.
    values = dict(
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    values.update(overrides or {})
    try:
        config = preset_config(preset, **values)
    except (TypeError, ValueError) as exc:
        raise WrenError(f"invalid model settings for preset {preset!r}: {exc}") from exc
    torch.manual_seed(seed)
    model = CausalLM(config)
    save_checkpoint(model, out_dir, tokenizer=tokenizer)
    return model
