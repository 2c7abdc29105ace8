#!/usr/bin/env bash
# run.sh (`make run`): a quick look at the engine. The HTTP server comes in a later issue; for
# now this runs llm-run on the default model with a chat prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
MODEL=${MODEL:-models/default.gguf}
PROMPT=${PROMPT:-Write a short poem about the sea.}
echo "make run: no HTTP server yet; running $BUILD/llm-run on $MODEL:" >&2
echo "  $BUILD/llm-run -m $MODEL --chat -p \"$PROMPT\" -n 128" >&2
exec "$BUILD/llm-run" -m "$MODEL" --chat -p "$PROMPT" -n 128
