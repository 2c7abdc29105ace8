#!/usr/bin/env bash
# make bench: engine benchmarks on the default model. Prints figures and ratios against the
# llama.cpp baselines quoted in ../shared/BENCH.md (measured on this kind of machine); never fails on
# time. Results are appended to bench/results/engine.jsonl. Then the end-to-end load (items 3-4).
# Env: BUILD (build), MODEL (models/default.gguf), THREADS (online CPUs), REPS (3), ENGINE (1), E2E (1)
#      (0 skips the engine or the end-to-end part),
#      CLIENTS (1,8,32), ROUNDS (2), PEER_URL (unset: no peer).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
MODEL=${MODEL:-models/default.gguf}
THREADS=${THREADS:-$(nproc)}
REPS=${REPS:-3}
mkdir -p bench/results
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
if [ "${ENGINE:-1}" != 0 ]; then
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
fi

# ---- 3 and 4: end to end through lighttpd + llm-fcgi + llm-engine (BENCH.md items 3 and 4) ----
# The stack of `make run` on a free port in its own run directory; the same load straight against
# the engine socket gives the FastCGI path's own cost, and PEER_URL (an OpenAI-compatible server
# on the same GGUF) the ratio ours / peer. Set E2E=0 to skip.
if [ "${E2E:-1}" != 0 ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    run_dir="$BUILD/bench-run"
    export RUN_DIR="$run_dir" PORT="$port" BUILD MODEL
    trap 'scripts/stop.sh >/dev/null 2>&1 || true' EXIT
    if ENGINE_FLAGS="--threads $THREADS" scripts/run.sh >/dev/null; then
        targets=(--load "http://127.0.0.1:$port" --load "unix:$run_dir/engine.sock")
        [ -n "${PEER_URL:-}" ] && targets+=(--load "$PEER_URL")
        echo "== end to end: lighttpd + llm-fcgi + llm-engine vs the engine socket${PEER_URL:+ vs $PEER_URL}"
        "$BUILD/llm-bench" "${targets[@]}" --engine-socket "$run_dir/engine.sock" \
            --clients "${CLIENTS:-1,8,32}" --rounds "${ROUNDS:-2}" --gen 128 \
            --json bench/results/engine.jsonl --label "$commit"
    else
        echo "bench: the HTTP stack did not start (see $run_dir/*.log)" >&2
    fi
fi
