#!/usr/bin/env bash
# The H100 figures issues 3, 5 and 6 ask for, in one call on the device machine (run from the repo
# root). Carry the corpora compressed (64 MiB per call) and the server's wheels: on this machine run
#   mkdir -p bench-data && xz -T2 -9 -c ../shared/data/pretrain/gutenberg_en.jsonl > bench-data/gutenberg_en.jsonl.xz
#   xz -T2 -9 -c ../shared/data/pretrain/chinese_poetry.jsonl > bench-data/chinese_poetry.jsonl.xz
#   ../shared/tools/gpu-wheels bench-data/wheels fastapi starlette uvicorn pydantic pydantic-core \
#       annotated-types typing-inspection typing-extensions httpx httpcore anyio sniffio h11 idna \
#       certifi click annotated-doc
# then carry bench-data/. Logs and tables go to $OUT. STAGES (default: all) picks some of
# throughput quality decode serve, e.g. STAGES="decode serve" bash benchmarks/h100.sh.
set -euo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT" bench-data
STAGES=${STAGES:-throughput quality decode serve}
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
if stage throughput; then
    python benchmarks/train_throughput.py --presets small base --seq-len 512 --batch-size 64 --steps 30 \
        2>&1 | tee "$OUT/throughput.md"
fi
if stage quality; then
    for f in bench-data/*.xz; do [ -f "${f%.xz}" ] || xz -dk -T0 "$f"; done
    python benchmarks/pretrain_quality.py --preset small --tokens 1e9 --seq-len 512 --batch-size 64 \
        --data bench-data/gutenberg_en.jsonl bench-data/chinese_poetry.jsonl --work "$OUT/quality" \
        2>&1 | grep -v '^step' | tee "$OUT/quality.md"
fi
if stage decode; then
    # The native engine compiles its decode step on CUDA (CUDA graphs); --no-compile is the eager row.
    for flags in "--backend native" "--backend native --no-compile" "--backend transformers" \
        "--backend hf-generate"; do
        python benchmarks/decode.py $flags --preset small --streams 1 16 64 --new-tokens 128 \
            2>&1 | tee -a "$OUT/decode.md"
    done
fi
if stage serve; then
    python -m pip install -q --no-index --no-deps --target /tmp/site bench-data/wheels/*.whl
    PYTHONPATH=$PWD:/tmp/site python benchmarks/serve.py --device cuda --clients 1 16 64 \
        --max-tokens 128 2>&1 | tee "$OUT/serve.md"
fi
