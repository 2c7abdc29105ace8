#!/usr/bin/env bash
# make bench: engine benchmarks on the default model. Prints figures and ratios against the
# llama.cpp baselines quoted in ../shared/BENCH.md (measured on this kind of machine); never fails on
# time. Results are appended to bench/results/engine.jsonl.
# Env: BUILD (build), MODEL (models/default.gguf), THREADS (online CPUs), REPS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
MODEL=${MODEL:-models/default.gguf}
THREADS=${THREADS:-$(nproc)}
REPS=${REPS:-3}
mkdir -p bench/results
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
echo "== engine, single sequence ($THREADS threads, $cpu, commit $commit)"
out=$("$BUILD/llm-bench" -m "$MODEL" -t "$THREADS" --reps "$REPS" \
      --batched --json bench/results/engine.jsonl --label "$commit")
echo "$out"
pp=$(sed -n 's/^pp512: \([0-9.]*\) tok\/s.*/\1/p' <<<"$out")
tg=$(sed -n 's/^tg128: \([0-9.]*\) tok\/s.*/\1/p' <<<"$out")
b8=$(sed -n 's/^batched decode B=8: \([0-9.]*\) tok\/s.*/\1/p' <<<"$out")
b32=$(sed -n 's/^batched decode B=32: \([0-9.]*\) tok\/s.*/\1/p' <<<"$out")
# llama.cpp on a 2-core Zen 5 with 2 threads, from BENCH.md: pp512 469 tok/s, tg128 200 tok/s.
if [ -n "$pp" ] && [ -n "$tg" ]; then
    awk -v pp="$pp" -v tg="$tg" 'BEGIN {
        printf "ratio vs llama.cpp baseline (BENCH.md, 2 threads): pp512 %.2fx, tg128 %.2fx\n",
               pp / 469, tg / 200 }'
fi
# llama.cpp batched decode (engine, no HTTP, 128-token prompts) from BENCH.md: B=8 291, B=32 384.
if [ -n "$b8" ] && [ -n "$b32" ]; then
    awk -v b8="$b8" -v b32="$b32" 'BEGIN {
        printf "ratio vs llama.cpp baseline (BENCH.md): batched decode B=8 %.2fx, B=32 %.2fx\n",
               b8 / 291, b32 / 384 }'
fi
