#!/usr/bin/env bash
# tests/run.sh: the test runner behind `make test`, `make check` and `make valgrind`.
#   tests/run.sh              every cmocka unit binary $BUILD/tests/test_*, then pytest tests/integration
#   tests/run.sh --unit       the unit binaries only
#   tests/run.sh --valgrind   the unit binaries only, each under valgrind (leaks and errors fail)
# Env: BUILD (build), MODEL (models/default.gguf), VENV (.venv). Everything runs serially.
# Closes with one line "N passed, N failed" (unit binaries count one each, plus pytest's tests);
# exits non-zero when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
MODEL=${MODEL:-models/default.gguf}
VENV=${VENV:-.venv}
mode=all
case "${1:-}" in
'') ;;
--unit) mode=unit ;;
--valgrind) mode=valgrind ;;
*) echo "usage: tests/run.sh [--unit | --valgrind]" >&2; exit 2 ;;
esac

passed=0
failed=0
skipped=0
failures=()

# ---- Unit binaries ----
wrap=()
if [[ $mode == valgrind ]]; then
    wrap=(valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite)
fi
shopt -s nullglob
for bin in "$BUILD"/tests/test_*; do
    [[ -f $bin && -x $bin ]] || continue
    echo "== $bin"
    if "${wrap[@]}" "$bin"; then
        passed=$((passed + 1))
    else
        rc=$?
        failed=$((failed + 1))
        failures+=("$bin (exit $rc)")
    fi
done

# ---- Integration tests ----
if [[ $mode == all ]]; then
    if [[ ! -x $VENV/bin/python ]]; then
        echo "tests/run.sh: no venv at $VENV (run scripts/setup.sh)" >&2
        failed=$((failed + 1))
        failures+=("pytest (no venv)")
    else
        echo "== pytest tests/integration"
        log=$(mktemp)
        BUILD=$BUILD MODEL=$MODEL "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
            tests/integration 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        # pytest's closing line, e.g. "3 failed, 40 passed, 2 skipped in 12.3s".
        summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error|errors|deselected|xfailed|xpassed)' \
            "$log" | tail -n1)
        rm -f "$log"
        p=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || true)
        f=$(grep -oE '[0-9]+ failed' <<<"$summary" | grep -oE '[0-9]+' || true)
        e=$(grep -oE '[0-9]+ errors?' <<<"$summary" | grep -oE '[0-9]+' || true)
        s=$(grep -oE '[0-9]+ skipped' <<<"$summary" | grep -oE '[0-9]+' || true)
        passed=$((passed + ${p:-0}))
        failed=$((failed + ${f:-0} + ${e:-0}))
        skipped=$((skipped + ${s:-0}))
        if [[ $rc -ne 0 && $rc -ne 5 ]]; then
            # pytest failed without a count (collection error, crash): count it once.
            if [[ -z ${f:-} && -z ${e:-} ]]; then failed=$((failed + 1)); fi
            failures+=("pytest (exit $rc)")
        fi
    fi
fi

if ((${#failures[@]})); then
    echo "failed:"
    printf '  %s\n' "${failures[@]}"
fi
if ((skipped)); then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
((failed == 0))
