"""Inference: sampling, streaming text, the continuous-batching engine, and a one-prompt generator."""
