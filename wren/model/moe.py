"""Feed-forward blocks: the SwiGLU MLP and the mixture-of-experts layer built from it.

The MoE layer has Qwen2-MoE's shape: a softmax router choosing the top-k of the routed experts
per token, plus one always-on shared expert scaled by a learned sigmoid gate. (Several ungated
shared experts, as in MiniMind, are one wider shared expert; the converter folds them.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wren.model.config import ModelConfig
from wren.model.linear import Linear
from wren.model.quant import apply_linears


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = apply_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """The routed experts' SwiGLU weights stacked along a leading expert dimension."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (tokens, dim); expert_ids, weights: (tokens, k). Returns the weighted sum per token."""
        n_experts, k = self.gate_proj.shape[0], expert_ids.shape[1]
        flat_ids = expert_ids.flatten()
        # Group the (token, slot) assignments by expert so each expert runs one dense matmul.
        order = torch.argsort(flat_ids, stable=True)
        tokens = order // k
        counts = torch.bincount(flat_ids, minlength=n_experts).tolist()
        gathered = x[tokens]
        outputs = []
        for expert, chunk in enumerate(torch.split(gathered, counts)):
            if chunk.shape[0] == 0:
                continue
            hidden = F.silu(chunk @ self.gate_proj[expert].T) * (chunk @ self.up_proj[expert].T)
            outputs.append(hidden @ self.down_proj[expert].T)
        expert_out = torch.cat(outputs) * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, expert_out)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.n_experts_per_token
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.dim, config.n_experts, bias=False)
        self.experts = Experts(config.n_experts, config.dim, config.expert_ffn_dim)
        self.shared_expert = None
        if config.shared_expert_ffn_dim:
            self.shared_expert = SwiGLU(config.dim, config.shared_expert_ffn_dim)
            self.shared_expert_gate = nn.Linear(config.dim, 1, bias=False)
        # Tokens routed to each expert in the last forward pass, for logging expert load.
        self.register_buffer(
            "last_expert_load", torch.zeros(config.n_experts, dtype=torch.long), persistent=False
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (tokens, dim) -> router probabilities (tokens, E), chosen ids and weights (tokens, k)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, expert_ids, weights

    def load_balancing_loss(self, probs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer auxiliary loss: E * sum_e (share of assignments to e) * (mean prob of e).

        1.0 when routing is uniform; grows towards E/k as the router collapses onto few experts.
        """
        counts = torch.bincount(expert_ids.flatten(), minlength=self.n_experts)
        self.last_expert_load = counts.detach()
        assignment_share = counts.float() / expert_ids.numel()
        return self.n_experts * (assignment_share * probs.mean(dim=0)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, expert_ids, weights = self.route(flat)
        out = self.experts(flat, expert_ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(shape), self.load_balancing_loss(probs, expert_ids)
