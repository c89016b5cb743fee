"""Inference: generation with a KV cache (the full engine arrives with the inference issue)."""
