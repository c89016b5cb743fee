"""The decoder-only transformer: Llama's block, with an optional mixture-of-experts MLP.

Module names follow Hugging Face's Llama / Qwen2-MoE layout (`model.layers.0.self_attn.q_proj`...),
so a dense model's state dict *is* the stock checkpoint and needs no renaming table.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wren.model.config import ModelConfig
from wren.model.kv_cache import KVCache
from wren.model.linear import Linear, is_compiling_for_cpu
from wren.model.moe import Experts, MoE, SwiGLU
from wren.model.quant import apply_linears
from wren.model.rope import RotaryEmbedding, apply_rotary


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (batch, seq, vocab)
    aux_loss: torch.Tensor  # MoE load-balancing loss, mean over MoE layers; 0 for dense models


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast, as the reference Llama does.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = Linear(config.dim, q_dim, bias=config.qkv_bias)
        self.k_proj = Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.v_proj = Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(q_dim, config.dim, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: CacheWrite | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = apply_linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.cache.update(self.layer, cache.positions, k, v, cache.span, cache.rows)
        if seq == 1 and mask is not None and is_compiling_for_cpu(x):
            out = one_query_attention(q, k, v, mask)
        else:
            # No mask means a fresh causal sequence: SDPA's is_causal path, the fused kernels' fastest.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of one query per row over cached keys, as plain reductions.

    q (batch, heads, 1, dim), k and v (batch, kv_heads, keys, dim), mask (batch, 1, 1, keys).
    For a decode step compiled on the CPU: inductor fuses these into a few loops that read the
    cache once (a row gather included), where SDPA's CPU kernel costs a fixed ~0.1 ms per call.
    """
    batch, heads, _, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    grouped = q.view(batch, kv_heads, heads // kv_heads, 1, dim)  # query heads sharing a kv head
    scores = (grouped * k[:, :, None]).sum(-1, dtype=torch.float32) * dim**-0.5
    scores = scores.masked_fill(~mask.view(batch, 1, 1, keys), float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    out = (weights[..., None] * v[:, :, None]).sum(-2)
    return out.view(batch, heads, 1, dim)


class CacheWrite(NamedTuple):
    """Where this forward pass writes into the KV cache, and how much of it attention reads."""

    cache: KVCache
    positions: torch.Tensor
    span: int
    rows: torch.Tensor | None = None  # the cache row of each batch row; None: rows 0..batch-1


def attention_mask(
    seq: int,
    positions: torch.Tensor | None,
    span: int | None,
    document_ids: torch.Tensor | None,
    sliding_window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """The (batch, 1, queries, keys) boolean mask for one forward pass, or None for plain causal.

    - packed documents (document_ids): causal within each document, nothing across documents;
    - with a cache (span): a query at position p sees cache slots 0..p;
    - explicit positions: a query at position p sees the tokens of this pass at positions <= p.
    """
    if document_ids is not None:
        index = torch.arange(seq, device=device)
        mask = (document_ids[:, :, None] == document_ids[:, None, :]) & (
            index[None, None, :] <= index[None, :, None]
        )
        if sliding_window and positions is not None:
            mask &= positions[:, None, :] > positions[:, :, None] - sliding_window
        return mask[:, None]
    if positions is None:
        if not sliding_window:
            return None
        positions = torch.arange(seq, device=device)[None]
    key_positions = positions if span is None else torch.arange(span, device=device)[None]
    q, k = positions[:, None, :, None], key_positions[:, None, None, :]
    mask = k <= q
    if sliding_window:
        mask &= k > q - sliding_window
    return mask


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MoE(config) if config.is_moe_layer(layer) else SwiGLU(config.dim, config.ffn_dim)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rotary, mask, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, aux_loss = self.mlp(h)
            return x + out, aux_loss
        return x + self.mlp(h), None


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """Token ids in, next-token logits out.

    `forward(ids)` is the training path (a causal pass from position 0). Pass `positions` to place
    tokens explicitly and `cache` to read and extend a KV cache: decoding one token at a time then
    yields the same logits as one full pass.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # Scale residual-branch outputs so the residual stream's variance does not grow with depth.
        residual_std = config.init_std / math.sqrt(2 * config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Experts):
            for weight in (module.gate_proj, module.up_proj, module.down_proj):
                nn.init.normal_(weight, mean=0.0, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
        cache_rows: torch.Tensor | None = None,
        cache_span: int | None = None,
        logits_to_keep: int | None = None,
    ) -> ModelOutput:
        """input_ids (batch, seq). positions (batch, seq) place tokens explicitly (needed with a
        cache). document_ids (batch, seq) mark packed documents that must not see each other; pass
        positions restarting at 0 for each document with them. cache_rows (batch,) picks the cache
        row each batch row reads and writes (default: rows 0..batch-1). cache_span fixes how many
        cache positions attention reads (default: up to the furthest position in `positions`); a
        fixed span keeps shapes static for compiled and graph-captured decoding. logits_to_keep
        limits the logits to the last N positions: 1 when only the next token matters, 0 for a pass
        that only fills the cache (the output layer is a large share of a small model's work)."""
        seq = input_ids.shape[1]
        if cache is not None and positions is None:
            raise ValueError("a KV cache needs explicit positions")
        if cache is not None and document_ids is not None:
            raise ValueError("document_ids are for packed training batches, not for a KV cache")
        if logits_to_keep is not None and not 0 <= logits_to_keep <= seq:
            raise ValueError(f"logits_to_keep must be in [0, {seq}], got {logits_to_keep}")
        cache_write = None
        if cache is not None:
            span = cache_span if cache_span is not None else int(positions.max()) + 1
            cache_write = CacheWrite(cache, positions, span, cache_rows)
        mask = attention_mask(
            seq,
            positions,
            cache_write.span if cache_write else None,
            document_ids,
            self.config.sliding_window,
            input_ids.device,
        )
        x = self.model.embed_tokens(input_ids)
        rotary_positions = (
            positions if positions is not None else torch.arange(seq, device=input_ids.device)[None]
        )
        rotary = self.model.rotary_emb(rotary_positions, x.dtype)
        aux_losses = []
        for layer in self.model.layers:
            x, aux_loss = layer(x, rotary, mask, cache_write)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        if logits_to_keep is not None:
            x = x[:, seq - logits_to_keep :]
        logits = self.lm_head(self.model.norm(x))
        aux = torch.stack(aux_losses).mean() if aux_losses else logits.new_zeros(())
        return ModelOutput(logits, aux)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied embeddings counted once)."""
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
        return total
