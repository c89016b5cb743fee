"""Decode throughput of the engine for 1, 16 and 64 concurrent streams. Prints a Markdown table.

    python benchmarks/decode.py --preset small --streams 1 16 64 --new-tokens 128
    python benchmarks/decode.py --device cpu --preset small --streams 1 16 --new-tokens 32
    python benchmarks/decode.py --backend transformers ...   # the engine over transformers' model
    python benchmarks/decode.py --backend hf-generate ...    # transformers' own generate(), the reference
    python benchmarks/decode.py --quantize int4 ...          # weight-only int8 / int4 (native backend)
    python benchmarks/decode.py --compile ...                 # torch.compile'd decode (default on CUDA)

--backend native (the default) is Wren's engine on its own model code.

A randomly initialised preset (decode speed does not depend on the weights' values) with a
tokenizer trained on the demo corpus. Each stream gets a 32-token prompt and greedy decoding;
tokens/s counts generated tokens over the whole run (prefill included), as a user sees it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from wren.data.demo import write_demo_pretrain
from wren.infer.engine import Engine
from wren.infer.sampling import SamplingParams
from wren.model import CausalLM, preset_config
from wren.model.quant import quantize_linears, weight_bytes
from wren.tokenizer import Tokenizer, train_tokenizer


def demo_tokenizer(vocab_size: int) -> Tokenizer:
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "demo.jsonl"
        write_demo_pretrain(corpus, max_bytes=1_000_000)
        return train_tokenizer([corpus], vocab_size=vocab_size)


def run(engine: Engine, streams: int, prompt: list[int], new_tokens: int) -> tuple[int, float]:
    # ignore_eos: every stream generates exactly new_tokens, whatever the random weights say.
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    results = engine.generate([prompt] * streams, params)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(r.completion_tokens for r in results), time.perf_counter() - start


def run_hf_generate(model, streams: int, prompt: list[int], new_tokens: int) -> tuple[int, float]:
    ids = torch.tensor([prompt] * streams, device=model.device)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return (out.shape[1] - len(prompt)) * streams, time.perf_counter() - start


def transformers_model(model: CausalLM, tokenizer: Tokenizer, scratch: Path):
    """The same weights loaded by transformers, from a checkpoint written to `scratch`."""
    from transformers import AutoModelForCausalLM

    from wren.checkpoint import save_checkpoint

    param = next(model.parameters())
    save_checkpoint(model, scratch / "model", tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(scratch / "model", dtype=param.dtype)
    return hf.to(param.device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: train one on the demo corpus)")
    parser.add_argument("--backend", choices=["native", "transformers", "hf-generate"], default="native")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="int8 / int4 weights (native backend)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="native backend: torch.compile the decode step (default: on CUDA only)",
    )
    parser.add_argument(
        "--slot-by-slot",
        action="store_true",
        help="transformers backend: one forward per stream per step (what models it cannot batch get)",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32}.get(
        args.dtype, getattr(torch, args.dtype, None)
    )
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else demo_tokenizer(6400)
    torch.manual_seed(0)
    model = CausalLM(preset_config(args.preset, vocab_size=tokenizer.vocab_size)).to(device, dtype).eval()
    prompt = torch.randint(
        5, tokenizer.vocab_size, (32,), generator=torch.Generator().manual_seed(0)
    ).tolist()

    scratch = tempfile.TemporaryDirectory()
    if args.backend != "native":
        model = transformers_model(model, tokenizer, Path(scratch.name))
    elif args.quantize:
        quantize_linears(model, bits=8 if args.quantize == "int8" else 4)

    print(
        f"# decode: {args.backend}{' ' + args.quantize if args.quantize else ''}"
        f"{' slot by slot' if args.slot_by_slot else ''}"
        f"{'' if args.compile is None else ' compiled' if args.compile else ' eager'}, "
        f"{args.preset}, {device} {dtype}, "
        f"{torch.get_num_threads()} threads, weights {weight_bytes(model) / 1e6:.1f} MB, "
        "greedy, 32-token prompts"
    )
    print("\n| streams | new tokens each | generated | seconds | tokens/s | ms per step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for streams in args.streams:
        if args.backend == "hf-generate":
            with torch.inference_mode():
                run_hf_generate(model, streams, prompt, 4)
                generated, seconds = run_hf_generate(model, streams, prompt, args.new_tokens)
        else:
            engine = Engine(model, tokenizer, max_batch_size=streams, compile=args.compile)
            if args.slot_by_slot:
                engine.runner.batch = None
            # Warm up allocations and kernels; a compiled step builds one graph per batch and
            # span bucket, so it warms up over the whole run's length.
            compiled = getattr(engine.runner, "compiled", None) is not None
            run(engine, streams, prompt, args.new_tokens if compiled else 4)
            generated, seconds = run(engine, streams, prompt, args.new_tokens)
        steps = generated / streams
        print(
            f"| {streams} | {args.new_tokens} | {generated:,} | {seconds:.2f} | {generated / seconds:,.0f} "
            f"| {1000 * seconds / max(steps, 1):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
