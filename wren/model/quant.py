"""Weight-only int8 and int4 linear layers, for faster decoding on the CPU and smaller models.

Decoding one token reads every weight once and does little arithmetic with it, so its speed is
the memory bandwidth divided by the model's size. Embeddings stay in float (a lookup reads one
row); a tied output layer gets its own quantised copy, since it is the largest matrix the decode
step reads.

- int8: one bfloat16 scale per output row, symmetric, round to nearest: w = q * scale.
- int4: groups of `group_size` consecutive input columns, asymmetric (min to max in 16 steps),
  one bfloat16 scale and zero per group: w = (q - 8) * scale + zero, q in 0..15. Two codes share
  a byte (even column in the low nibble). The output layer stays int8: at 4 bits it costs more
  quality than every other layer together (benchmarks/RESULTS.md). So do MoE routers, whose few
  rows weigh nothing but pick the experts.

On the CPU, int8 products take one of three routes, by rows (benchmarks/cpu_int8_linear.py):
- up to `WREN_KERNEL_MAX_ROWS` rows (decoding, a batch of streams): Wren's own kernel
  (wren.kernels), which quantises the rows to int8 too, one symmetric scale per row, and sums
  with the CPU's int8 dot-product instructions: 1.6-2.4x faster than PyTorch's int8-weight kernel.
  It is built for the machine on first use; where it cannot be, the next two routes take these
  rows. A compiled decode step's product of a row or two is inductor's reduction either way
  (wren.model.linear): fused with the ops around it, it is level with the kernel or faster;
- from `INT8_ACTIVATION_MIN_MACS` multiply-adds (a prompt): the same row quantisation, multiplied
  int8 by int8 in oneDNN (`torch._int_mm`), as llama.cpp multiplies q8_0 weights by rows it
  quantises to 8 bits; 1.2-3.7x faster than the bfloat16 kernel there;
- otherwise PyTorch's weight-only kernel (`_weight_int8pack_mm`) with bfloat16 activations,
  where the input size is a multiple of 16 (it gets others wrong); else oneDNN's int8 route.
Both int8-row routes give the same result, bit for bit. int4 runs in PyTorch's kernel
(`_weight_int4pack_mm_for_cpu`) with bfloat16 activations. Elsewhere than the CPU the weight is
dequantised for each call, which saves memory, not time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wren import kernels
from wren.model.linear import REDUCTION_MAX_ROWS, is_compiling_for_cpu, row_products

INT8_MAX = 127
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's CPU int4 kernel accepts
DEFAULT_GROUP_SIZE = 32
_CPU_INT4_ROWS = 16  # the CPU int4 kernel wants the output size in multiples of this
_INT8PACK_IN_MULTIPLE = 16  # and the CPU int8 one the input size
_ROUTERS = (".mlp.gate", ".mlp.shared_expert_gate")  # MoE routing layers: int8 even at 4 bits
# Rows up to which Wren's kernel multiplies (see above): beyond 16, oneDNN's int8 product gains on
# it, and from 31 rows of the small preset's larger layers it is faster.
WREN_KERNEL_MAX_ROWS = 16
# Size (rows x in x out) from which a larger CPU int8 product quantises its activations for
# oneDNN: the break-even against the bfloat16 kernel measured on the small preset's shapes
# (512 x 512 from 31 rows, 1408 x 512 from about 12). `torch._int_mm` has had a CPU kernel since
# PyTorch 2.3; we need 2.5.
INT8_ACTIVATION_MIN_MACS = 8_000_000


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
        if x.device.type != "cpu":
            weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None]
            out = F.linear(x, weight)
            return out if self.bias is None else out + self.bias
        return self.output(self._cpu_products(x), x)

    def output(self, products: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for input `x` from its products (rows, out_features), any float dtype:
        shaped as x, in x's dtype, with the bias."""
        out = products.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def _cpu_products(self, x: torch.Tensor) -> torch.Tensor:
        """x's rows times the weight, by the route for their number (see the module docstring)."""
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if _on_wren_kernel(rows):
            out = kernels.int8_linear(flat.float(), self.weight_int8, self.scale)
        elif rows <= REDUCTION_MAX_ROWS and is_compiling_for_cpu(x):
            # Compiled decoding: the int8-to-float conversion fuses into the reduction's loads,
            # so the weight streams from memory as one byte per entry (see wren.model.linear).
            out = row_products(flat, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        elif (
            rows * self.in_features * self.out_features >= INT8_ACTIVATION_MIN_MACS
            # PyTorch's bfloat16 kernel returns garbage, or crashes, for other input sizes (2.13)
            or self.in_features % _INT8PACK_IN_MULTIPLE
        ):
            out = int8_activation_products(flat, self.weight_int8, self.scale)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight_int8, self.scale)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def apply_linears(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """[layer(x) for layer in layers]; for int8 layers that Wren's kernel would run one by one,
    one call that quantises x once (q, k and v; gate and up): fewer calls per decode step, each
    of which costs microseconds."""
    if x.device.type == "cpu" and all(type(layer) is Int8Linear for layer in layers):
        flat = x.reshape(-1, x.shape[-1])
        if _on_wren_kernel(flat.shape[0]):
            outs = kernels.int8_linears(
                flat.float(), [layer.weight_int8 for layer in layers], [layer.scale for layer in layers]
            )
            return [layer.output(out, x) for out, layer in zip(outs, layers, strict=True)]
    return [layer(x) for layer in layers]


def _on_wren_kernel(rows: int) -> bool:
    """Whether a CPU int8 product of `rows` rows runs on Wren's kernel."""
    if rows > WREN_KERNEL_MAX_ROWS:
        return False
    if torch.compiler.is_compiling():
        # A compiled step's product of a row or two stays inductor's reduction: fused into the
        # kernels around it, it is level with a call out to ours or faster (RESULTS.md). Never
        # build while tracing: the runner loads the kernel first (load_cpu_kernels).
        return rows > REDUCTION_MAX_ROWS and kernels.int8_linear_loaded()
    return kernels.int8_linear_ready()


def load_cpu_kernels(model: nn.Module) -> bool:
    """Build or load Wren's int8 CPU kernel if `model` has int8 layers; whether it is there."""
    has_int8 = any(isinstance(module, Int8Linear) for module in model.modules())
    return has_int8 and kernels.int8_linear_ready()


def int8_activation_products(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (weight_int8 * scale[:, None]).T in float32 for 2-d x, with x quantised per row to int8
    (symmetric, round to nearest) and the product summed in int32."""
    x = x.float()
    row_scale = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
    rows = torch.round(x / row_scale).to(torch.int8)
    return torch._int_mm(rows, weight_int8.t()) * row_scale * scale.float()


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as 4-bit codes, one scale and zero per group of input columns.

    Its buffers `weight_int4`, `scale` and `zero` are the portable layout a checkpoint stores.
    `pack_for_cpu()` swaps them for the CPU kernel's own layout (`weight_int4pack`,
    `scales_and_zeros`, padded to whole blocks of rows), which depends on the machine and is
    never saved.
    """

    def __init__(self, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        super().__init__()
        in_features, out_features = linear.in_features, linear.out_features
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {group_size} is not one of {INT4_GROUP_SIZES}")
        if in_features % group_size:
            raise ValueError(f"{in_features} input features do not split into groups of {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        codes, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        self.register_buffer("weight_int4", codes[:, 0::2] | (codes[:, 1::2] << 4))
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.cpu_packed = False

    def codes(self) -> torch.Tensor:
        """The 4-bit codes as an (out, in) uint8 matrix."""
        packed = self.weight_int4
        return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the codes stand for."""
        groups = self.codes().reshape(self.out_features, -1, self.group_size).to(dtype) - 8
        weight = groups * self.scale.to(dtype)[..., None] + self.zero.to(dtype)[..., None]
        return weight.reshape(self.out_features, self.in_features)

    def pack_for_cpu(self) -> None:
        """Re-lay the weight for PyTorch's CPU int4 kernel (in place, once)."""
        if self.cpu_packed:
            return
        pad = -self.out_features % _CPU_INT4_ROWS  # zero rows, cut from the output again
        codes = F.pad(self.codes().to(torch.int32), (0, 0, 0, pad))
        scales_and_zeros = torch.stack([self.scale, self.zero], dim=-1)  # (out, groups, 2)
        scales_and_zeros = F.pad(scales_and_zeros, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous()
        del self.weight_int4, self.scale, self.zero
        self.register_buffer("weight_int4pack", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.cpu_packed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_packed:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.weight_int4pack, self.group_size, self.scales_and_zeros
            )
            out = out[:, : self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            out = F.linear(x, self.dequantize(x.dtype))
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{self.group_size}"


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (out, in), scale and zero bfloat16 (out, in // group_size)) for `weight`,
    with w ~ (codes - 8) * scale + zero in each group."""
    out_features = weight.shape[0]
    groups = weight.float().reshape(out_features, -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    # Round scale and zero to bfloat16 first, so the codes are chosen for the values stored.
    scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]) + 8
    return codes.clamp(0, 15).to(torch.uint8).reshape(weight.shape), scale, zero


def quantize_linears(
    model: nn.Module, bits: int = 8, group_size: int | None = None, cpu_kernels: bool = True
) -> int:
    """Replace every nn.Linear in `model` with an Int8Linear, or for `bits=4` an Int4Linear (groups
    of `group_size`, default DEFAULT_GROUP_SIZE; the output layer and MoE routers Int8Linear), in
    place. Returns how many were replaced. With
    `cpu_kernels`, int4 layers on the CPU are re-laid for its kernel (their state dict is then
    not the portable one). For inference only: the result does not train."""
    if bits not in (4, 8):
        raise ValueError(f"cannot quantise to {bits} bits; expected 8 or 4")
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        if bits == 8 or name == "lm_head" or name.endswith(_ROUTERS):
            replacement: nn.Module = Int8Linear(module)
        else:
            try:
                replacement = Int4Linear(module, group_size or DEFAULT_GROUP_SIZE)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            if cpu_kernels and module.weight.device.type == "cpu":
                replacement.pack_for_cpu()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
    return len(targets)


def pack_for_cpu(model: nn.Module) -> None:
    """Re-lay every int4 layer that sits on the CPU for its kernel (after loading its weights)."""
    for module in model.modules():
        if isinstance(module, Int4Linear) and not module.cpu_packed and module.weight_int4.is_cpu:
            module.pack_for_cpu()


def quantize_int8(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` (the output layer included) with an Int8Linear, in
    place. Returns how many were replaced. For inference only: the result does not train."""
    return quantize_linears(model, bits=8)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, counting a tied tensor once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
