"""Model hyperparameters and the named presets.

`ModelConfig` is Wren's own description of a decoder-only transformer. It holds exactly what the
model code needs; translating it to and from a Hugging Face `config.json` happens in
`wren.checkpoint`, so this floor stays free of file formats.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def swiglu_hidden_size(dim: int, multiple_of: int = 64) -> int:
    """SwiGLU width with the parameter count of a 4*dim GELU MLP, rounded up (MiniMind's rule)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class RopeScaling:
    """Rotary position scaling for running past the trained context length.

    kind: "linear" (position interpolation), "yarn" (NTK-by-parts with attention temperature),
    "dynamic" (NTK-aware base rescaling, fixed at `factor`), or "llama3" (Llama 3.1's
    wavelength-banded interpolation). `original_max_position_embeddings` is the trained length.
    """

    kind: str
    factor: float
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int | None = None  # None: swiglu_hidden_size(dim)
    max_seq_len: int = 2048
    rope_theta: float = 1e6
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before rotary (Qwen3)
    sliding_window: int | None = None
    # Mixture of experts: 0 routed experts means a dense model.
    n_experts: int = 0
    n_experts_per_token: int = 2
    expert_ffn_dim: int | None = None  # None: ffn_dim
    shared_expert_ffn_dim: int | None = None  # None: one shared expert of expert_ffn_dim; 0: none
    norm_topk_prob: bool = True
    moe_layer_step: int = 1  # every k-th layer is MoE (Qwen2-MoE's decoder_sparse_step)
    dense_layers: list[int] = field(default_factory=list)  # layers forced dense (mlp_only_layers)
    aux_loss_coef: float = 0.01
    # Token ids the checkpoint writer records; the model itself never reads them.
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = swiglu_hidden_size(self.dim)
        if self.expert_ffn_dim is None:
            self.expert_ffn_dim = self.ffn_dim
        if self.shared_expert_ffn_dim is None:
            self.shared_expert_ffn_dim = self.expert_ffn_dim if self.n_experts else 0
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_experts and not 0 < self.n_experts_per_token <= self.n_experts:
            raise ValueError(
                f"n_experts_per_token must be in 1..{self.n_experts}, got {self.n_experts_per_token}"
            )

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer not in self.dense_layers and (layer + 1) % self.moe_layer_step == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU quickstart and tests.
    "micro": dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512),
    # MiniMind2-Small's shape, ~26M parameters.
    "small": dict(vocab_size=6400, dim=512, n_layers=8, n_heads=8, n_kv_heads=2),
    # MiniMind2's shape, ~104M parameters.
    "base": dict(vocab_size=6400, dim=768, n_layers=16, n_heads=8, n_kv_heads=2),
    # MiniMind2-MoE's shape: one shared and four routed experts, top-2, ~145M parameters. Q/K/V
    # carry biases because Qwen2-MoE (the format it exports as) always has them.
    "moe": dict(
        vocab_size=6400,
        dim=640,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        n_experts=4,
        n_experts_per_token=2,
        qkv_bias=True,
    ),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with any field overridden (e.g. vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise KeyError(name)
    return ModelConfig(**{**PRESETS[name], **overrides})
