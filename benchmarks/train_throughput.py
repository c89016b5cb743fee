"""Training throughput and MFU of Wren's training step, per preset. Prints a Markdown table.

    python benchmarks/train_throughput.py --presets small base --seq-len 512 --batch-size 64
    python benchmarks/train_throughput.py --device cpu --presets micro --batch-size 8 --steps 10

Measures what `wren train pretrain` runs each step (the same model, optimizer settings, bf16
autocast on CUDA, torch.compile, fused AdamW), on random tokens so no data loading is involved.
Every token is a real target (pretraining packs documents, nothing is padding), so tokens/s is
real tokens/s. MFU = (6 * N + 12 * layers * dim * seq_len) * tokens/s / peak, with N the
parameter count (tied embeddings once: the output projection is a real matmul, the input lookup
is free) and peak 989 TFLOP/s, the H100 SXM's dense bf16 figure.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
import torch.nn.functional as F

from wren.model import CausalLM, preset_config
from wren.train.config import TrainConfig
from wren.train.optim import make_optimizer

H100_BF16_PEAK = 989e12


def flops_per_token(model: CausalLM, seq_len: int) -> float:
    config = model.config
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    if config.is_moe:  # only the routed experts a token visits do work
        total = model.num_parameters()
        per_layer_experts = 3 * config.dim * config.expert_ffn_dim * config.n_experts
        active = total - config.n_layers * per_layer_experts * (
            1 - config.n_experts_per_token / config.n_experts
        )
        return 6 * active + attention
    return 6 * model.num_parameters() + attention


def measure(preset: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = CausalLM(preset_config(preset, max_seq_len=args.seq_len)).to(device)
    optimizer = make_optimizer(model, TrainConfig(lr=3e-4), device)
    step_model = torch.compile(model) if args.compile else model
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), device=device)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step() -> torch.Tensor:
        with autocast:
            logits, aux = step_model(inputs)
            loss = F.cross_entropy(logits.float().view(-1, vocab), targets.reshape(-1))
            loss = loss + model.config.aux_loss_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    float(loss.detach())  # waits for the GPU
    elapsed = time.perf_counter() - start
    tokens_per_second = args.steps * args.batch_size * args.seq_len / elapsed
    mfu = flops_per_token(model, args.seq_len) * tokens_per_second / H100_BF16_PEAK
    return {
        "preset": preset,
        "params": model.num_parameters(),
        "tokens_per_second": tokens_per_second,
        "ms_per_step": 1000 * elapsed / args.steps,
        "mfu": mfu if device.type == "cuda" else float("nan"),
        "memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["small", "base"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    where = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# train throughput: {where}, seq {args.seq_len}, batch {args.batch_size}, compile {args.compile}\n"
    )
    print("| preset | params | real tokens/s | ms/step | MFU | peak GPU GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        r = measure(preset, args)
        # MFU and GPU memory mean nothing on the CPU (NaN there): a dash.
        mfu = "—" if math.isnan(r["mfu"]) else f"{r['mfu']:.1%}"
        memory = "—" if math.isnan(r["memory_gb"]) else f"{r['memory_gb']:.1f}"
        print(
            f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_second']:,.0f} "
            f"| {r['ms_per_step']:.1f} | {mfu} | {memory} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
