"""Single-stream CPU decode speed: llama.cpp (GGUF f32, q8_0) against Wren's engine (f32, int8;
eager and with the decode step compiled), same model. Prints a Markdown table.

    python benchmarks/llamacpp.py                      # small preset, 32-token prompt, 64 new tokens
    python benchmarks/llamacpp.py --runs 5 --threads 2

Needs llama-cpp-python (`make llama-cpp`) and gguf. The model is a randomly initialised preset
(speed does not depend on the weights' values) with the demo tokenizer, saved as a checkpoint and
exported with `wren export gguf`. Each run decodes greedily past any end-of-sequence token; tokens/s
counts generated tokens over the whole request, prefill included, as in benchmarks/decode.py.
llama.cpp gets the same thread count as torch. The median of --runs runs is reported, with the
slowest and fastest, since the machine may be shared. The compiled engines build their kernels
during the warm-up run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from decode import demo_tokenizer, run

from wren.checkpoint import save_checkpoint
from wren.infer.engine import Engine
from wren.interop.gguf import export_gguf
from wren.model import CausalLM, preset_config
from wren.model.quant import quantize_int8


def gguf_llama(checkpoint: Path, file_type: str, threads: int, n_ctx: int):
    """llama-cpp-python's Llama over `checkpoint` exported with `wren export gguf` beside it."""
    import llama_cpp

    path = export_gguf(checkpoint, checkpoint.parent / f"model-{file_type}.gguf", file_type).path
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = demo_tokenizer(6400)
    torch.manual_seed(0)
    model = CausalLM(preset_config(args.preset, vocab_size=tokenizer.vocab_size)).eval()
    prompt = torch.randint(
        5, tokenizer.vocab_size, (32,), generator=torch.Generator().manual_seed(0)
    ).tolist()

    scratch = Path(tempfile.mkdtemp())
    save_checkpoint(model, scratch / "model", tokenizer)
    runners = {}
    int8_model = copy.deepcopy(model)
    quantize_int8(int8_model)
    for label, compile in (("Wren engine", False), ("Wren engine, compiled", True)):
        for weights, network in (("f32", model), ("int8", int8_model)):
            engine = Engine(network, tokenizer, max_batch_size=1, compile=compile)
            runners[label, weights] = lambda engine=engine: run(engine, 1, prompt, args.new_tokens)
    for file_type in ("f32", "q8_0"):
        llm = gguf_llama(scratch / "model", file_type, args.threads, n_ctx=256)
        runners["llama.cpp (llama-cpp-python)", file_type] = lambda llm=llm: llama_cpp_run(
            llm, prompt, args.new_tokens
        )

    speeds: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for runner in runners.values():  # warm up: allocations, caches, thread pools
        runner()
    for _ in range(args.runs):
        for key, runner in runners.items():  # interleaved, so background load hits all alike
            generated, seconds = runner()
            assert generated == args.new_tokens, (key, generated)
            speeds[key].append(generated / seconds)

    print(
        f"# single-stream decode: {args.preset} preset ({model.num_parameters() / 1e6:.1f}M parameters), "
        f"CPU, {args.threads} threads, greedy, 32-token prompt, {args.new_tokens} new tokens, "
        f"median of {args.runs} runs"
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
