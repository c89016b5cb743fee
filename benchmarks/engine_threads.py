"""Decoding speed by the thread that runs the engine, on the CPU: where a web page's handlers or a
server's engine thread drive it from. Prints a Markdown table.

    python benchmarks/engine_threads.py                    # small preset, int8 and f32
    python benchmarks/engine_threads.py --requests 10 --quantize none

Each way runs in a process of its own (what a thread costs depends on which threads of the
process ran PyTorch before it):
- "main thread": the engine loaded and stepped on the main thread, as `wren chat` runs it;
- "SharedEngine, pool threads": loaded on the main thread, stepped by requests from a pool of
  worker threads through `SharedEngine`, as a page's handlers (or LangChain's `batch`) would;
- "EngineThread, pool threads": the same requests, the engine loaded and stepped on one thread of
  its own (`EngineThread`, what `wren web` uses).
Requests run one after another, single stream, greedy, 64 new tokens, after one untimed request;
the model is a randomly initialised preset with the demo tokenizer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WAYS = ["main thread", "SharedEngine, pool threads", "EngineThread, pool threads"]
PROMPT = "the cat sat on the mat and the dog ran over the hill"


def measure(model: str, way: str, quantize: str | None, requests: int) -> float:
    """Tokens per second of `requests` greedy requests run one after another, driven `way`."""
    from wren.infer.load import load_engine
    from wren.infer.sampling import SamplingParams
    from wren.infer.shared import EngineThread, SharedEngine

    params = SamplingParams(temperature=0.0, max_new_tokens=64, ignore_eos=True)

    def load():
        return load_engine(model, quantize=quantize)

    if way == "main thread":
        engine = load()
        ids = engine.tokenizer.encode(PROMPT)

        def complete():
            return engine.generate([ids], params)[0]

        complete()
        start = time.perf_counter()
        tokens = sum(len(complete().token_ids) for _ in range(requests))
        return tokens / (time.perf_counter() - start)
    shared = SharedEngine(load()) if way.startswith("SharedEngine") else EngineThread(load)
    ids = shared.engine.tokenizer.encode(PROMPT)
    with ThreadPoolExecutor(4) as pool:
        pool.submit(shared.complete, ids, params).result()
        start = time.perf_counter()
        results = [pool.submit(shared.complete, ids, params).result() for _ in range(requests)]
        tokens = sum(len(result.token_ids) for result in results)
        return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--quantize", nargs="+", default=["int8", "none"], help="int8, int4 or none")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # model, way, quantize
    args = parser.parse_args()
    if args.worker:
        model, way, quantize = args.worker
        print(measure(model, WAYS[int(way)], None if quantize == "none" else quantize, args.requests))
        return

    from serve import small_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        model = small_checkpoint(Path(scratch), args.preset)
        print(f"# {args.preset} (random weights), CPU, {args.requests} requests in turn, 64 new tokens each")
        print("\n| weights | engine driven from | tokens/s |")
        print("|---|---|---:|")
        for quantize in args.quantize:
            for index, way in enumerate(WAYS):
                command = [sys.executable, __file__, "--requests", str(args.requests)]
                command += ["--worker", str(model), str(index), quantize]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                rate = float(result.stdout.strip().splitlines()[-1])
                print(f"| {'f32' if quantize == 'none' else quantize} | {way} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
