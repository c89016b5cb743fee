"""How much of a packed SFT batch is padding, and how much is trained on. Prints a Markdown table.

    python benchmarks/sft_packing.py TOKENIZER_DIR FILE.jsonl [FILE.jsonl ...] --seq-len 512

Tokenises the files with Wren's SFT pipeline (into a temporary cache), packs one epoch exactly as
training does, and counts positions: padding (no conversation), context (system / user text and
headers: attended to, not trained on) and targets (assistant tokens).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from wren.data.batching import PackedSFTBatches
from wren.data.shards import prepare_datasets
from wren.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 512, 1024])
    args = parser.parse_args()
    tokenizer = Tokenizer.load(args.tokenizer)
    with tempfile.TemporaryDirectory() as cache:
        data = prepare_datasets(args.files, tokenizer, "sft", cache, skip_bad_lines=True, progress=False)
        print(
            f"{data.train.n_docs:,} conversations, {data.train.n_tokens:,} tokens, "
            f"{data.skipped} bad lines skipped"
        )
        print("\n| seq_len | rows | padding | context | targets | truncated conversations |")
        print("|---:|---:|---:|---:|---:|---:|")
        for seq_len in args.seq_len:
            batches = PackedSFTBatches(data.train, 1, seq_len)
            rows = batches._epoch_rows(0)
            used = sum(int(np.minimum(batches.lengths[row], seq_len).sum()) for row in rows)
            total = len(rows) * seq_len
            targets = sum(int(data.train.document_mask(i)[:seq_len][1:].sum()) for row in rows for i in row)
            print(
                f"| {seq_len} | {len(rows):,} | {1 - used / total:.2%} | {(used - targets) / total:.2%} "
                f"| {targets / total:.2%} | {batches.n_truncated:,} |"
            )


if __name__ == "__main__":
    main()
