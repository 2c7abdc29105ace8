#!/usr/bin/env bash
# run.sh (`make run`): serves the OpenAI API on http://127.0.0.1:8080 with the real stack:
#   llm-engine on the model, P llm-fcgi worker processes (T threads each) under spawn-fcgi on one
#   Unix socket, and lighttpd in front with examples/lighttpd.conf rendered for the run directory.
# Everything (sockets, pid files, logs, the rendered config) lives in $RUN_DIR (build/run). The
# processes keep running after this script returns; `make stop` (scripts/stop.sh) stops them.
# Env: BUILD (build), MODEL (models/default.gguf), PORT (8080), PROCS (2), THREADS (8),
#      RUN_DIR ($BUILD/run), ENGINE_FLAGS and FCGI_FLAGS (extra flags, e.g. FCGI_FLAGS="--api-key K").
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
MODEL=${MODEL:-models/default.gguf}
PORT=${PORT:-8080}
PROCS=${PROCS:-2}
THREADS=${THREADS:-8}
RUN_DIR=${RUN_DIR:-$BUILD/run}
mkdir -p "$RUN_DIR/htdocs"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
read -r -a engine_flags <<<"${ENGINE_FLAGS:-}"
read -r -a fcgi_flags <<<"${FCGI_FLAGS:-}"

for f in "$BUILD/llm-engine" "$BUILD/llm-fcgi"; do
    [[ -x $f ]] || { echo "run: $f is missing (make all)" >&2; exit 1; }
done
[[ -f $MODEL ]] || { echo "run: no model at $MODEL (make model)" >&2; exit 1; }

alive() { [[ -f $1 ]] && kill -0 $(cat "$1") 2>/dev/null; }
for p in engine lighttpd llm-fcgi; do
    if alive "$RUN_DIR/$p.pid"; then
        echo "run: already running ($RUN_DIR/$p.pid); make stop first" >&2
        exit 1
    fi
done
if curl -s -o /dev/null "http://127.0.0.1:$PORT/" 2>/dev/null; then
    echo "run: something already answers on 127.0.0.1:$PORT (set PORT=...)" >&2
    exit 1
fi

fail() {
    echo "run: $1; the logs in $RUN_DIR:" >&2
    tail -n 20 "$RUN_DIR"/*.log >&2 2>/dev/null || true
    scripts/stop.sh >&2 || true
    exit 1
}

# 1. The engine (its own session, so that ^C on make does not reach it).
setsid "$BUILD/llm-engine" -m "$MODEL" --socket "$RUN_DIR/engine.sock" "${engine_flags[@]}" \
    </dev/null >>"$RUN_DIR/engine.log" 2>&1 &
echo $! >"$RUN_DIR/engine.pid"

# Wait until the engine accepts connections (the model is loaded). A worker that starts before
# that answers 503 until its backoff lets it retry (up to 1 s), and /health below would be
# satisfied by whichever worker got through first while the other one still refused requests.
engine_live() {
    python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])' "$RUN_DIR/engine.sock" 2>/dev/null
}
for ((i = 0; ; i++)); do
    alive "$RUN_DIR/engine.pid" || fail "llm-engine exited"
    engine_live && break
    ((i < 1200)) || fail "llm-engine did not listen within 120 s"
    sleep 0.1
done

# 2. The workers: spawn-fcgi opens the socket (0660: only the web server's group reaches it),
# forks PROCS workers with it on fd 0 and exits. spawn-fcgi closes the workers' stderr, so a
# shell hands it to the log file first and then execs the worker (the pid stays the same).
# The workers also connect to the engine with backoff, so an engine restarted later is found.
LLM_FCGI_LOG="$RUN_DIR/llm-fcgi.log" spawn-fcgi -s "$RUN_DIR/llm-fcgi.sock" -M 0660 -F "$PROCS" \
    -P "$RUN_DIR/llm-fcgi.pid" -- /bin/sh -c 'exec "$0" "$@" 2>>"$LLM_FCGI_LOG"' \
    "$(cd "$BUILD" && pwd)/llm-fcgi" --engine "$RUN_DIR/engine.sock" --threads "$THREADS" "${fcgi_flags[@]}" \
    >>"$RUN_DIR/spawn-fcgi.log" 2>&1 || fail "spawn-fcgi failed"

# 3. lighttpd, with the example configuration rendered for this directory and port.
sed -e "s#/run/llm-fcgi#$RUN_DIR#g; s#/var/lib/llm-fcgi#$RUN_DIR#g; s#/var/log/llm-fcgi#$RUN_DIR#g" \
    -e "s#\\b8080\\b#$PORT#g" examples/lighttpd.conf >"$RUN_DIR/lighttpd.conf"
setsid lighttpd -D -f "$RUN_DIR/lighttpd.conf" </dev/null >>"$RUN_DIR/lighttpd.log" 2>&1 &
echo $! >"$RUN_DIR/lighttpd.pid"

# 4. Ready when /health says so (the engine loaded the model and a worker reached it).
url="http://127.0.0.1:$PORT"
for ((i = 0; i < 600; i++)); do
    alive "$RUN_DIR/engine.pid" || fail "llm-engine exited"
    alive "$RUN_DIR/lighttpd.pid" || fail "lighttpd exited"
    if curl -sf -o /dev/null "$url/health"; then
        model=$(curl -s "$url/v1/models" | sed -n 's/.*"id" *: *"\([^"]*\)".*/\1/p')
        auth=""
        [[ " ${fcgi_flags[*]} " == *" --api-key"* ]] && auth="-H 'Authorization: Bearer YOUR_KEY' "
        cat <<MSG
llm-fcgi is serving on $url (model "$model"; $PROCS workers x $THREADS threads; logs in $RUN_DIR)

  curl -N $url/v1/chat/completions $auth-H 'Content-Type: application/json' \\
    -d '{"model": "$model", "stream": true, "max_tokens": 64,
         "messages": [{"role": "user", "content": "Write a haiku about the sea."}]}'

OpenAI SDKs: base_url="$url/v1". Stop with: make stop
MSG
        exit 0
    fi
    sleep 0.1 # polling interval
done
fail "no answer from $url/health within 60 s"
