"""Rotary position embeddings, with the scaling rules that stretch a model past its trained length.

Frequencies follow the published formulas so that a checkpoint configured for linear, dynamic-NTK,
YaRN or Llama-3 scaling produces the same angles here as in Hugging Face transformers. Angles are
computed from explicit positions on every forward pass rather than read from a table: it costs a
few hundred multiplies per token and puts no limit on how far positions may go. The exception is a
compiled CPU decode step, which reads a table (`build_table`): inductor fuses the rotation of the
query into the attention-score loop and would recompute its sines and cosines once per cached key.
"""

from __future__ import annotations

import math

import torch

from wren.model.config import ModelConfig, RopeScaling


def base_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def _yarn(head_dim: int, theta: float, scaling: RopeScaling, max_seq_len: int) -> tuple[torch.Tensor, float]:
    factor = scaling.factor
    trained_len = scaling.original_max_position_embeddings or max_seq_len
    extrapolated = base_inverse_frequencies(head_dim, theta)
    interpolated = extrapolated / factor

    # Dimensions that rotate more than beta_fast times over the trained length keep their
    # frequency; fewer than beta_slow times are fully interpolated; a linear ramp in between.
    def dimension_for_rotations(rotations: float) -> float:
        return head_dim * math.log(trained_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dimension_for_rotations(scaling.beta_fast)), 0)
    high = min(math.ceil(dimension_for_rotations(scaling.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp
    inv_freq = interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


def _llama3(head_dim: int, theta: float, scaling: RopeScaling, max_seq_len: int) -> torch.Tensor:
    inv_freq = base_inverse_frequencies(head_dim, theta)
    trained_len = scaling.original_max_position_embeddings or max_seq_len
    wavelength = 2 * math.pi / inv_freq
    long_wavelength = trained_len / scaling.low_freq_factor
    short_wavelength = trained_len / scaling.high_freq_factor
    # Long wavelengths are interpolated, short ones kept, the band between blended smoothly.
    scaled = torch.where(wavelength > long_wavelength, inv_freq / scaling.factor, inv_freq)
    blend = (trained_len / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - blend) * scaled / scaling.factor + blend * scaled
    in_band = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Turns positions into the (cos, sin) pair that `apply_rotary` multiplies into q and k."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling
        self.max_seq_len = config.max_seq_len
        self.attention_factor = 1.0
        kind = self.scaling.kind if self.scaling else "default"
        if kind in ("default", "dynamic"):
            inv_freq = base_inverse_frequencies(self.head_dim, self.theta)
        elif kind == "linear":
            inv_freq = base_inverse_frequencies(self.head_dim, self.theta) / self.scaling.factor
        elif kind == "yarn":
            inv_freq, self.attention_factor = _yarn(self.head_dim, self.theta, self.scaling, self.max_seq_len)
        elif kind == "llama3":
            inv_freq = _llama3(self.head_dim, self.theta, self.scaling, self.max_seq_len)
        else:
            raise ValueError(f"unsupported rope scaling {kind!r}; expected linear, dynamic, yarn or llama3")
        self.kind = kind
        # Not saved in checkpoints: it is a pure function of the config.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_table", None, persistent=False)
        self.register_buffer("sin_table", None, persistent=False)

    def build_table(self, length: int) -> None:
        """Precompute cos and sin for positions [0, length), which compiled code then reads (see
        the module docstring). Not for dynamic scaling, whose angles depend on the longest
        position seen."""
        if self.kind == "dynamic":
            return
        if self.cos_table is not None and len(self.cos_table) >= length:
            return  # kept: compiled code already reading it would otherwise recompile
        positions = torch.arange(length, device=self.inv_freq.device)[None]
        cos, sin = self.forward(positions, torch.float32)
        self.cos_table, self.sin_table = cos[0, 0], sin[0, 0]

    def _dynamic_inverse_frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        # Dynamic NTK: once a sequence runs past the trained length, raise the base so the lowest
        # frequency still spans it. Like transformers, the base depends on the longest position seen.
        trained_len = self.scaling.original_max_position_embeddings or self.max_seq_len
        seq_len = int(positions.max()) + 1
        if seq_len <= trained_len:
            return self.inv_freq
        factor = self.scaling.factor
        stretched = factor * seq_len / trained_len - (factor - 1)
        base = self.theta * stretched ** (self.head_dim / (self.head_dim - 2))
        return base_inverse_frequencies(self.head_dim, base).to(positions.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (batch, seq) integer tensor. Returns cos, sin of shape (batch, 1, seq, head_dim)."""
        if self.cos_table is not None and positions.is_cpu and torch.compiler.is_compiling():
            cos, sin = self.cos_table[positions][:, None], self.sin_table[positions][:, None]
            return cos.to(dtype), sin.to(dtype)
        inv_freq = self._dynamic_inverse_frequencies(positions) if self.kind == "dynamic" else self.inv_freq
        angles = positions[..., None].float() * inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2): the "rotate half" layout that Hugging Face Llama weights use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
