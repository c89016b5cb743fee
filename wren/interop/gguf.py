"""Export a Wren checkpoint as one GGUF file that llama.cpp (and Ollama, LM Studio...) runs.

Needs the `gguf` package (`pip install 'wrenlm[gguf]'`), imported inside the functions that use it.

Architectures (llama.cpp's names):
- `llama`:    no attention biases, or biases on q/k/v *and* o. llama.cpp's LLAMA graph rotates
              adjacent pairs (Meta's original layout) while Hugging Face weights rotate halves, so
              the rows of q_proj / k_proj are permuted per head (see `interleave_rotary_rows`).
- `qwen2`:    biases on q/k/v only. Its graph rotates halves (NEOX style): no permutation.
- `qwen2moe`: a Qwen2-MoE model whose every layer is MoE, with a shared expert and
              norm_topk_prob off (llama.cpp's qwen2moe never renormalises the top-k weights).
- `qwen3`:    QK-norm (`attn_q_norm` / `attn_k_norm`), no attention biases; rotate-half rope as qwen2.
- `qwen3moe`: QK-norm and MoE in every layer, routed experts only, norm_topk_prob on (llama.cpp's
              qwen3moe always renormalises the top-k weights), no attention biases.

The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) vocabulary; `pre_tokenizer_type`
picks the llama.cpp pre-tokenizer whose regex is the one the tokenizer splits text with.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wren.atomic import use_default_mode
from wren.errors import WrenError
from wren.model.config import ModelConfig

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")

# Hugging Face's ByteLevel pre-tokenizer with use_regex=True splits on GPT-2's pattern; these are
# the Split patterns of tokenizers that run ByteLevel with use_regex=False behind their own regex.
# Each maps to the llama.cpp pre-tokenizer type (tokenizer.ggml.pre) whose regex is the same.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_SPLIT_PATTERNS = {
    GPT2_PATTERN: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
}

# Stock per-layer tensor names (after Wren stacks the experts) -> (gguf MODEL_TENSOR name, suffix).
_LAYER_TENSORS = {
    "input_layernorm.weight": ("ATTN_NORM", "weight"),
    "self_attn.q_proj.weight": ("ATTN_Q", "weight"),
    "self_attn.q_proj.bias": ("ATTN_Q", "bias"),
    "self_attn.k_proj.weight": ("ATTN_K", "weight"),
    "self_attn.k_proj.bias": ("ATTN_K", "bias"),
    "self_attn.v_proj.weight": ("ATTN_V", "weight"),
    "self_attn.v_proj.bias": ("ATTN_V", "bias"),
    "self_attn.o_proj.weight": ("ATTN_OUT", "weight"),
    "self_attn.o_proj.bias": ("ATTN_OUT", "bias"),
    "self_attn.q_norm.weight": ("ATTN_Q_NORM", "weight"),
    "self_attn.k_norm.weight": ("ATTN_K_NORM", "weight"),
    "post_attention_layernorm.weight": ("FFN_NORM", "weight"),
    "mlp.gate_proj.weight": ("FFN_GATE", "weight"),
    "mlp.up_proj.weight": ("FFN_UP", "weight"),
    "mlp.down_proj.weight": ("FFN_DOWN", "weight"),
    "mlp.gate.weight": ("FFN_GATE_INP", "weight"),
    "mlp.experts.gate_proj": ("FFN_GATE_EXP", "weight"),
    "mlp.experts.up_proj": ("FFN_UP_EXP", "weight"),
    "mlp.experts.down_proj": ("FFN_DOWN_EXP", "weight"),
    "mlp.shared_expert.gate_proj.weight": ("FFN_GATE_SHEXP", "weight"),
    "mlp.shared_expert.up_proj.weight": ("FFN_UP_SHEXP", "weight"),
    "mlp.shared_expert.down_proj.weight": ("FFN_DOWN_SHEXP", "weight"),
    "mlp.shared_expert_gate.weight": ("FFN_GATE_INP_SHEXP", "weight"),
}
_TOP_TENSORS = {
    "model.embed_tokens.weight": ("TOKEN_EMBD", "weight"),
    "model.norm.weight": ("OUTPUT_NORM", "weight"),
    "lm_head.weight": ("OUTPUT", "weight"),
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Routers and rotary factors stay f32 whatever the file type, as llama.cpp's converter keeps them.
_ALWAYS_F32 = ("FFN_GATE_INP", "ROPE_FREQS")
# q4_0 keeps the embedding / output matrix at q8_0: it is the most sensitive to quantisation.
_Q4_KEEP_Q8 = ("TOKEN_EMBD", "OUTPUT")


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    architecture: str  # llama.cpp's architecture name
    file_type: str
    tensors: int
    size_bytes: int


def llama_cpp_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture that computes exactly what Wren's model does, or a WrenError."""
    if config.sliding_window and config.sliding_window < config.max_seq_len:
        raise WrenError(
            f"sliding-window attention (window {config.sliding_window}) has no GGUF export: llama.cpp's "
            "llama architecture attends to the whole context"
        )
    if config.qk_norm:
        return _qwen3_architecture(config)
    if config.is_moe:
        dense = [i for i in range(config.n_layers) if not config.is_moe_layer(i)]
        problems = []
        if dense:
            problems.append(f"layers {dense} are dense (llama.cpp's qwen2moe makes every layer MoE)")
        if not config.shared_expert_ffn_dim:
            problems.append("it has no shared expert (qwen2moe needs one)")
        if config.norm_topk_prob:
            problems.append("norm_topk_prob is on (qwen2moe never renormalises the top-k weights)")
        if config.o_bias:
            problems.append("o_proj has a bias")
        if problems:
            raise WrenError("this MoE model has no llama.cpp equivalent: " + "; ".join(problems))
        arch = "qwen2moe"
    elif config.qkv_bias and not config.o_bias:
        arch = "qwen2"
    elif config.o_bias and not config.qkv_bias:
        raise WrenError("a bias on o_proj alone matches no llama.cpp architecture")
    else:
        arch = "llama"
    if arch != "llama" and config.n_heads * config.head_dim != config.dim:
        raise WrenError(
            f"llama.cpp's {arch} needs n_heads * head_dim == dim "
            f"({config.n_heads} * {config.head_dim} != {config.dim})"
        )
    return arch


