#!/usr/bin/env bash
# make bench: engine benchmarks on the default model. Prints figures and ratios against the
# llama.cpp baselines quoted in ../shared/BENCH.md (measured on this kind of machine); never fails on
# time. Results are appended to bench/results/engine.jsonl. Then the end-to-end load (items 3-4).
# Env: BUILD (build), MODEL (models/default.gguf), THREADS (online CPUs), REPS (3), ENGINE (1), E2E (1)
#      (0 skips the engine or the end-to-end part),
#      CLIENTS (1,8,32), ROUNDS (2), PEER_URL (unset: no peer), FCGI_FLAGS (extra worker flags;
#      the bench's worker runs with --no-guards so that every request generates --gen tokens),
#      PEER_BENCH (unset: none): path to a llama-bench the user built; pp512/tg128 of ours and of
#      the peer on the same GGUF and threads, alternating A B A B for PEER_ROUNDS (3) rounds,
#      medians and ratios printed and appended to bench/results/engine.jsonl.
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

# ---- pp512 / tg128 side by side with llama.cpp's llama-bench (PEER_BENCH) ----
if [ -n "${PEER_BENCH:-}" ]; then
    rounds=${PEER_ROUNDS:-3}
    echo "== pp512/tg128 side by side: ours vs $PEER_BENCH ($THREADS threads, A B A B x $rounds)"
    ours_pp=() ours_tg=() peer_pp=() peer_tg=()
    for ((r = 1; r <= rounds; r++)); do
        out=$("$BUILD/llm-bench" -m "$MODEL" -t "$THREADS" --reps 1 --bw-mb 256)
        ours_pp+=("$(sed -n 's/^pp512: \([0-9.]*\) tok\/s.*/\1/p' <<<"$out")")
        ours_tg+=("$(sed -n 's/^tg128: \([0-9.]*\) tok\/s.*/\1/p' <<<"$out")")
        # llama-bench -o jsonl: one line per test; avg_ts is tokens per second
        pout=$("$PEER_BENCH" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -r 1 -o jsonl 2>/dev/null)
        read -r ppp ptg < <(python3 -c '
import json, sys
pp = tg = 0.0
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    j = json.loads(line)
    if j.get("n_prompt", 0) > 0 and j.get("n_gen", 0) == 0:
        pp = j["avg_ts"]
    elif j.get("n_gen", 0) > 0 and j.get("n_prompt", 0) == 0:
        tg = j["avg_ts"]
print(pp, tg)' <<<"$pout")
        peer_pp+=("$ppp") peer_tg+=("$ptg")
        echo "round $r: ours pp512 ${ours_pp[-1]} tg128 ${ours_tg[-1]} | peer pp512 $ppp tg128 $ptg tok/s"
    done
    python3 - "$commit" "$cpu" "$THREADS" "${ours_pp[*]}" "${ours_tg[*]}" "${peer_pp[*]}" \
        "${peer_tg[*]}" <<'PY'
import json, os, socket, statistics as st, sys, time
commit, cpu, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
op, ot, pp, pt = ([float(v) for v in a.split()] for a in sys.argv[4:8])
m = {k: st.median(v) if v else 0.0 for k, v in
     {"ours_pp": op, "ours_tg": ot, "peer_pp": pp, "peer_tg": pt}.items()}
print("medians: ours pp512 %.1f tg128 %.1f | llama.cpp pp512 %.1f tg128 %.1f tok/s"
      % (m["ours_pp"], m["ours_tg"], m["peer_pp"], m["peer_tg"]))
if m["peer_pp"] > 0 and m["peer_tg"] > 0:
    print("ratio ours / llama.cpp (same run, %d threads): pp512 %.2fx, tg128 %.2fx"
          % (threads, m["ours_pp"] / m["peer_pp"], m["ours_tg"] / m["peer_tg"]))
rec = {"timestamp": int(time.time()), "label": commit, "bench": "peer_pp_tg",
       "host": socket.gethostname(), "cpu": cpu, "threads": threads,
       "load_avg_1m": os.getloadavg()[0], "rounds": len(op), **m,
       "ours_pp_all": op, "ours_tg_all": ot, "peer_pp_all": pp, "peer_tg_all": pt}
with open("bench/results/engine.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\n")
PY
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
    # --no-guards: every request must generate exactly --gen tokens, as it does on the engine
    # socket and on a peer without guards. With the guards on, line_repeat ends most of the
    # default model's answers to these random-word prompts early (6 of 8 in one run), so tok/s
    # counted less work than the peer did; llm-bench reports such short requests.
    if ENGINE_FLAGS="--threads $THREADS" FCGI_FLAGS="--no-guards ${FCGI_FLAGS:-}" \
        scripts/run.sh >/dev/null; then
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
