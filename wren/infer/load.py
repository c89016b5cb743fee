"""Open a model for inference: pick the backend, the device and the dtype, and build the engine.

Every verb that generates (chat, generate, serve, web, the LangChain class) opens its model here,
so `--backend`, `--dtype`, `--device`, `--adapter` and `--trust-remote-code` mean the same
everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from wren.errors import WrenError
from wren.infer.engine import Engine

Backend = Literal["auto", "native", "transformers"]
BACKENDS = ("auto", "native", "transformers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
QUANTIZE = {"int8": 8, "int4": 4}  # load-time --quantize: bits


def parse_dtype(name: str) -> torch.dtype | None:
    """'auto' -> None (the checkpoint's own dtype); float32/bfloat16/float16 or fp32/bf16/fp16."""
    if name == "auto":
        return None
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in DTYPES:
        raise WrenError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    return DTYPES[canonical]


def native_dtype(model: str | Path, dtype: str, device: str | torch.device) -> torch.dtype | None:
    """The dtype to load a checkpoint in on Wren's model code: `dtype`, or for 'auto' the stored
    one (None), except that float16 runs as float32 on the CPU, whose float16 kernels are slow."""
    from wren.checkpoint import stored_dtype

    chosen = parse_dtype(dtype)
    if chosen is None and torch.device(device).type == "cpu" and stored_dtype(model) == torch.float16:
        return torch.float32
    return chosen


def choose_backend(
    model: str | Path, backend: Backend = "auto", trust_remote_code: bool = False
) -> Literal["native", "transformers"]:
    """`auto` runs Wren's own model code when it reads the checkpoint's config.json (Llama,
    Mistral, Qwen2, Qwen2-MoE, Qwen3; float or quantised by `wren quantize`), and transformers for
    anything else, hub ids and other quantisation formats included. One exception: a checkpoint
    that ships its own modeling code (`auto_map` in config.json), opened with
    `trust_remote_code`, goes to transformers, the only backend that runs that code; without the
    flag transformers would use its built-in class for the architecture, as Wren's code does."""
    if backend not in BACKENDS:
        raise WrenError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    from wren.checkpoint import read_model_config
    from wren.checkpoint.quantized import read_quantization

    try:
        read_model_config(model)
        read_quantization(model)
    except WrenError:
        return "transformers"
    if trust_remote_code and declares_own_model_code(model):
        return "transformers"
    return "native"


def declares_own_model_code(model: str | Path) -> bool:
    """Whether the checkpoint's config.json maps AutoModelForCausalLM to code it ships."""
    config = json.loads((Path(model) / "config.json").read_text())
    auto_map = config.get("auto_map")
    return isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map


def quantize_loaded(network: torch.nn.Module, model: str | Path, quantize: str | None) -> None:
    """Apply a load-time `quantize` ("int8" / "int4", or None) to the native model just loaded
    from `model`, in place."""
    from wren.checkpoint.quantized import read_quantization

    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise WrenError(f"unknown quantisation {quantize!r}; expected {' or '.join(QUANTIZE)}")
    stored = read_quantization(model)
    if stored is not None:
        raise WrenError(
            f"{model}: already quantised ({stored.describe()}, by wren quantize); drop --quantize"
        )
    from wren.model.quant import quantize_linears

    try:
        quantize_linears(network, bits=QUANTIZE[quantize])
    except ValueError as exc:
        raise WrenError(f"{model}: cannot quantise to {quantize}: {exc}") from None


def load_engine(
    model: str | Path,
    *,
    backend: Backend = "auto",
    dtype: str = "auto",
    device: str | None = None,
    adapter: str | Path | None = None,
    trust_remote_code: bool = False,
    max_batch_size: int = 16,
    max_seq_len: int | None = None,
    prefill_chunk: int = 512,
    quantize: str | None = None,
    compile: bool | None = None,
) -> Engine:
    """An `Engine` over the model at `model` (a directory, or a hub id for transformers).

    dtype 'auto' keeps the checkpoint's dtype, except that float16 runs as float32 on the CPU,
    whose float16 kernels are slow. Without a device the model goes to the GPU when there is one.
    `adapter` is a PEFT LoRA directory, merged into the weights at load. `quantize="int8"` or
    `"int4"` stores the native model's linear weights as integers (see wren.model.quant); a
    checkpoint written by `wren quantize` loads quantised without it. `compile` runs the native
    decode step under torch.compile (None: on CUDA only; see wren.infer.engine).
    """
    chosen = choose_backend(model, backend, trust_remote_code)
    if quantize not in (None, *QUANTIZE):
        raise WrenError(f"unknown quantisation {quantize!r}; expected {' or '.join(QUANTIZE)}")
    if quantize and chosen != "native":
        raise WrenError(
            f"--quantize {quantize} needs the native backend (a checkpoint Wren's model code runs)"
        )
    if chosen == "native":
        from wren.checkpoint import load_model
        from wren.tokenizer import Tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        network = load_model(
            model, device=device, dtype=native_dtype(model, dtype, device), adapter=adapter, quantized=True
        )
        quantize_loaded(network, model, quantize)
        tokenizer = Tokenizer.load(model)
    else:
        from wren.checkpoint.quantized import refuse_quantized
        from wren.infer.transformers_backend import load_transformers_model

        refuse_quantized(model, "the transformers backend needs")
        torch_dtype = parse_dtype(dtype)
        network, tokenizer = load_transformers_model(
            model, torch_dtype, device, trust_remote_code=trust_remote_code, adapter=adapter
        )
        if torch_dtype is None and network.device.type == "cpu" and network.dtype == torch.float16:
            network = network.float()
    return Engine(network, tokenizer, max_batch_size, max_seq_len, prefill_chunk, compile)
