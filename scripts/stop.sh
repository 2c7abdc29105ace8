#!/usr/bin/env bash
# stop.sh (`make stop`): stops what scripts/run.sh started, from the pid files in $RUN_DIR
# (build/run): lighttpd first (no new requests), then the workers (SIGTERM: each finishes its
# in-flight streams, then exits), then the engine (SIGTERM: running sequences get its grace
# period). Each gets up to STOP_TIMEOUT seconds (30) before SIGKILL. Exits 1 if anything had to
# be killed. A process that has exited but was never reaped (a zombie: its parent, often a
# container's PID 1 without an init, does not wait for orphans) counts as stopped.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
RUN_DIR=${RUN_DIR:-$BUILD/run}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
rc=0

running() { # pid: true while it exists and is not a zombie
    local stat
    kill -0 "$1" 2>/dev/null || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) } # the state follows the command name, which may hold spaces or ')'
    [[ ${stat%% *} != Z ]]
}

stop_pids() { # name pidfile
    local name=$1 file=$2 pids=() left=()
    [[ -f $file ]] || return 0
    read -r -d '' -a pids <"$file" || true
    for p in "${pids[@]}"; do
        [[ $p =~ ^[0-9]+$ ]] && kill -TERM "$p" 2>/dev/null && left+=("$p")
    done
    for ((i = 0; i < STOP_TIMEOUT * 10 && ${#left[@]}; i++)); do
        local still=()
        for p in "${left[@]}"; do running "$p" && still+=("$p"); done
        left=("${still[@]+"${still[@]}"}")
        ((${#left[@]})) && sleep 0.1 # polling interval
    done
    if ((${#left[@]})); then
        echo "stop: $name (${left[*]}) still running after ${STOP_TIMEOUT} s: SIGKILL" >&2
        kill -KILL "${left[@]}" 2>/dev/null
        rc=1
    fi
    ((${#pids[@]})) && echo "stop: $name stopped"
    rm -f "$file"
}

stop_pids lighttpd "$RUN_DIR/lighttpd.pid"
stop_pids llm-fcgi "$RUN_DIR/llm-fcgi.pid"
stop_pids llm-engine "$RUN_DIR/engine.pid"
rm -f "$RUN_DIR/llm-fcgi.sock" "$RUN_DIR/engine.sock"
exit $rc
