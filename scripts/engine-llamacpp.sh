#!/usr/bin/env bash
# A real external engine behind the registration sidecar: llama.cpp's OpenAI-compatible
# server (llama-server, built from the llama.cpp that the PyPI `llama-cpp-python` sdist
# vendors) serving SmolLM2 in pool `llamacpp-spot`, one of our candle workers serving the
# same model in `cpu-ondemand`, a router in front. scripts/engine_llamacpp.py drives it
# and prints what it measured; docs/engines.md explains the guarantees it checks.
#
#   scripts/engine-llamacpp.sh [--release]
#
# The llama-server build (~5-10 min on 2 cores, scripts/llamacpp-build.sh) is cached in
# $LLAMA_CACHE (default ~/.cache/switchyard/llama.cpp-$VERSION); too slow for CI, where the same protocol is
# covered by integration/tests/engines.rs against a small Python server.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=debug
if [ "${1:-}" = "--release" ]; then PROFILE=release; fi
BIN=$(scripts/llamacpp-build.sh llama-server)

scripts/fetch-model.sh >/dev/null
# the whole workspace, as scripts/test.sh builds it (building two packages alone unifies
# features differently and rebuilds candle)
if [ "$PROFILE" = release ]; then
  cargo build --release --workspace --bins
else
  cargo build --workspace --bins
fi
TARGET=${CARGO_TARGET_DIR:-target}
exec python3 scripts/engine_llamacpp.py \
  --llama-server "$BIN/llama-server" \
  --switchyard "$TARGET/$PROFILE/switchyard" \
  --worker "$TARGET/$PROFILE/switchyard-worker" \
  --model models/SmolLM2-135M-Instruct.Q4_1.gguf
