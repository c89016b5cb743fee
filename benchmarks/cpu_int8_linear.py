"""Int8 linear layers on the CPU, by rows: PyTorch's weight-only kernel with bfloat16 activations
(`_weight_int8pack_mm`) against int8 activations times int8 weights, by oneDNN (`torch._int_mm`,
what wren.model.quant runs from INT8_ACTIVATION_MIN_MACS multiply-adds) and by Wren's own kernel
(wren.kernels, what it runs below that, where the kernel builds), with the float32 product
(oneDNN, as wren.model.linear runs it) for scale. Prints a Markdown table.

    python benchmarks/cpu_int8_linear.py                   # the small preset's shapes, 1 to 256 rows
    python benchmarks/cpu_int8_linear.py --rows 31 --threads 2

Each shape cycles through enough distinct weight matrices (64 MB of float32) that every product
reads its weight from memory, as a model's layers do; the routines alternate, round by round, and
medians are reported. The error columns compare each int8 route with the float32 product by the
same dequantised weight, so they show what rounding the activations costs (to bfloat16, or to
int8 with one scale per row), relative to the largest output; the activations are Gaussian.
Wren's kernel gives the same result as oneDNN's int8 product, bit for bit (tests/test_kernels.py).

With --checkpoint and --data it also scores a trained model's bits per byte on {"text"} JSONL
(as `wren eval ppl` does; every product there has many rows) in float32 and with int8 weights,
the activations rounded to bfloat16 or to int8:

    python benchmarks/cpu_int8_linear.py --rows 31 --checkpoint runs/sft/final --data held_out.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import wren.model.quant
from wren import kernels
from wren.checkpoint import load_model
from wren.eval.perplexity import evaluate_perplexity
from wren.model.linear import linear
from wren.model.quant import INT8_ACTIVATION_MIN_MACS, Int8Linear, int8_activation_products, quantize_int8
from wren.tokenizer import Tokenizer

# (output, input) features of the small preset's layers: q/o, k/v, gate/up, down.
SHAPES = [(512, 512), (128, 512), (1408, 512), (512, 1408)]


def bfloat16_activations(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), layer.weight_int8, layer.scale).float()


def int8_activations(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    return int8_activation_products(x, layer.weight_int8, layer.scale)


def wren_kernel(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    return kernels.int8_linear(x, layer.weight_int8, layer.scale)


def float32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return linear(x, weight)


def as_linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    return layer


def time_products(product, x: torch.Tensor, weights: list) -> float:
    start = time.perf_counter()
    for weight in weights:
        product(x, weight)
    return (time.perf_counter() - start) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 31, 64, 256])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--checkpoint", help="a trained model directory, to score with --data")
    parser.add_argument("--data", nargs="+", help='{"text"} JSONL to score the checkpoint on')
    parser.add_argument("--limit", type=int, default=200, help="documents scored")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"# int8 linear, forward, CPU, {args.threads} threads, median of {args.rounds} rounds")
    print(
        "\n| rows | out × in | float32 µs | int8 × bf16 µs | int8 × int8 (oneDNN) µs "
        "| int8 × int8 (Wren) µs | bf16 activations: max rel. diff | int8 activations: max rel. diff |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    ours = kernels.int8_linear_ready()
    for out_features, in_features in SHAPES:
        count = max(4, (64 << 20) // (4 * out_features * in_features))
        floats = [torch.randn(out_features, in_features) / in_features**0.5 for _ in range(count)]
        layers = [Int8Linear(as_linear(weight)) for weight in floats]
        routes = {
            "float32": (float32, floats),
            "bf16": (bfloat16_activations, layers),
            "int8": (int8_activations, layers),
        }
        if ours:
            routes["wren"] = (wren_kernel, layers)
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            times: dict[str, list[float]] = {name: [] for name in routes}
            with torch.inference_mode():
                for _ in range(args.rounds + 1):  # the first round warms up
                    for name, (product, weights) in routes.items():
                        times[name].append(time_products(product, x, weights))
                medians = {name: statistics.median(values[1:]) for name, values in times.items()}
                dequantised = layers[0].weight_int8.float() * layers[0].scale.float()[:, None]
                expected = linear(x, dequantised)
                errors = [
                    ((product(x, layers[0]) - expected).abs().max() / expected.abs().max()).item()
                    for product in (bfloat16_activations, int8_activations)
                ]
            wren_time = f"{medians['wren'] * 1e6:.0f}" if ours else "–"
            print(
                f"| {rows} | {out_features} × {in_features} | {medians['float32'] * 1e6:.0f} "
                f"| {medians['bf16'] * 1e6:.0f} | {medians['int8'] * 1e6:.0f} | {wren_time} "
                f"| {errors[0]:.1e} | {errors[1]:.1e} |"
            )
    if args.checkpoint:
        score(args.checkpoint, args.data, args.limit)


def score(checkpoint: str, data: list[str], limit: int) -> None:
    """Bits per byte of `checkpoint` on `data`: float32, int8 weights with each activation route."""
    tokenizer = Tokenizer.load(checkpoint)
    model = load_model(checkpoint).eval()
    print(f"\n# {checkpoint} on {' '.join(data)}, first {limit} documents")
    print("\n| weights | activations | bits per byte |")
    print("|---|---|---:|")
    result = evaluate_perplexity(model, tokenizer, data, limit=limit)
    print(f"| float32 | float32 | {result.bits_per_byte:.4f} |")
    quantize_int8(model)
    # The threshold picks the route for products of many rows: never (bf16 rows), or as shipped.
    routes = (("bfloat16", float("inf")), ("int8, one scale per row", INT8_ACTIVATION_MIN_MACS))
    for name, threshold in routes:
        wren.model.quant.INT8_ACTIVATION_MIN_MACS = threshold
        with kernels.disabled() if threshold == float("inf") else contextlib.nullcontext():
            result = evaluate_perplexity(model, tokenizer, data, limit=limit)
        print(f"| int8 | {name} | {result.bits_per_byte:.4f} |")
    wren.model.quant.INT8_ACTIVATION_MIN_MACS = INT8_ACTIVATION_MIN_MACS


if __name__ == "__main__":
    main()
