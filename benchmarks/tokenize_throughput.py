"""How fast `prepare_datasets` tokenises: in-process (tokenizers' own threads) vs worker processes.

    python benchmarks/tokenize_throughput.py ../shared/data/pretrain/gutenberg_en.jsonl TOKENIZER_DIR --mb 20

Copies the first --mb megabytes of whole lines to a temporary file, prepares it once per setting
into a fresh cache, and prints a table. "read only" is the floor: reading, validating and
splitting the rows without tokenising them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wren.data.formats import iter_rows
from wren.data.split import is_validation
from wren.tokenizer import Tokenizer


def head(source: Path, target: Path, megabytes: float) -> None:
    limit = int(megabytes * 1e6)
    written = 0
    with source.open("rb") as reader, target.open("wb") as writer:
        for line in reader:
            if written + len(line) > limit:
                break
            writer.write(line)
            written += len(line)


def read_only(path: Path, kind: str) -> float:
    start = time.perf_counter()
    for row in iter_rows([path], kind):
        is_validation(row.raw, 0.01)
    return time.perf_counter() - start


def run_setting(path: Path, tokenizer_dir: str, kind: str, workers: int, threads: bool) -> str:
    # A fresh interpreter per setting: TOKENIZERS_PARALLELISM is read once per process.
    code = (
        "import sys, time, tempfile; from wren.tokenizer import Tokenizer; "
        "from wren.data.shards import prepare_datasets; "
        "tok = Tokenizer.load(sys.argv[1]); t = time.perf_counter(); "
        "p = prepare_datasets([sys.argv[2]], tok, sys.argv[3], tempfile.mkdtemp(), "
        "workers=int(sys.argv[4]), progress=False); "
        "print(time.perf_counter() - t, p.train.n_tokens + (p.val.n_tokens if p.val else 0))"
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if threads else "false"}
    args = [sys.executable, "-c", code, tokenizer_dir, str(path), kind, str(workers)]
    return subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("tokenizer")
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--kind", default="pretrain")
    parser.add_argument("--workers", type=int, nargs="*", default=[2, 4, 8])
    args = parser.parse_args()
    Tokenizer.load(args.tokenizer)  # fail early on a bad path
    with tempfile.TemporaryDirectory() as scratch:
        sample = Path(scratch) / "sample.jsonl"
        head(args.file, sample, args.mb)
        size = sample.stat().st_size / 1e6
        print(f"{args.file.name}: first {size:.1f} MB, {os.cpu_count()} CPUs")
        print(f"{'setting':<34} {'seconds':>8} {'MB/s':>7} {'M tokens/s':>11}")
        seconds = read_only(sample, args.kind)
        print(f"{'read only (no tokenising)':<34} {seconds:8.2f} {size / seconds:7.1f} {'':>11}")
        settings = [("in-process, 1 thread", 1, False), ("in-process, tokenizers threads", 1, True)]
        settings += [(f"{n} worker processes", n, False) for n in args.workers if n <= (os.cpu_count() or 1)]
        for name, workers, threads in settings:
            seconds_text, tokens_text = run_setting(
                sample, args.tokenizer, args.kind, workers, threads
            ).split()
            seconds, tokens = float(seconds_text), int(tokens_text)
            print(f"{name:<34} {seconds:8.2f} {size / seconds:7.1f} {tokens / seconds / 1e6:11.2f}")


if __name__ == "__main__":
    main()
