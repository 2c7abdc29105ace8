#!/usr/bin/env bash
# setup.sh: brings a fresh Debian 12 machine to the point where `make` and the tests run.
#  1. Debian packages the build and the tests need (apt-get only when one is missing).
#  2. The test venv .venv (from the system python3) with tests/requirements.txt, reinstalled only
#     when that file changes (a hash stamp lives in .venv).
# Idempotent and silent when there is nothing to do; works with no stdin (CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
REQ=tests/requirements.txt
# lighttpd, spawn-fcgi, libfcgi-bin (cgi-fcgi), apache2-bin + libapache2-mod-fcgid and nginx-light
# are the web servers and FastCGI tools the integration tests run the worker behind.
PKGS=(build-essential clang clang-format libpcre2-dev libcmocka-dev libjson-c-dev pkg-config
      python3-venv valgrind lighttpd spawn-fcgi libfcgi-dev libfcgi-bin curl
      apache2-bin libapache2-mod-fcgid nginx-light)

# ---- Debian packages ----
missing=()
for p in "${PKGS[@]}"; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $st == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    # Packages such as nginx and lighttpd start their service (on port 80) when installed. A
    # policy-rc.d that exits 101 forbids that; one is put in place for the duration of apt-get
    # when the machine has none (CI containers usually do), and removed afterwards.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        trap '"${sudo[@]}" rm -f "$policy"' EXIT
        printf '#!/bin/sh\n# temporary, from llm-fcgi scripts/setup.sh: no service starts\nexit 101\n' |
            "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
    fi
    "${sudo[@]}" apt-get update -qq </dev/null
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
    if [[ -n $(trap -p EXIT) ]]; then
        "${sudo[@]}" rm -f "$policy"
        trap - EXIT
    fi
fi

# ---- Python venv for the integration tests ----
# The machine's python3 may be a pyenv shim; the Debian interpreter is the stable choice.
pick_python() {
    if [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
        echo /usr/bin/python3
    else
        command -v python3
    fi
}
if [[ ! -x $VENV/bin/python ]]; then
    py=$(pick_python)
    echo "setup: creating $VENV with $py"
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
fi
want=$(sha256sum "$REQ" | cut -d' ' -f1)
have=$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)
if [[ $want != "$have" ]]; then
    echo "setup: installing $REQ into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ" </dev/null
    echo "$want" >"$VENV/.requirements.sha256"
fi
