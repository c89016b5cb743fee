"""One compiled CPU decode step, small preset: how close it comes to the memory bandwidth, and
what the weight layout and the rotary table each contribute. Prints a Markdown table.

    python benchmarks/cpu_decode_step.py                   # f32; contexts of 64 and 512 tokens
    python benchmarks/cpu_decode_step.py --quantize int8

A decode step of one stream reads every weight once, so its floor is the weights' bytes over the
memory bandwidth, measured here as the time to sum a tensor of that many bytes. Variants, each a
copy of the same randomly initialised model with its own cache and compiled step:
- "as loaded": each weight its own allocation, rotary angles computed inside the step, and
  dynamo checking every guard before each step (as in the next two);
- "packed": the weights in one huge-page block (wren.infer.weight_arena);
- "packed + rotary table, every guard checked": also reading the angles from a table
  (wren.model.rope);
- "packed + rotary table, guards skipped": the same, skipping the guards once a bucket has been
  checked;
- "packed + rotary table, replayed": calling inductor's compiled graph directly once a bucket has
  been recorded: the default (wren.infer.compiled).
With llama-cpp-python installed, llama.cpp's step on the same weights (GGUF f32 or q8_0, same
context) is timed too. A second table times one prefill of `--prefill` prompt tokens, as the
engine runs it (eager, filling the cache, no logits), and llama.cpp's. Variants are interleaved
and medians reported, since the machine may be shared and its bandwidth drifts.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch
from decode import demo_tokenizer
from llamacpp import gguf_llama

from wren.checkpoint import save_checkpoint
from wren.infer.compiled import CompiledDecode
from wren.infer.weight_arena import pack_weights
from wren.model import CausalLM, KVCache, preset_config
from wren.model.quant import quantize_int8, weight_bytes


def compiled_step(
    model: CausalLM,
    packed: bool,
    table: bool,
    max_len: int,
    quantize: str | None,
    skip_guards: bool = True,
    replay: bool = True,
) -> CompiledDecode:
    model = copy.deepcopy(model)
    if quantize:
        quantize_int8(model)
    if packed:
        pack_weights(model)
    step = CompiledDecode(model, KVCache(model.config, 1, max_len), skip_guards=skip_guards, replay=replay)
    if not table:
        model.model.rotary_emb.cos_table = model.model.rotary_emb.sin_table = None
    return step


def llama_cpp_step(model: CausalLM, file_type: str, max_len: int):
    """(seek, step) for llama.cpp: seek(n) leaves n tokens in its cache, step(p) feeds one token at
    position p; None without llama-cpp-python."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    scratch = Path(tempfile.mkdtemp())
    save_checkpoint(model, scratch / "model", demo_tokenizer(model.config.vocab_size))
    # Twice the context: llama.cpp may round it down.
    llm = gguf_llama(scratch / "model", file_type, torch.get_num_threads(), n_ctx=2 * max_len)

    def seek(context: int) -> None:
        # eval drops the cache from n_tokens on, and positions must follow on from the cache.
        llm.n_tokens = min(llm.n_tokens, context)
        if llm.n_tokens < context:
            llm.eval([5] * (context - llm.n_tokens))

    def step(position: int) -> None:
        llm.n_tokens = position
        llm.eval([7])

    return seek, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--steps", type=int, default=16, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=31, help="prompt tokens of the timed prefill")
    args = parser.parse_args()

    torch._dynamo.config.cache_size_limit = 64  # three compiled variants share one function
    torch.manual_seed(0)
    model = CausalLM(preset_config(args.preset)).eval()
    max_len = max(args.contexts) + args.steps + 1
    checked = dict(skip_guards=False, replay=False)
    variants = {
        "as loaded": compiled_step(model, False, False, max_len, args.quantize, **checked),
        "packed": compiled_step(model, True, False, max_len, args.quantize, **checked),
        "packed + rotary table, every guard checked": compiled_step(
            model, True, True, max_len, args.quantize, **checked
        ),
        "packed + rotary table, guards skipped": compiled_step(
            model, True, True, max_len, args.quantize, replay=False
        ),
        "packed + rotary table, replayed": compiled_step(model, True, True, max_len, args.quantize),
    }
    steps = {name: (lambda p, d=d: d([0], [5], [p])) for name, d in variants.items()}
    seeks = {name: lambda context: None for name in variants}  # the cache holds every position
    llama = llama_cpp_step(model, "q8_0" if args.quantize else "f32", max_len)
    if llama is not None:
        seeks["llama.cpp (same weights, GGUF)"], steps["llama.cpp (same weights, GGUF)"] = llama
    # Prefill as the engine runs it (eager, filling the cache, no logits), and llama.cpp's.
    prompt = torch.full((1, args.prefill), 5)
    wren_now = variants["packed + rotary table, replayed"]
    prefills = {
        "Wren (packed)": lambda: wren_now.model(
            prompt, positions=torch.arange(args.prefill)[None], cache=wren_now.cache, logits_to_keep=0
        )
    }
    if llama is not None:
        prefills["llama.cpp"] = lambda: (llama[0](0), llama[0](args.prefill))
    nbytes = weight_bytes(variants["as loaded"].model)
    stream = torch.zeros(nbytes // 4)
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for step in steps.values():  # compile, and fill every position of the caches
            for position in range(max_len - 1):
                step(position)
        for _ in range(args.rounds):
            for context in args.contexts:
                for name, step in steps.items():
                    seeks[name](context)
                    start = time.perf_counter()
                    for position in range(context, context + args.steps):
                        step(position)
                    times.setdefault((name, context), []).append((time.perf_counter() - start) / args.steps)
            for name, prefill in prefills.items():
                start = time.perf_counter()
                prefill()
                times.setdefault((f"prefill: {name}", args.prefill), []).append(time.perf_counter() - start)
            start = time.perf_counter()
            stream.sum()
            times.setdefault(("floor", 0), []).append(time.perf_counter() - start)

    floor = statistics.median(times.pop(("floor", 0)))
    weights = args.quantize or "f32"
    print(
        f"# one decode step, {args.preset} preset, {weights} weights ({nbytes / 1e6:.1f} MB), CPU, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds of {args.steps} steps"
    )
    bandwidth = nbytes / floor / 1e9
    print(f"# memory floor (summing {nbytes / 1e6:.1f} MB): {floor * 1e3:.2f} ms, {bandwidth:.1f} GB/s")
    print("\n| step | context | ms per step | x floor |")
    print("|---|---:|---:|---:|")
    for (name, context), values in times.items():
        median = statistics.median(values)
        if not name.startswith("prefill"):
            print(f"| {name} | {context} | {median * 1e3:.2f} | {median / floor:.2f} |")
    print("\n| prefill | prompt tokens | ms |")
    print("|---|---:|---:|")
    for (name, length), values in times.items():
        if name.startswith("prefill"):
            print(f"| {name.removeprefix('prefill: ')} | {length} | {statistics.median(values) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
