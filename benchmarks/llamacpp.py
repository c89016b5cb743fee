"""Single-stream CPU decode speed: llama.cpp (GGUF f32, q8_0) against Wren's engine (f32, int8;
eager and with the decode step compiled), same model. Prints a Markdown table.

    python benchmarks/llamacpp.py                      # small preset, 32-token prompt, 64 new tokens
    python benchmarks/llamacpp.py --runs 11 --threads 2

Needs llama-cpp-python (`make llama-cpp`) and gguf. The model is a randomly initialised preset
(speed does not depend on the weights' values) with the demo tokenizer, saved as a checkpoint and
exported with `wren export gguf`. Each run decodes greedily past any end-of-sequence token; tokens/s
counts generated tokens over the whole request, prefill included, as in benchmarks/decode.py.
llama.cpp gets the same thread count as torch. Where Wren's int8 CPU kernel builds
(wren.kernels), int8 runs both with it and on PyTorch's kernels alone.

Each runtime runs in its own worker process, as it would in use: in one process, one library's
threads (OpenMP's, ggml's) may still spin or hold the cores when the other starts. The parent
drives the workers in turn, one at a time with a pause between them and the order rotating from
round to round, so that the machine's drifting memory bandwidth hits all alike. The median of
--runs runs is reported, with the slowest and fastest. The compiled engines build their kernels
during the warm-up run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from decode import demo_tokenizer, run

from wren import kernels
from wren.checkpoint import load_model, save_checkpoint
from wren.infer.engine import Engine
from wren.interop.gguf import export_gguf
from wren.model import CausalLM, preset_config
from wren.model.quant import quantize_int8
from wren.tokenizer import Tokenizer

# int8 weights on PyTorch's kernels alone, for comparison, where Wren's own int8 kernel builds.
PYTORCH_INT8 = "int8, PyTorch's kernels"


def exported_gguf(checkpoint: Path, file_type: str) -> Path:
    """`checkpoint` as a GGUF file beside it, exported by `wren export gguf` unless already there."""
    path = checkpoint.parent / f"model-{file_type}.gguf"
    if not path.exists():
        export_gguf(checkpoint, path, file_type)
    return path


def gguf_llama(checkpoint: Path, file_type: str, threads: int, n_ctx: int):
    """llama-cpp-python's Llama over `checkpoint` exported with `wren export gguf` beside it."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(exported_gguf(checkpoint, file_type)),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def llama_cpp_run(llm, prompt: list[int], new_tokens: int) -> tuple[int, float]:
    llm.reset()  # no prompt reuse from the previous run
    start = time.perf_counter()
    generated = 0
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=False):
        generated += 1
        if generated == new_tokens:
            break
    return generated, time.perf_counter() - start


def make_runner(checkpoint: Path, runtime: str, weights: str, prompt: list[int], new_tokens: int):
    """A no-argument callable that generates once and returns (tokens, seconds)."""
    if runtime.startswith("llama.cpp"):
        llm = gguf_llama(checkpoint, weights, torch.get_num_threads(), n_ctx=256)
        return lambda: llama_cpp_run(llm, prompt, new_tokens)
    if weights == PYTORCH_INT8:
        os.environ["WREN_CPU_KERNELS"] = "0"  # read at the first int8 product of this worker
    model = load_model(checkpoint)
    if weights.startswith("int8"):
        quantize_int8(model)
    engine = Engine(model, Tokenizer.load(checkpoint), max_batch_size=1, compile=runtime.endswith("compiled"))
    return lambda: run(engine, 1, prompt, new_tokens)


def worker(connection, threads: int, *how) -> None:
    """Build one runner, warm it up, then run it each time the parent asks."""
    torch.set_num_threads(threads)
    runner = make_runner(*how)
    runner()
    connection.send("ready")
    while connection.recv() == "run":
        connection.send(runner())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pause", type=float, default=0.2, help="seconds idle before each run")
    args = parser.parse_args()

    tokenizer = demo_tokenizer(6400)
    torch.manual_seed(0)
    model = CausalLM(preset_config(args.preset, vocab_size=tokenizer.vocab_size)).eval()
    prompt = torch.randint(
        5, tokenizer.vocab_size, (32,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    checkpoint = Path(tempfile.mkdtemp()) / "model"
    save_checkpoint(model, checkpoint, tokenizer)
    for file_type in ("f32", "q8_0"):  # exported here, once, rather than by two workers at once
        exported_gguf(checkpoint, file_type)

    int8 = ["int8", PYTORCH_INT8] if kernels.int8_linear_ready() else ["int8"]
    keys = [
        (runtime, weights)
        for runtime in ("Wren engine", "Wren engine, compiled")
        for weights in ("f32", *int8)
    ] + [("llama.cpp (llama-cpp-python)", file_type) for file_type in ("f32", "q8_0")]
    spawn = multiprocessing.get_context("spawn")
    workers = {}
    for key in keys:
        ours, theirs = spawn.Pipe()
        how = (args.threads, checkpoint, *key, prompt, args.new_tokens)
        process = spawn.Process(target=worker, args=(theirs, *how), daemon=True)
        process.start()
        assert ours.recv() == "ready", key  # one at a time: compiling wants both cores
        workers[key] = ours

    speeds: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    for run_index in range(args.runs):
        # Each round starts with the next runtime, so none always follows the same neighbour.
        start = run_index % len(keys)
        for key in keys[start:] + keys[:start]:
            connection = workers[key]
            time.sleep(args.pause)  # the previous worker's spinning threads go to sleep
            connection.send("run")
            generated, seconds = connection.recv()
            assert generated == args.new_tokens, (key, generated)
            speeds[key].append(generated / seconds)
    for connection in workers.values():
        connection.send("stop")

    print(
        f"# single-stream decode: {args.preset} preset ({model.num_parameters() / 1e6:.1f}M parameters), "
        f"CPU, {args.threads} threads, greedy, 32-token prompt, {args.new_tokens} new tokens, "
        f"median of {args.runs} runs, each runtime in its own process"
    )
    print("\n| runtime | weights | tokens/s (median) | slowest | fastest | ms per token |")
    print("|---|---|---:|---:|---:|---:|")
    for (runtime, weights), values in speeds.items():
        median = statistics.median(values)
        print(
            f"| {runtime} | {weights} | {median:,.0f} | {min(values):,.0f} | {max(values):,.0f} "
            f"| {1000 / median:.1f} |"
        )


if __name__ == "__main__":
    main()
