"""Wren's own CPU kernel (wren.kernels): built for this machine, equal bit for bit to the oneDNN
int8 product it stands in for, on either instruction set, and optional: without a compiler the
int8 layers keep PyTorch's kernels."""

import os
import platform
import subprocess
import sys

import pytest
import torch

from wren import kernels
from wren.kernels.build import compiler, native_macros
from wren.model.quant import (
    INT8_ACTIVATION_MIN_MACS,
    WREN_KERNEL_MAX_ROWS,
    Int8Linear,
    apply_linears,
    int8_activation_products,
)

# (rows, in, out): one stream, a batch, lengths that leave a tail after the vector loops, an out
# size that does not split evenly between the threads.
# (Not 1 input: oneDNN's int8 product, the reference, gets that wrong in PyTorch 2.13.)
SHAPES = [(1, 512, 512), (3, 512, 1408), (16, 1408, 512), (5, 100, 37), (4, 65, 9), (7, 1000, 12), (1, 2, 1)]
SHAPES += [(2, 200, 6400)]


@pytest.fixture(scope="module")
def kernel():
    if not kernels.int8_linear_ready():
        pytest.skip("Wren's int8 kernel does not build here (needs Linux, x86-64 with AVX2, a C++ compiler)")


def quantized(
    rows: int, in_features: int, out_features: int, seed: int = 0
) -> tuple[torch.Tensor, Int8Linear]:
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
    # Activations over five orders of magnitude, as a layer's inputs can be.
    x = torch.randn(rows, in_features, generator=generator) * torch.logspace(-3, 2, in_features)
    return x, Int8Linear(linear)


def test_the_kernel_equals_onednns_int8_product_bit_for_bit(kernel):
    for rows, in_features, out_features in SHAPES:
        x, layer = quantized(rows, in_features, out_features)
        x[0, : in_features // 2] = 0  # half a row of zeros
        if rows > 1:
            x[-1] = 0  # a whole row of zeros: zeros out, not NaN
        for scale in (layer.scale, layer.scale.float()):  # as stored (bfloat16), and float32
            expected = int8_activation_products(x, layer.weight_int8, scale)
            got = kernels.int8_linear(x, layer.weight_int8, scale)
            assert torch.equal(got, expected), (rows, in_features, out_features, scale.dtype)
        assert not got.isnan().any()
        # Not a copy of some other product: it is what the float weights give, to int8 precision.
        exact = x.double() @ (layer.weight_int8.double() * layer.scale.double()[:, None]).T
        assert ((got - exact).abs().max() / exact.abs().max()).item() < 0.03


def test_int8_layers_run_products_of_few_rows_on_the_kernel(kernel):
    x, layer = quantized(WREN_KERNEL_MAX_ROWS, 256, 200)
    with torch.no_grad():
        expected = int8_activation_products(x, layer.weight_int8, layer.scale) + layer.bias
        assert torch.equal(layer(x), expected)
        with kernels.disabled():  # PyTorch's int8-weight kernel: bfloat16 activations instead
            bf16 = layer(x)
        assert not torch.equal(bf16, expected)
        assert torch.equal(layer(x), expected)  # and back on the kernel after

        # One more row, still below oneDNN's threshold: PyTorch's int8-weight kernel.
        x, layer = quantized(WREN_KERNEL_MAX_ROWS + 1, 256, 200)
        assert (WREN_KERNEL_MAX_ROWS + 1) * 256 * 200 < INT8_ACTIVATION_MIN_MACS
        bf16 = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layer.weight_int8, layer.scale)
        assert torch.equal(layer(x), bf16.float() + layer.bias)


