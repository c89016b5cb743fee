"""Float32 linear layers on the CPU: F.linear (MKL's sgemm) against oneDNN's linear, which
wren.model.linear uses for float32 CPU products. Prints a Markdown table.

    python benchmarks/cpu_linear.py                        # the small preset's shapes, 1 to 256 rows
    python benchmarks/cpu_linear.py --rows 1 31 512 --threads 2
    python benchmarks/cpu_linear.py --backward --rows 2048   # training: forward and backward

Each shape cycles through enough distinct weight matrices (64 MB in all) that every product reads
its weight from memory, as a model's layers do; the two routines alternate, round by round, and
medians are reported. Both compute in float32; the last column is the largest difference between
their outputs relative to the largest output. With --backward each product is a training step's:
forward, then the gradients of the input and the weight (wren's through its OneDNNLinear).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from wren.model.linear import ONEDNN_LINEAR, linear

# (output, input) features of the small preset's layers: q/o, k/v, gate/up, down.
SHAPES = [(512, 512), (128, 512), (1408, 512), (512, 1408)]


def time_products(product, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for weight in weights:
        product(x, weight)
    return (time.perf_counter() - start) / len(weights)


def time_training(product, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for weight in weights:
        product(x, weight).sum().backward()
    return (time.perf_counter() - start) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 31, 64, 256])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--backward", action="store_true", help="time forward + backward (training)")
    args = parser.parse_args()
    if not ONEDNN_LINEAR:
        raise SystemExit("this PyTorch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    what = "forward + backward" if args.backward else "forward, no gradient"
    print(f"# float32 linear, {what}, CPU, {args.threads} threads, median of {args.rounds} rounds")
    print("\n| rows | out × in | F.linear (MKL) µs | GB/s | oneDNN µs | GB/s | speed-up | max rel. diff |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    timer = time_training if args.backward else time_products
    for out_features, in_features in SHAPES:
        count = max(4, (64 << 20) // (4 * out_features * in_features))
        weights = [torch.randn(out_features, in_features, requires_grad=args.backward) for _ in range(count)]
        for rows in args.rows:
            x = torch.randn(rows, in_features, requires_grad=args.backward)
            times: dict[str, list[float]] = {"mkl": [], "onednn": []}
            with torch.set_grad_enabled(args.backward):
                for _ in range(args.rounds + 1):  # the first round warms up
                    times["mkl"].append(timer(F.linear, x, weights))
                    times["onednn"].append(timer(linear, x, weights))
                mkl, onednn = (statistics.median(values[1:]) for values in times.values())
                expected = F.linear(x, weights[0]).detach()
                difference = (linear(x, weights[0]).detach() - expected).abs().max() / expected.abs().max()
            # The weight's bytes over the time; meaningless for training, a dash there.
            gigabytes = 4 * out_features * in_features / 1e9
            mkl_rate, onednn_rate = (
                "—" if args.backward else f"{gigabytes / seconds:.0f}" for seconds in (mkl, onednn)
            )
            print(
                f"| {rows} | {out_features} × {in_features} "
                f"| {mkl * 1e6:.0f} | {mkl_rate} "
                f"| {onednn * 1e6:.0f} | {onednn_rate} "
                f"| {mkl / onednn:.2f}× | {difference:.1e} |"
            )


if __name__ == "__main__":
    main()
