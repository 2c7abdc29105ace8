#!/bin/sh
# Writes random-weight GGUFs with the shapes of Llama-3.2-1B and Llama-3.1-8B (Q8_0 and Q4_K) for
# the GPU benchmark (BENCH.md "GPU"): speed depends on shapes and types, not on weight values, so
# figures from these files must say "random weights, <model> shapes". Then runs
# `llm-bench --backend cuda` on each. Usage: bench/cuda_shapes.sh [OUTDIR] (default build/cuda/shapes).
# Needs `make cuda`; about 15 GB of disk for the four files.
set -eu
BUILD=${BUILD:-build/cuda}
OUT=${1:-$BUILD/shapes}
MK=$BUILD/tests/tools/mkgguf
mkdir -p "$OUT"
for t in q8_0 q4_k; do
    f="$OUT/llama-3.2-1b-shape-$t.gguf"
    [ -s "$f" ] || "$MK" -o "$f" --type "$t" --layers 16 --dim 2048 --heads 32 --kv-heads 8 \
        --ffn 8192 --ctx 131072 --vocab 128256 --tied --seed 1
    f="$OUT/llama-3.1-8b-shape-$t.gguf"
    [ -s "$f" ] || "$MK" -o "$f" --type "$t" --layers 32 --dim 4096 --heads 32 --kv-heads 8 \
        --ffn 14336 --ctx 131072 --vocab 128256 --untied --seed 1
done
mkdir -p bench/results
for f in "$OUT"/*.gguf; do
    echo "== $f (random weights)"
    "$BUILD/llm-bench" -m "$f" --backend cuda --pp 512 --tg 128 --reps 3 \
        --json bench/results/cuda.jsonl --label "$(git rev-parse --short HEAD) $(basename "$f")"
done
