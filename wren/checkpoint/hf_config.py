"""Translate between Wren's `ModelConfig` and a Hugging Face `config.json`.

Wren writes the stock architectures (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM and,
with QK-norm, Qwen3ForCausalLM for dense models; Qwen2MoeForCausalLM for mixture-of-experts, and
Qwen3MoeForCausalLM for mixture-of-experts with QK-norm) with the keys every transformers release
and vLLM understand (`rope_theta` and `rope_scaling`, not transformers 5's `rope_parameters`;
`num_experts`, not transformers 5's `num_local_experts`), and reads configs written by
transformers 4 or 5 for those same families.
"""

from __future__ import annotations

from typing import Any

from wren.model.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
_QK_NORM_TYPES = ("qwen3", "qwen3_moe")
_MOE_TYPES = ("qwen2_moe", "qwen3_moe")


class UnsupportedConfig(ValueError):
    """The config describes something Wren's model code cannot represent exactly."""


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    scaling = hf.get("rope_scaling") or params or {}
    theta = hf.get("rope_theta") or (params or {}).get("rope_theta") or 10000.0
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedConfig("partial rotary embeddings are not supported")
    if kind == "default":
        return float(theta), None
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise UnsupportedConfig(f"rope scaling {kind!r} is not supported (linear, dynamic, yarn, llama3 are)")
    rope = RopeScaling(
        kind=kind,
        factor=float(scaling["factor"]),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
        attention_factor=scaling.get("attention_factor"),
    )
    for key in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        if scaling.get(key) is not None:
            setattr(rope, key, float(scaling[key]))
    return float(theta), rope


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A Wren config for a Llama-, Mistral-, Qwen2-, Qwen2-MoE-, Qwen3- or Qwen3-MoE-shaped
    `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfig(
            f"model_type {model_type!r} is not one Wren's engine runs; expected one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfig(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise UnsupportedConfig("MLP biases are not supported")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
        raise UnsupportedConfig(f"{model_type}'s per-layer sliding window is not supported")

    theta, rope = _rope_from_hf(hf)
    n_heads = hf["num_attention_heads"]
    if model_type in ("qwen2", "qwen2_moe"):
        qkv_bias, o_bias = bool(hf.get("qkv_bias", True)), False
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    values: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=rope,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=model_type in _QK_NORM_TYPES,
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        init_std=hf.get("initializer_range", 0.02),
    )
    if model_type in _MOE_TYPES:
        values.update(
            # transformers 5 writes Qwen3-MoE's expert count as num_local_experts.
            n_experts=hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"],
            n_experts_per_token=hf["num_experts_per_tok"],
            expert_ffn_dim=hf["moe_intermediate_size"],
            # Qwen3-MoE has no shared expert.
            shared_expert_ffn_dim=hf["shared_expert_intermediate_size"] if model_type == "qwen2_moe" else 0,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            moe_layer_step=hf.get("decoder_sparse_step", 1),
            dense_layers=list(hf.get("mlp_only_layers") or []),
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        )
    return ModelConfig(**values)


def _rope_to_hf(rope: RopeScaling | None) -> dict[str, Any] | None:
    if rope is None:
        return None
    out: dict[str, Any] = {"rope_type": rope.kind, "factor": rope.factor}
    if rope.original_max_position_embeddings is not None:
        out["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.kind == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    if rope.kind == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    return out


def hf_architecture(config: ModelConfig) -> tuple[str, str]:
    """(architecture class, model_type) that represents this config exactly."""
    if config.qk_norm:
        if config.sliding_window or config.qkv_bias != config.o_bias:
            raise UnsupportedConfig(
                "a QK-norm model exports as Qwen3 or Qwen3-MoE: no sliding window, and biases on all "
                "of q/k/v/o or none"
            )
        if not config.is_moe:
            return "Qwen3ForCausalLM", "qwen3"
        if config.shared_expert_ffn_dim:
            raise UnsupportedConfig(
                "a QK-norm MoE model exports as Qwen3-MoE, which has no shared expert; this one has "
                f"a shared expert of width {config.shared_expert_ffn_dim} (no stock format has both)"
            )
        return "Qwen3MoeForCausalLM", "qwen3_moe"
    if config.is_moe:
        if config.o_bias or not config.shared_expert_ffn_dim:
            raise UnsupportedConfig(
                "a MoE model exports as Qwen2-MoE: it needs a shared expert and no o_proj bias"
            )
        return "Qwen2MoeForCausalLM", "qwen2_moe"
    if config.sliding_window:
        if config.qkv_bias or config.o_bias:
            raise UnsupportedConfig(
                "a sliding-window model exports as Mistral, which has no attention biases"
            )
        return "MistralForCausalLM", "mistral"
    if config.qkv_bias and not config.o_bias:
        return "Qwen2ForCausalLM", "qwen2"
    if config.o_bias and not config.qkv_bias:
        raise UnsupportedConfig("a bias on o_proj alone matches no stock architecture")
    return "LlamaForCausalLM", "llama"


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict for a Wren model."""
    architecture, model_type = hf_architecture(config)
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_to_hf(config.rope_scaling),
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if model_type == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=False)
    elif model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    elif model_type == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    elif model_type == "qwen3":
        hf.update(
            attention_bias=config.qkv_bias,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=config.n_layers,
        )
    elif model_type == "qwen2_moe":
        hf.update(
            shared_expert_intermediate_size=config.shared_expert_ffn_dim,
            qkv_bias=config.qkv_bias,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=config.n_layers,
        )
    else:  # qwen3_moe
        hf.update(attention_bias=config.qkv_bias, use_sliding_window=False, sliding_window=None)
    if model_type in _MOE_TYPES:
        hf.update(
            num_experts=config.n_experts,
            num_experts_per_tok=config.n_experts_per_token,
            moe_intermediate_size=config.expert_ffn_dim,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=config.moe_layer_step,
            mlp_only_layers=list(config.dense_layers),
            router_aux_loss_coef=config.aux_loss_coef,
            output_router_logits=False,
        )
    return hf
