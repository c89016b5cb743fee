"""Wren's own CPU kernels, compiled for the machine on first use (see wren.kernels.build).

One so far, in int8_linear.cpp: the int8 x int8 product of a few rows by an Int8Linear's weight
(`int8_linear`), and by several weights that share the rows (`int8_linears`: q, k and v; gate
and up). PyTorch's int8-weight kernel multiplies in bfloat16, converting every weight as it goes,
and oneDNN's int8 product has a fixed cost per call that a decode step's small products cannot
carry. This one quantises the rows to int8 and sums with the CPU's int8 dot-product
instructions, the work a decode step bound by streaming int8 weights wants.

It is built for Linux on x86-64 CPUs with AVX-512 VNNI or AVX2, given a C++ compiler (the one
torch.compile uses on the CPU). Elsewhere, or with WREN_CPU_KERNELS=0, `int8_linear_ready()` is
False and Int8Linear keeps PyTorch's kernels. WREN_CPU_KERNEL_MARCH picks another target than
`native` (the tests build the AVX2 path on AVX-512 machines with `x86-64-v3`).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from wren.kernels.build import BuildError, build_and_load, compiler, native_macros

INT8_LINEAR_SOURCE = Path(__file__).with_name("int8_linear.cpp")
_VNNI = {"__AVX512VNNI__", "__AVX512BW__"}

_int8_linear_ready: bool | None = None  # None: not tried in this process yet
_loading = threading.Lock()  # one thread builds and loads; another asking meanwhile waits


def int8_linear_ready() -> bool:
    """Whether `int8_linear` can run here; the first call builds or loads the kernel."""
    global _int8_linear_ready
    if _int8_linear_ready is None:
        with _loading:
            if _int8_linear_ready is None:
                _int8_linear_ready = _load_int8_linear()
    return _int8_linear_ready


def int8_linear_loaded() -> bool:
    """Whether `int8_linear` is loaded, without trying to load it (safe while compiling)."""
    return bool(_int8_linear_ready)


@contextmanager
def disabled() -> Iterator[None]:
    """PyTorch's kernels only, meanwhile: for comparisons (the benchmarks). Code compiled
    meanwhile keeps what it was compiled with."""
    global _int8_linear_ready
    before = _int8_linear_ready
    _int8_linear_ready = False
    try:
        yield
    finally:
        _int8_linear_ready = before


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (weight_int8 * scale[:, None]).T for 2-d float32 x, with x's rows quantised to int8:
    equal to wren.model.quant.int8_activation_products. Needs `int8_linear_ready()`."""
    return torch.ops.wren_cpu.int8_linear(x, weight_int8, scale)


def int8_linears(
    x: torch.Tensor, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """`int8_linear` of one x by several weights, in one call: x is quantised once, and the
    threads share out all the weights' rows."""
    return torch.ops.wren_cpu.int8_linears(x, list(weights), list(scales))


def _has_int8_dot_products(macros: set[str]) -> bool:
    """Whether int8_linear.cpp has a path for a target with these predefined macros."""
    return macros >= _VNNI or "__AVX2__" in macros


def _load_int8_linear() -> bool:
    if os.environ.get("WREN_CPU_KERNELS", "1") == "0":
        return False
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    march = os.environ.get("WREN_CPU_KERNEL_MARCH", "native")
    try:
        if not _has_int8_dot_products(native_macros(compiler(), march)):
            return False  # no int8 dot products to use: PyTorch's kernels are as good
        build_and_load(INT8_LINEAR_SOURCE, march)
    except (BuildError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(
            f"Wren's int8 CPU kernel is unavailable, int8 layers use PyTorch's kernels: {exc}", stacklevel=3
        )
        return False

    @torch.library.register_fake("wren_cpu::int8_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("wren_cpu::int8_linears")
    def _(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.new_empty(x.shape[0], weight.shape[0]) for weight in weights]

    return True
