#!/usr/bin/env bash
# The H100 figures issues 3 and 5 ask for, in one call on the device machine (run from the repo root).
# Carry the corpora compressed (64 MiB per call): on this machine first run
#   mkdir -p bench-data && xz -T2 -9 -c ../shared/data/pretrain/gutenberg_en.jsonl > bench-data/gutenberg_en.jsonl.xz
#   xz -T2 -9 -c ../shared/data/pretrain/chinese_poetry.jsonl > bench-data/chinese_poetry.jsonl.xz
# then carry bench-data/. Logs and tables go to $OUT.
set -euo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT" bench-data
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python benchmarks/train_throughput.py --presets small base --seq-len 512 --batch-size 64 --steps 30 \
    2>&1 | tee "$OUT/throughput.md"
for f in bench-data/*.xz; do [ -f "${f%.xz}" ] || xz -dk -T0 "$f"; done
python benchmarks/pretrain_quality.py --preset small --tokens 1e9 --seq-len 512 --batch-size 64 \
    --data bench-data/gutenberg_en.jsonl bench-data/chinese_poetry.jsonl --work "$OUT/quality" \
    2>&1 | grep -v '^step' | tee "$OUT/quality.md"
for backend in native transformers hf-generate; do
    python benchmarks/decode.py --backend $backend --preset small --streams 1 16 64 --new-tokens 128 \
        2>&1 | tee -a "$OUT/decode.md"
done
