"""Wren: train a small chat language model from scratch, and run it or any Hugging Face model.

`import wren` needs only torch, tokenizers, safetensors and numpy; servers, web pages and other
integrations are imported by the commands that use them. The names below load on first use, so
`wren --help` starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CausalLM": "wren.model",
    "KVCache": "wren.model",
    "ModelConfig": "wren.model",
    "preset_config": "wren.model",
    "load_model": "wren.checkpoint",
    "save_checkpoint": "wren.checkpoint",
    "Tokenizer": "wren.tokenizer",
    "WrenError": "wren.errors",
}

__all__ = [
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "WrenError",
    "__version__",
    "load_model",
    "preset_config",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from wren.checkpoint import load_model, save_checkpoint
    from wren.errors import WrenError
    from wren.model import CausalLM, KVCache, ModelConfig, preset_config
    from wren.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wren' has no attribute {name!r}")
