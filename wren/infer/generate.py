"""The simplest correct generator: one prompt, a KV cache, greedy or temperature sampling.

The quickstart uses it to show sample replies, and the engine's tests use it as the reference:
engine.py, the batching, streaming engine, must produce the same greedy tokens.
"""

from __future__ import annotations

import torch

from wren.model import CausalLM, KVCache


@torch.no_grad()
def generate_ids(
    model: CausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: list[int] | tuple[int, ...] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """New token ids after `prompt_ids`; stops at a stop id (excluded), after max_new_tokens, or
    when prompt plus output fill the model's context."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    max_len = min(len(prompt_ids) + max_new_tokens, model.config.max_seq_len)
    if len(prompt_ids) >= max_len:
        return []
    cache = KVCache(model.config, 1, max_len, device=device, dtype=next(model.parameters()).dtype)
    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    out: list[int] = []
    while True:
        logits = model(ids, positions=positions, cache=cache, logits_to_keep=1).logits[0, -1].float()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if token in stop_ids:
            break
        out.append(token)
        next_position = int(positions[0, -1]) + 1
        if len(out) >= max_new_tokens or next_position + 1 >= max_len:  # context full
            break
        ids = torch.tensor([[token]], device=device)
        positions = torch.tensor([[next_position]], device=device)
    return out