def test_layers_that_share_an_input_run_in_one_call_with_the_same_results(kernel):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)  # (batch, positions, features), as a model's layers see it
    layers = [Int8Linear(torch.nn.Linear(64, n, bias=n == 24)) for n in (32, 8, 24)]
    with torch.no_grad():
        one_by_one = [layer(x) for layer in layers]
        together = apply_linears(x, layers)
        assert all(torch.equal(a, b) for a, b in zip(together, one_by_one, strict=True))
        assert [t.shape for t in together] == [(2, 3, 32), (2, 3, 8), (2, 3, 24)]
        rows = x.reshape(-1, 64)
        outs = kernels.int8_linears(
            rows, [layer.weight_int8 for layer in layers], [layer.scale for layer in layers]
        )
        for out, layer in zip(outs, layers, strict=True):
            assert torch.equal(out, int8_activation_products(rows, layer.weight_int8, layer.scale))
        # Anything else goes layer by layer: a float layer among them, or too many rows.
        mixed = [layers[0], torch.nn.Linear(64, 8)]
        assert all(torch.equal(a, m(x)) for a, m in zip(apply_linears(x, mixed), mixed, strict=True))
        many = torch.randn(WREN_KERNEL_MAX_ROWS + 1, 64)
        assert all(torch.equal(a, m(many)) for a, m in zip(apply_linears(many, layers), layers, strict=True))


def test_the_kernel_rejects_what_it_cannot_multiply(kernel):
    x, layer = quantized(2, 64, 8)
    with pytest.raises(RuntimeError, match="x must be 2-d float32"):
        kernels.int8_linear(x.double(), layer.weight_int8, layer.scale)
    with pytest.raises(RuntimeError, match=r"weight must be int8 of shape \(n, 64\)"):
        kernels.int8_linear(x, layer.weight_int8[:, :32], layer.scale)
    with pytest.raises(RuntimeError, match=r"scale must have shape \(8,\)"):
        kernels.int8_linear(x, layer.weight_int8, layer.scale[:4])


CHECK = """
import sys, warnings
import torch
from wren import kernels
from wren.model.quant import Int8Linear, int8_activation_products
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ready = kernels.int8_linear_ready()
layer = Int8Linear(torch.nn.Linear(256, 48))
x = torch.randn(3, 256)
with torch.no_grad():
    got = layer(x)
    if ready:
        assert torch.equal(got, int8_activation_products(x, layer.weight_int8, layer.scale) + layer.bias)
    else:  # bfloat16 activations (whose kernel's rounding depends on where its inputs lie)
        bf16 = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layer.weight_int8, layer.scale).float()
        assert torch.allclose(got, bf16 + layer.bias, rtol=0.01, atol=0.01)
print("ready" if ready else "pytorch", *[str(w.message) for w in caught], sep="\\n")
"""


def run_check(tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WREN_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=environment, timeout=600
    )


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="x86-64 Linux only")
def test_the_avx2_path_builds_once_and_gives_the_same_products(tmp_path):
    """Built for x86-64-v3 (AVX2, no VNNI), as on CPUs without AVX-512: the other int8 path."""
    try:
        if "__AVX2__" not in native_macros(compiler(), "native"):
            pytest.skip("this CPU has no AVX2 to run the AVX2 build")
    except Exception as exc:  # no compiler: the fallback test covers this machine
        pytest.skip(f"no C++ compiler: {exc}")
    first = run_check(tmp_path, WREN_CPU_KERNEL_MARCH="x86-64-v3")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["ready"]
    assert "compiling int8_linear-" in first.stderr
    libraries = list((tmp_path / "cache" / "kernels").glob("int8_linear-*.so"))
    assert len(libraries) == 1
    second = run_check(tmp_path, WREN_CPU_KERNEL_MARCH="x86-64-v3")
    assert second.returncode == 0 and second.stdout.split() == ["ready"], second.stderr
    assert "compiling" not in second.stderr  # loaded from the cache
    assert list((tmp_path / "cache" / "kernels").iterdir()) == libraries  # no partial files left


def test_without_a_working_compiler_int8_layers_keep_pytorchs_kernels(tmp_path):
    result = run_check(tmp_path, CXX="false")  # a "compiler" that always fails
    if platform.machine() == "x86_64" and sys.platform == "linux":
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "pytorch"
        assert "int8 CPU kernel is unavailable" in lines[1] and "false -march=native failed" in lines[1]
    else:
        assert result.returncode == 0 and result.stdout.splitlines() == ["pytorch"], result.stderr


def test_the_kernels_can_be_switched_off(tmp_path):
    result = run_check(tmp_path, WREN_CPU_KERNELS="0")
    assert result.returncode == 0 and result.stdout.splitlines() == ["pytorch"], result.stderr
    assert not (tmp_path / "cache").exists()  # nothing was built
