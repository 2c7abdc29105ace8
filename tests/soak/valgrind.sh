#!/usr/bin/env bash
# tests/soak/valgrind.sh: llm-engine and llm-fcgi under valgrind (memcheck) through a start, a few
# requests and a stop. The engine runs under valgrind on a temporary socket (1 thread, a 16 MiB KV
# cache); the worker runs under valgrind standalone (--listen unix:..., 2 threads, --api-key);
# cgi-fcgi (libfcgi-bin) drives it without a web server: GET /health, GET /v1/models, a
# non-streaming chat (max_tokens 2), a streaming completion (max_tokens 2), a 401 and a 400.
# Then SIGTERM to the worker and to the engine. Fails when either exits non-zero, valgrind
# reports an error (--error-exitcode) or a definite leak, or a request did not answer as expected.
# Env: BUILD (build), MODEL (models/default.gguf). Slow: a few minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
MODEL=${MODEL:-models/default.gguf}
dir=$(mktemp -d /tmp/llm-vg-XXXXXX)
vg=(valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite
    --show-leak-kinds=definite --track-fds=no)
fail=0
cleanup() { rm -rf "$dir"; }
trap cleanup EXIT

"${vg[@]}" --log-file="$dir/engine.vg" "$BUILD/llm-engine" -m "$MODEL" --socket "$dir/engine.sock" \
    --threads 1 --kv-cache-mb 16 --spill-dir none --log-level warn 2>"$dir/engine.err" &
epid=$!
for _ in $(seq 600); do [[ -S $dir/engine.sock ]] && break; sleep 0.5; done
"${vg[@]}" --log-file="$dir/worker.vg" "$BUILD/llm-fcgi" --engine "$dir/engine.sock" \
    --listen "unix:$dir/w.sock" --threads 2 --api-key sk-vg --log-level warn 2>"$dir/worker.err" &
wpid=$!
for _ in $(seq 600); do [[ -S $dir/w.sock ]] && break; sleep 0.5; done

# req METHOD URI BODY KEY: the response (headers and body) on stdout
req() {
    local body=$3
    env -i REQUEST_METHOD="$1" REQUEST_URI="$2" SCRIPT_NAME="$2" CONTENT_TYPE=application/json \
        CONTENT_LENGTH=${#body} HTTP_AUTHORIZATION="Bearer $4" \
        timeout 600 cgi-fcgi -bind -connect "$dir/w.sock" < <(printf '%s' "$body")
}
expect() { # NAME PATTERN TEXT
    if grep -q -- "$2" <<<"$3"; then echo "  ok: $1"; else echo "  FAILED: $1: ${3:0:400}"; fail=1; fi
}
# /health may take a while: the engine under valgrind is slow to load the model.
for _ in $(seq 120); do
    h=$(req GET /health "" sk-vg)
    grep -q '"ok"' <<<"$h" && break
    sleep 1
done
expect "GET /health 200" '"status":"ok"' "$h"
m=$(req GET /v1/models "" sk-vg)
expect "GET /v1/models" '"object":"list"' "$m"
model=$(sed -n 's/.*"id":"\([^"]*\)".*/\1/p' <<<"$m" | head -1)
c=$(req POST /v1/chat/completions "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":2}" sk-vg)
expect "chat completion" '"object":"chat.completion"' "$c"
s=$(req POST /v1/completions "{\"model\":\"$model\",\"prompt\":\"Once\",\"max_tokens\":2,\"stream\":true}" sk-vg)
expect "streamed completion ends with [DONE]" 'data: \[DONE\]' "$s"
k=$(req POST /v1/chat/completions '{}' sk-wrong)
expect "wrong key 401" 'Status: 401' "$k"
b=$(req POST /v1/chat/completions '{"model": ' sk-vg)
expect "bad JSON 400" 'Status: 400' "$b"

kill -TERM "$wpid"; wait "$wpid"; wrc=$?
kill -TERM "$epid"; wait "$epid"; erc=$?
echo "worker exit $wrc, engine exit $erc"
for f in engine worker; do
    if [[ -s $dir/$f.vg ]]; then echo "--- valgrind $f:"; cat "$dir/$f.vg"; fail=1; else echo "  valgrind $f: clean"; fi
done
[[ $wrc -eq 0 && $erc -eq 0 ]] || fail=1
((fail == 0)) && echo "valgrind: PASSED" || echo "valgrind: FAILED"
exit $fail
