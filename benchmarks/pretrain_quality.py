r"""Pretraining quality at a fixed token budget: validation bits per byte. Prints a Markdown table.

    # the issue's run: small preset, both licensed corpora, on one GPU
    python benchmarks/pretrain_quality.py --preset small --tokens 1e9 --seq-len 512 --batch-size 64
    # a CPU-sized check of the same pipeline
    python benchmarks/pretrain_quality.py --preset micro --tokens 2e6 --seq-len 256 --batch-size 16 \
        --max-mb 10

Trains a byte-level BPE tokenizer on the corpora (or uses --tokenizer), pretrains with
`wren train pretrain` in a subprocess (so the run is exactly what a user gets), and reads the last
validation loss and bits per byte from the run's metrics.jsonl. The validation split is Wren's
(1% of rows by row hash), so figures are comparable across tokenizers and runs. --max-mb takes
the first MB of each corpus (whole lines), for machines where the full corpora take too long.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tokenize_throughput import head  # the benchmarks folder is on sys.path when run as a script

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
DEFAULT_CORPORA = [SHARED / "gutenberg_en.jsonl", SHARED / "chinese_poetry.jsonl"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="+", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer directory (default: train one, 6400 tokens)"
    )
    parser.add_argument("--tokens", type=float, default=1e9, help="training token budget")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-mb", type=float, help="use only the first MB of each corpus")
    parser.add_argument("--work", type=Path, default=Path("bench-quality"), help="scratch directory")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `wren train` flags")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if args.max_mb:
        data = [head(path, args.work / f"head-{path.name}", args.max_mb) for path in data]
    tokenizer = args.tokenizer
    if tokenizer is None:
        from wren.tokenizer import train_tokenizer

        tokenizer = args.work / "tokenizer"
        train_tokenizer(data, vocab_size=6400).save(tokenizer)

    steps = max(int(args.tokens // (args.seq_len * args.batch_size)), 1)
    run = args.work / f"run-{args.preset}-{int(time.time())}"
    command = [
        sys.executable, "-m", "wren", "train", "pretrain", "--preset", args.preset,
        "--tokenizer", str(tokenizer),
        "--data", *map(str, data), "--out", str(run), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--max-steps", str(steps), "--lr", str(args.lr),
        "--warmup-steps", str(max(steps // 50, 1)), "--schedule", "wsd",
        "--eval-every", str(max(steps // 10, 1)), "--eval-batches", "50", "--save-every", str(steps),
        "--logger", "none", *args.extra,
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val/bpb" in r][-1]
    names = ", ".join(path.name for path in args.data)
    print("\n| preset | data | tokens | steps | seq x batch | val loss | val bpb | wall |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    print(
        f"| {args.preset} | {names}{f' (first {args.max_mb:g} MB each)' if args.max_mb else ''} "
        f"| {steps * args.seq_len * args.batch_size / 1e6:,.1f}M | {steps} "
        f"| {args.seq_len} x {args.batch_size} "
        f"| {last['val/loss']:.4f} | {last['val/bpb']:.4f} | {seconds / 60:.1f} min |"
    )


if __name__ == "__main__":
    main()