def _qwen3_architecture(config: ModelConfig) -> str:
    """qwen3 or qwen3moe for a QK-norm model. Their graphs size q/k/v from head_dim, so unlike
    qwen2 they need no n_heads * head_dim == dim."""
    problems = []
    if config.qkv_bias or config.o_bias:
        problems.append("it has attention biases (llama.cpp's qwen3 and qwen3moe read none)")
    if config.is_moe:
        dense = [i for i in range(config.n_layers) if not config.is_moe_layer(i)]
        if dense:
            problems.append(f"layers {dense} are dense (llama.cpp's qwen3moe makes every layer MoE)")
        if config.shared_expert_ffn_dim:
            problems.append("it has a shared expert (qwen3moe has none)")
        if not config.norm_topk_prob:
            problems.append("norm_topk_prob is off (qwen3moe always renormalises the top-k weights)")
    if problems:
        raise WrenError("this QK-norm model has no llama.cpp equivalent: " + "; ".join(problems))
    return "qwen3moe" if config.is_moe else "qwen3"


def interleave_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of q_proj / k_proj (or their biases) from Hugging Face's rotate-half
    layout to Meta's interleaved one, head by head.

    Rotate-half pairs row i with row i + head_dim/2 of each head; llama.cpp's LLAMA rope pairs rows
    2i and 2i + 1. Viewing a head's rows as (2, head_dim/2) and transposing to (head_dim/2, 2)
    puts each pair side by side, the permutation llama.cpp's converter applies to Llama weights.
    """
    head_dim = weight.shape[0] // n_heads
    split = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def pre_tokenizer_type(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer type (tokenizer.ggml.pre) that splits text as this byte-level
    BPE tokenizer does. Wren's own tokenizers use ByteLevel(add_prefix_space=False) with its
    built-in GPT-2 regex, so they are "gpt-2"."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    patterns = []
    byte_level = None
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            byte_level = step
            if step.get("add_prefix_space"):
                raise WrenError("a ByteLevel pre-tokenizer with add_prefix_space has no llama.cpp equivalent")
            if step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        elif kind == "Split" and step.get("behavior") == "Isolated" and "Regex" in step.get("pattern", {}):
            patterns.append(step["pattern"]["Regex"])
        else:
            raise WrenError(f"pre-tokenizer {kind!r} is not one llama.cpp's byte-level BPE reproduces")
    if byte_level is None or len(patterns) != 1 or patterns[0] not in _SPLIT_PATTERNS:
        raise WrenError(
            "the tokenizer's pre-tokenizer is not one llama.cpp reproduces: expected byte-level BPE with "
            "the GPT-2, Qwen2 or Llama-3 split pattern"
        )
    return _SPLIT_PATTERNS[patterns[0]]


def export_gguf(
    model_dir: str | Path, out: str | Path, file_type: str = "f16", allow_pickle: bool = False
) -> GGUFExport:
    """Write the checkpoint in `model_dir` (weights, config and tokenizer) as a GGUF file, atomically.

    file_type: f32, f16, q8_0 or q4_0. Norms, biases and other 1-D tensors stay f32; a matrix
    whose rows do not split into 32-value blocks falls back to f16.
    """
    import gguf

    from wren.checkpoint import read_model_config
    from wren.checkpoint.quantized import refuse_quantized
    from wren.checkpoint.weights import read_weights, stock_to_wren
    from wren.tokenizer import Tokenizer

    if file_type not in GGUF_TYPES:
        raise WrenError(f"unknown GGUF type {file_type!r}; expected one of {', '.join(GGUF_TYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    config = read_model_config(model_dir)
    refuse_quantized(model_dir, "GGUF export needs")
    arch = llama_cpp_architecture(config)
    tokenizer = Tokenizer.load(model_dir)
    state = stock_to_wren(read_weights(model_dir, allow_pickle=allow_pickle))
    tensors = _gguf_tensors(config, arch, state)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _add_model_metadata(writer, config, model_dir.resolve().name, file_type)
            _add_tokenizer(writer, tokenizer, config.vocab_size)
            for name, (kind, array) in tensors.items():
                data, qtype = _encode_tensor(kind, array, file_type)
                writer.add_tensor(name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        use_default_mode(tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return GGUFExport(out, arch, file_type, len(tensors), out.stat().st_size)


def _gguf_tensors(
    config: ModelConfig, arch: str, state: dict[str, torch.Tensor]
) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor under its GGUF name: (its MODEL_TENSOR kind, float32 array in llama.cpp's layout)."""
    import gguf

    names = gguf.TENSOR_NAMES
    allowed = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]])

    def gguf_name(kind: str, suffix: str, layer: int | None = None) -> str:
        tensor = gguf.MODEL_TENSOR[kind]
        if tensor not in allowed:
            raise WrenError(f"llama.cpp's {arch} architecture has no {kind.lower()} tensor")
        return f"{names[tensor].format(bid=layer)}.{suffix}"

    out: dict[str, tuple[str, np.ndarray]] = {}
    for key, tensor in state.items():
        if config.tie_embeddings and key == "lm_head.weight":
            continue  # a tied model stores the matrix once, as token_embd
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if key in _TOP_TENSORS:
            kind, suffix = _TOP_TENSORS[key]
            out[gguf_name(kind, suffix)] = (kind, array)
            continue
        match = _LAYER_KEY.match(key)
        if match is None or match[2] not in _LAYER_TENSORS:
            raise WrenError(f"tensor {key!r} has no place in a GGUF {arch} model")
        layer, rest = int(match[1]), match[2]
        kind, suffix = _LAYER_TENSORS[rest]
        if arch == "llama" and kind in ("ATTN_Q", "ATTN_K"):
            heads = config.n_heads if kind == "ATTN_Q" else config.n_kv_heads
            array = interleave_rotary_rows(array, heads)
        if kind == "FFN_GATE_INP_SHEXP":
            array = array.reshape(-1)  # (1, dim) on disk; llama.cpp wants a vector of dim
        out[gguf_name(kind, suffix, layer)] = (kind, array)
    if arch == "qwen2moe" and config.tie_embeddings:
        # qwen2moe requires output.weight; llama and qwen2 reuse token_embd when it is absent.
        out[gguf_name("OUTPUT", "weight")] = ("OUTPUT", out[gguf_name("TOKEN_EMBD", "weight")][1])
    if config.rope_scaling is not None and config.rope_scaling.kind == "llama3":
        if arch != "llama":
            raise WrenError(f"Llama-3 rope scaling has no llama.cpp equivalent for {arch} models")
        out[gguf_name("ROPE_FREQS", "weight")] = ("ROPE_FREQS", _llama3_rope_factors(config))
    return out


