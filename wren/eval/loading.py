"""Opening a checkpoint for scoring, and the token a scored text starts after.

Perplexity and multiple choice read logits from Wren's own model code (any Llama-, Mistral-, Qwen2-
or Qwen2-MoE-shaped checkpoint); other architectures are lm-evaluation-harness's job.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wren.model import CausalLM
from wren.tokenizer import Tokenizer


def pick_device(name: str | None = None) -> torch.device:
    """`name` as given; None or "auto": the GPU when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_scoring(
    path: str | Path,
    device: str | None = None,
    dtype: str = "auto",
    allow_pickle: bool = False,
    adapter: str | Path | None = None,
) -> tuple[CausalLM, Tokenizer]:
    """The model (eval mode) and its tokenizer. dtype "auto" keeps the stored dtype, except that
    float16 runs as float32 on a CPU, whose float16 kernels are slow. `adapter`, a PEFT LoRA
    directory, is merged into the weights. A checkpoint written by `wren quantize` loads quantised."""
    from wren.checkpoint import load_model
    from wren.infer.load import native_dtype

    target = pick_device(device)
    torch_dtype = native_dtype(path, dtype, target)
    model = load_model(
        path, device=target, dtype=torch_dtype, allow_pickle=allow_pickle, adapter=adapter, quantized=True
    )
    return model, Tokenizer.load(path)


def document_prefix(tokenizer: Tokenizer) -> list[int]:
    """The ids a scored text is placed after, so that its first token is predicted too.

    The tokens the tokenizer itself puts before a text (Llama's `<s>`) when it has any; otherwise
    the end-of-text token, which precedes every document in Wren's packed pretraining.
    """
    from wren.data.chat import end_of_text_id

    plain = tokenizer.encode("x")
    full = tokenizer.encode("x", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start] or [end_of_text_id(tokenizer)]
    return [end_of_text_id(tokenizer)]
