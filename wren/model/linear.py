"""nn.Linear with one change for compiled CPU decoding.

A decode step multiplies one row (or two) by each weight matrix, so its speed is how fast the
weights stream from memory. Inductor hands such a product to the BLAS matrix-vector routine, which
on the CPUs we measured reads about 8-10 GB/s of the ~40 GB/s the memory gives; written as a
multiply and a sum, inductor emits one vectorised reduction that reads the weight once at about
twice that speed (benchmarks/RESULTS.md). Eagerly the product-and-sum would materialise the whole
weight-sized product, so the rewrite applies only while compiling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows up to which a CPU product is written as a reduction; beyond it the BLAS matrix product
# reuses each weight for enough rows to be the faster of the two.
REDUCTION_MAX_ROWS = 2


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_small_cpu_product(x):
            return row_products(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def is_compiling_for_cpu(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def is_small_cpu_product(x: torch.Tensor) -> bool:
    """True while compiling a product of a few rows on the CPU (see the module docstring)."""
    return is_compiling_for_cpu(x) and x.numel() <= REDUCTION_MAX_ROWS * x.shape[-1]


def row_products(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) as an elementwise product summed over the input dimension."""
    out = (x[..., None, :] * weight).sum(-1)
    return out if bias is None else out + bias