def _llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """Llama-3 scaling as llama.cpp takes it: per-frequency divisors of the base frequencies."""
    from wren.model.rope import RotaryEmbedding, base_inverse_frequencies

    scaled = RotaryEmbedding(config).inv_freq
    base = base_inverse_frequencies(config.head_dim, config.rope_theta)
    return (base / scaled).to(torch.float32).numpy()


def _add_model_metadata(writer: Any, config: ModelConfig, name: str, file_type: str) -> None:
    import gguf

    writer.add_name(name)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_file_type(file_types[file_type])
    if file_type.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.is_moe:
        writer.add_expert_count(config.n_experts)
        writer.add_expert_used_count(config.n_experts_per_token)
        writer.add_expert_feed_forward_length(config.expert_ffn_dim)
        if config.shared_expert_ffn_dim:
            writer.add_expert_shared_feed_forward_length(config.shared_expert_ffn_dim)
    _add_rope_scaling(writer, config)


def _add_rope_scaling(writer: Any, config: ModelConfig) -> None:
    import gguf

    rope = config.rope_scaling
    if rope is None or rope.kind == "llama3":  # llama3: the rope_freqs tensor carries it
        return
    if rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    elif rope.kind == "yarn":
        if (rope.beta_fast, rope.beta_slow) != (32.0, 1.0):
            # llama.cpp reads no beta_fast / beta_slow for these architectures: it uses 32 / 1.
            raise WrenError("YaRN with beta_fast / beta_slow other than 32 / 1 has no llama.cpp equivalent")
        if rope.factor <= 1:
            raise WrenError(f"YaRN with factor {rope.factor} has no llama.cpp equivalent (needs > 1)")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope.factor)
        writer.add_rope_scaling_orig_ctx_len(rope.original_max_position_embeddings or config.max_seq_len)
        if rope.attention_factor is not None:
            # llama.cpp scales by 0.1 ln(factor) + 1 itself; the key multiplies on top of that.
            writer.add_rope_scaling_attn_factors(rope.attention_factor / (0.1 * math.log(rope.factor) + 1))
    else:
        raise WrenError(f"rope scaling {rope.kind!r} has no llama.cpp equivalent (linear, yarn, llama3 do)")


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """The vocabulary as llama.cpp's "gpt2" (byte-level BPE) tokenizer, plus ids and chat template."""
    import gguf

    data = json.loads(tokenizer.backend.to_str())
    if data.get("model", {}).get("type") != "BPE":
        raise WrenError("only byte-level BPE tokenizers export to GGUF (this one is not BPE)")
    # llama.cpp skips NFC (as its converter does for Qwen2): the same ids for text already in NFC.
    normalizer = data.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}):
        raise WrenError(f"tokenizer normalizer {normalizer.get('type')!r} has no llama.cpp equivalent")
    pre = pre_tokenizer_type(data)

    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise WrenError(f"the tokenizer has ids up to {max(vocab.values())}; the model only {vocab_size}")
    # Ids the model has but the tokenizer never produces (a padded vocabulary) are unused slots.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, token_id in vocab.items():
        tokens[token_id], types[token_id] = token, gguf.TokenType.NORMAL
    for token_id, added in tokenizer.backend.get_added_tokens_decoder().items():
        # Special tokens are control tokens (matched in text only when asked); others, like
        # <think>, are user-defined: always matched whole, and decoded as written.
        kind = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        tokens[token_id], types[token_id] = added.content, kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    unk_id = tokenizer.token_to_id(tokenizer.unk_token) if tokenizer.unk_token else None
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
        (unk_id, writer.add_unk_token_id),
    ):
        if token_id is not None:
            add(token_id)
    # Whatever the tokenizer's post-processor adds around a text (a BOS, an EOS), llama.cpp adds too.
    plain, wrapped = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=True)
    start = next((i for i in range(len(wrapped) - len(plain) + 1) if wrapped[i : i + len(plain)] == plain), 0)
    writer.add_add_bos_token(start > 0)
    writer.add_add_eos_token(len(wrapped) > start + len(plain))
    writer.add_chat_template(tokenizer.chat_template)


def _encode_tensor(kind: str, array: np.ndarray, file_type: str) -> tuple[np.ndarray, Any]:
    """The values (or quantised blocks) to store for one tensor, and their GGML type."""
    import gguf

    q = gguf.GGMLQuantizationType
    if file_type == "f32" or array.ndim == 1 or kind in _ALWAYS_F32:
        return array.astype(np.float32), q.F32
    target = {"f16": q.F16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[file_type]
    if target == q.Q4_0 and kind in _Q4_KEEP_Q8:
        target = q.Q8_0
    block = gguf.GGML_QUANT_SIZES[target][0]
    if target == q.F16 or array.shape[-1] % block:
        return array.astype(np.float16), q.F16
    return gguf.quants.quantize(array, target), target
