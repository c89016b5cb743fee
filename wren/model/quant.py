"""Weight-only int8 quantisation of the linear layers, for faster decoding on the CPU.

Decoding one token reads every weight once and does little arithmetic with it, so its speed is
the memory bandwidth divided by the model's size. Storing each linear weight as int8 with one
float scale per output row (symmetric, round to nearest) reads 4x less than float32. On the CPU
the product runs in PyTorch's int8-weight kernel (`_weight_int8pack_mm`) with bfloat16
activations; elsewhere the weight is dequantised for each call, which saves memory, not time.
Embeddings stay in float (a lookup reads one row); a tied output layer gets its own int8 copy,
since it is the largest matrix the decode step reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
            out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None]
            out = F.linear(x, weight)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` (the output layer included) with an Int8Linear, in
    place. Returns how many were replaced. For inference only: the result does not train."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module))
    return len(targets)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, counting a tied tensor once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
