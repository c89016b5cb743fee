"""nn.Linear with two changes for the CPU: oneDNN for float32 products, and a reduction for
compiled decoding.

Float32 products on the CPU go to MKL's sgemm by default. On the AMD CPU we measured, MKL appears
to take a generic path, and oneDNN (in PyTorch's x86 builds too) runs the small preset's layers
1.4-2.2x faster from 1 row to 256 (benchmarks/cpu_linear.py; only the narrowest, 128 x 512, loses
~20% at a few rows, to a fixed cost per call), and training's forward and backward together
1.25-1.8x. So float32 CPU products go to oneDNN's linear when it is there, with a backward of our
own for training (oneDNN's op has none). Compiled inference calls it as an opaque custom op
(inductor lowers oneDNN's own op only for weights frozen into the graph); compiled training keeps
F.linear.

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


# PyTorch built without oneDNN (or a build that drops this private op) keeps F.linear.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_small_cpu_product(x):
            return row_products(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for float32 products on the CPU (see above)."""
    if not uses_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        out = OneDNNLinear.apply(rows, weight, bias)
    elif torch.compiler.is_compiling():
        out = compiled_onednn_linear(rows, weight, bias)
    else:
        out = onednn_linear(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def onednn_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows @ weight.T (+ bias) for 2-D float32 CPU tensors, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [None], "")


@torch.library.custom_op("wren::onednn_linear", mutates_args=())
def compiled_onednn_linear(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """onednn_linear as an opaque op for compiled code: inductor calls it as it is, where it would
    lower oneDNN's own op only for weights frozen into the graph. Eager calls skip the wrapper's
    dispatch cost and call onednn_linear."""
    return onednn_linear(rows, weight, bias)


@compiled_onednn_linear.register_fake
def _(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


class OneDNNLinear(torch.autograd.Function):
    """oneDNN's linear with a backward: its own op has none. Both gradients are products too."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        return onednn_linear(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_rows, need_weight, need_bias = ctx.needs_input_grad
        # grad @ weight, and grad.T @ rows, each written as a @ b.T for the op.
        grad_rows = onednn_linear(grad, weight.t().contiguous()) if need_rows else None
        grad_weight = onednn_linear(grad.t().contiguous(), rows.t().contiguous()) if need_weight else None
        grad_bias = grad.sum(0) if need_bias else None
        return grad_rows, grad_weight, grad_bias


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    compiling_for_training = torch.compiler.is_compiling() and torch.is_grad_enabled()
    return (
        ONEDNN_LINEAR
        # Our backward is not traced by the compiler; compiled training keeps F.linear.
        and not compiling_for_training
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        # Autocast would have run F.linear in bfloat16; subclasses (FSDP's DTensor) keep their own.
        and not torch.is_autocast_enabled("cpu")
        and type(x) is torch.Tensor
        and type(weight) in (torch.Tensor, nn.Parameter)
        and x.numel() > 0
    )


def is_compiling_for_cpu(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def is_small_cpu_product(x: torch.Tensor) -> bool:
    """True while compiling a product of a few rows on the CPU (see the module docstring)."""
    return is_compiling_for_cpu(x) and x.numel() <= REDUCTION_MAX_ROWS * x.shape[-1]


def row_products(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) as an elementwise product summed over the input dimension."""
    out = (x[..., None, :] * weight).sum(-1)
    return out if bias is None else out + bias
