"""Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay, or constant."""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    *,
    max_lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        # Hold the peak, then decay linearly over the last `decay_fraction` of training.
        decay_steps = max(int(total_steps * decay_fraction), 1)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return max_lr
        progress = min((step - decay_start) / decay_steps, 1.0)
        return max_lr - (max_lr - min_lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")
