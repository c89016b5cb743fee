"""Quantised checkpoints: `wren quantize` writes them, `load_model(..., quantized=True)` reads them.

A quantised checkpoint is a Wren checkpoint directory whose linear layers hold integer weights:

    config.json         the source's config.json plus
                        "quantization_config": {"quant_method": "wren", "format_version": 1,
                                                "bits": 4, "group_size": 32}  (no group_size: 8 bits)
    model.quantized.safetensors
                        float tensors (embeddings, norms, biases, MoE experts) under their stock
                        names, in the source's dtype; for each quantised linear layer P:
                          bits 8: P.weight_int8 int8 (out, in), P.scale bfloat16 (out,)
                                  w = weight_int8 * scale
                          bits 4: P.weight_int4 uint8 (out, in/2), two 4-bit codes q per byte
                                  (even input column in the low nibble), P.scale and P.zero
                                  bfloat16 (out, in/group_size); w = (q - 8) * scale + zero
                        Every nn.Linear is quantised; with bits 4 the output layer `lm_head` (a
                        tied one gets its own copy) and MoE routers to 8 bits (wren.model.quant).
    generation_config.json, tokenizer files ...   copied from the source as they are

It is not a Hugging Face checkpoint, and is made so that nothing mistakes it for one: the weights
file is not named model.safetensors, so transformers finds no weights (it would skip an unknown
quant_method with a warning and start the missing layers from random values); vLLM refuses the
unknown quant_method. Wren refuses it wherever float weights are needed (training, LoRA merge,
GGUF export, the transformers backend) with an error saying so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wren.atomic import atomic_directory, use_default_mode
from wren.errors import WrenError

QUANT_METHOD = "wren"
FORMAT_VERSION = 1
BITS = (8, 4)
# Files of the source that hold weights (rewritten) or describe them (no longer true): not copied.
_NOT_COPIED = ("config.json", "SHA256SUMS")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".index.json")


@dataclass(frozen=True)
class Quantization:
    """What a quantised checkpoint's config.json says about its weights."""

    bits: int
    group_size: int | None = None  # int4 only

    def describe(self) -> str:
        return "int8" if self.bits == 8 else f"int4, groups of {self.group_size}"

    def to_config(self) -> dict[str, Any]:
        block: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
        block["bits"] = self.bits
        if self.bits == 4:
            block["group_size"] = self.group_size
        return block


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    quantization: Quantization
    layers: int  # linear layers quantised
    bytes_before: int  # every tensor, a tied one once
    bytes_after: int


def read_quantization(path: str | Path) -> Quantization | None:
    """The quantisation a checkpoint directory's config.json records, or None for float weights.
    A quantisation other than Wren's own (GPTQ, AWQ, bitsandbytes ...) is an error: Wren's
    engine does not run it, transformers may."""
    config_path = Path(path) / "config.json"
    try:
        block = json.loads(config_path.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # read_model_config reports an unreadable config.json
    if block is None:
        return None
    method = block.get("quant_method") if isinstance(block, dict) else None
    if method != QUANT_METHOD:
        raise WrenError(
            f"{config_path}: weights quantised with {method!r}, which Wren's engine does not run; "
            "use --backend transformers"
        )
    bits, group_size = block.get("bits"), block.get("group_size")
    version = block.get("format_version")
    from wren.model.quant import INT4_GROUP_SIZES

    if version != FORMAT_VERSION or bits not in BITS or (bits == 4 and group_size not in INT4_GROUP_SIZES):
        raise WrenError(
            f"{config_path}: unreadable quantization_config {block}; expected format_version "
            f"{FORMAT_VERSION}, bits 8 or 4, and for 4 bits a group_size of {INT4_GROUP_SIZES}"
        )
    return Quantization(bits, group_size if bits == 4 else None)


def refuse_quantized(path: str | Path, needs: str | None = None) -> None:
    """Raise a WrenError when `path` is a quantised checkpoint. `needs` says what wanted float
    weights, e.g. "GGUF export needs"."""
    try:
        quantization = read_quantization(path) if Path(path).is_dir() else None
    except WrenError:  # another project's quantisation: its own reader decides
        return
    if quantization is not None:
        raise WrenError(
            f"{path}: a quantised Wren checkpoint ({quantization.describe()}, written by wren quantize), "
            "not a Hugging Face one; it runs in Wren's engine only (chat, generate, serve, eval), and "
            f"{needs or 'training, merging and exporting need'} the float checkpoint it was made from"
        )


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    bits: int,
    group_size: int | None = None,
    allow_pickle: bool = False,
) -> QuantizeResult:
    """Write `model_dir`'s model with int8 or int4 linear weights to `out_dir`, atomically, with
    its config (plus the quantisation), generation config and tokenizer files."""
    from wren.checkpoint import load_model
    from wren.checkpoint.weights import QUANTIZED_SAFETENSORS, wren_to_stock, write_safetensors
    from wren.model.quant import DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, quantize_linears, weight_bytes

    if bits not in BITS:
        raise WrenError(f"cannot quantise to {bits} bits; expected 8 or 4")
    if bits == 8 and group_size is not None:
        raise WrenError("--group-size is for 4 bits; int8 has one scale per output row")
    group_size = group_size or DEFAULT_GROUP_SIZE
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise WrenError(f"group size {group_size}: expected one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    quantization = Quantization(bits, group_size if bits == 4 else None)
    model_dir = Path(model_dir)
    if Path(out_dir).resolve() == model_dir.resolve():
        raise WrenError(
            f"{out_dir}: the output would replace the model it is made from; choose another --out"
        )
    refuse_quantized(model_dir, "wren quantize needs")
    model = load_model(model_dir, allow_pickle=allow_pickle)
    before = weight_bytes(model)
    try:
        layers = quantize_linears(model, bits, group_size, cpu_kernels=False)
    except ValueError as exc:
        raise WrenError(f"{model_dir}: cannot quantise to {quantization.describe()}: {exc}") from None
    hf_config = json.loads((model_dir / "config.json").read_text())
    hf_config["quantization_config"] = quantization.to_config()
    with atomic_directory(out_dir) as staging:
        write_safetensors(wren_to_stock(model.state_dict()), staging / QUANTIZED_SAFETENSORS)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for source in _copied_files(model_dir):
            shutil.copyfile(source, staging / source.name)
            use_default_mode(staging / source.name)
    return QuantizeResult(Path(out_dir), quantization, layers, before, weight_bytes(model))


def _copied_files(model_dir: Path) -> list[Path]:
    """The source's own files that stay true of the quantised model: tokenizer, generation
    config, model card ... not its weights, config.json (rewritten) or checksums."""
    return [
        path
        for path in sorted(model_dir.iterdir())
        if path.is_file() and path.name not in _NOT_COPIED and not path.name.endswith(_WEIGHT_SUFFIXES)
    ]
