"""Wren's transformer, in PyTorch alone: nothing here imports any other part of Wren but
wren.kernels (our own CPU kernels, PyTorch only too)."""

from wren.model.config import PRESETS, ModelConfig, RopeScaling, preset_config
from wren.model.kv_cache import KVCache
from wren.model.transformer import CausalLM, ModelOutput

__all__ = ["PRESETS", "CausalLM", "KVCache", "ModelConfig", "ModelOutput", "RopeScaling", "preset_config"]
