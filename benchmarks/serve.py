"""Serving throughput and latency of `wren serve` for 1, 16 and 64 concurrent streaming clients,
batched and one request at a time. Prints a Markdown table.

    python benchmarks/serve.py --clients 1 16 64 --max-tokens 32
    python benchmarks/serve.py --model path/to/checkpoint --device cuda --max-tokens 128
    python benchmarks/serve.py --quantize int8 --compile    # passed on to wren serve

Without --model, a randomly initialised `small` preset (as `wren model init --preset small`) with
a tokenizer trained on the demo corpus: serving speed does not depend on the weights' values. Each
client streams /v1/completions requests one after another: the same ~32-token prompt, greedy,
exactly --max-tokens tokens each (ignore_eos). The batched server has as many slots as the most
clients; the baseline runs the same load with --max-batch-size 1 (the rest queue), and the last
column divides the batched server's tokens/s by the baseline's. Each level runs once untimed
first (one request per client), so that a compiled engine has built its kernels. TTFT runs from
sending a request to its first text; time per output token (TPOT) is the rest of the request over
the remaining tokens.
The clients run in this process and share the machine with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPT = (
    "The Python tutorial explains how to define functions, how to use lists and dictionaries, "
    "and how modules are imported"
)


@dataclass
class Timing:
    ttft: float
    tpot: float | None
    tokens: int


def small_checkpoint(directory: Path, preset: str) -> Path:
    from wren.checkpoint import init_checkpoint
    from wren.data.demo import write_demo_pretrain
    from wren.tokenizer import train_tokenizer

    corpus = directory / "demo.jsonl"
    write_demo_pretrain(corpus, max_bytes=1_000_000)
    train_tokenizer([corpus], vocab_size=6400).save(directory / "tokenizer")
    init_checkpoint(preset, directory / "tokenizer", directory / "model")
    return directory / "model"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`wren serve` in a subprocess, for the length of a `with` block."""

    def __init__(self, model: Path, batch_size: int, options: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "wren", "serve", str(model), "--port", str(self.port),
                   "--max-batch-size", str(batch_size), "--max-concurrency", "4096",
                   "--log-level", "warning", *options]  # fmt: skip
        self.process = subprocess.Popen(command)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"wren serve exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("wren serve did not start in 300 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def one_request(client: httpx.AsyncClient, url: str, max_tokens: int) -> Timing:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    if first is None or last is None:
        raise RuntimeError("a request streamed no text")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Timing(first - start, tpot, tokens)


async def load(url: str, clients: int, requests_each: int, max_tokens: int) -> tuple[list[Timing], float]:
    async def client_loop(client: httpx.AsyncClient) -> list[Timing]:
        return [await one_request(client, url, max_tokens) for _ in range(requests_each)]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return [t for timings in per_client for t in timings], seconds


def summarise(timings: list[Timing], seconds: float) -> dict[str, float]:
    ttfts = sorted(t.ttft for t in timings)
    tpots = [t.tpot for t in timings if t.tpot is not None]
    return {
        "requests": len(timings),
        "req_s": len(timings) / seconds,
        "tok_s": sum(t.tokens for t in timings) / seconds,
        "ttft_mean": 1000 * statistics.fmean(ttfts),
        "ttft_p90": 1000 * ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "tpot": 1000 * statistics.fmean(tpots) if tpots else float("nan"),
    }


def measure(model: Path, batch_size: int, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    results = {}
    options = ["--device", args.device] if args.device else []
    options += ["--quantize", args.quantize] if args.quantize else []
    options += ["--compile"] if args.compile else []
    with Server(model, batch_size, options) as server:
        for clients in args.clients:
            # Untimed first: a compiled server builds its kernels (and CUDA graphs) per batch size.
            asyncio.run(load(server.url, clients, 1, args.max_tokens))
            requests_each = max(1, args.min_requests // clients)
            timings, seconds = asyncio.run(load(server.url, clients, requests_each, args.max_tokens))
            results[clients] = summarise(timings, seconds)
            print(
                f"  {'batched' if batch_size > 1 else 'one at a time'}, {clients} clients: done",
                file=sys.stderr,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: a random `--preset` model)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    parser.add_argument(
        "--min-requests",
        type=int,
        default=8,
        help="requests per level at least (default 8); each client sends max(1, this / clients)",
    )
    parser.add_argument("--device", help="passed to wren serve (default: its own choice)")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="passed to wren serve")
    parser.add_argument(
        "--compile", action="store_true", help="passed to wren serve (default: its own choice)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = Path(args.model) if args.model else small_checkpoint(Path(scratch), args.preset)
        batched = measure(model, max(args.clients), args)
        alone = measure(model, 1, args)

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    served = args.model or f"{args.preset} (random weights)"
    served += "".join(f", {option}" for option in (args.quantize, args.compile and "compiled") if option)
    print(f"\n# serve: {served}, {args.max_tokens} tokens per request, greedy, ignore_eos, "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}")  # fmt: skip
    columns = (
        "server | clients | requests | req/s | output tok/s | TTFT mean ms | TTFT p90 ms | TPOT ms | gain"
    )
    print(f"\n| {columns} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, table in ((f"batched ({max(args.clients)} slots)", batched), ("one at a time", alone)):
        for clients, row in table.items():
            gain = f"{row['tok_s'] / alone[clients]['tok_s']:.1f}x" if table is batched else ""
            print(
                f"| {label} | {clients} | {row['requests']:.0f} | {row['req_s']:.2f} | {row['tok_s']:,.0f} "
                f"| {row['ttft_mean']:.0f} | {row['ttft_p90']:.0f} | {row['tpot']:.1f} | {gain} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
