"""The optimizer every objective trains with: AdamW, fused on CUDA."""

from __future__ import annotations

import torch

from wren.train.config import TrainConfig


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices and embeddings; leave norms and biases alone (nanoGPT's rule). Frozen
    # parameters (a LoRA base model) are not handed to the optimizer at all.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda"
    )
