#!/usr/bin/env bash
# A real external engine behind the registration sidecar: llama.cpp's OpenAI-compatible
# server (llama-server, built from the llama.cpp that the PyPI `llama-cpp-python` sdist
# vendors) serving SmolLM2 in pool `llamacpp-spot`, one of our candle workers serving the
# same model in `cpu-ondemand`, a router in front. scripts/engine_llamacpp.py drives it
# and prints what it measured; docs/engines.md explains the guarantees it checks.
#
#   scripts/engine-llamacpp.sh [--release]
#
# The llama-server build (~5-10 min on 2 cores) is cached in $LLAMA_CACHE (default
# ~/.cache/switchyard/llama.cpp-$VERSION); too slow for CI, where the same protocol is
# covered by integration/tests/engines.rs against a small Python server.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE=${LLAMA_CACHE:-$HOME/.cache/switchyard/llama.cpp-$VERSION}
PROFILE=debug
if [ "${1:-}" = "--release" ]; then PROFILE=release; fi

if [ ! -x "$CACHE/build/bin/llama-server" ]; then
  mkdir -p "$CACHE"
  if [ ! -d "$CACHE/src" ]; then
    echo "downloading llama-cpp-python $VERSION (sdist) from PyPI"
    python3 - "$CACHE" "$VERSION" <<'PY'
import json, sys, tarfile, urllib.parse, urllib.request, os, shutil
cache, version = sys.argv[1], sys.argv[2]
index = "https://pypi.org/pypi/llama-cpp-python/json"
meta = json.load(urllib.request.urlopen(index))
sdist = next(u for u in meta["releases"][version] if u["packagetype"] == "sdist")
url = urllib.parse.urljoin(index, sdist["url"])
path = os.path.join(cache, sdist["filename"])
with urllib.request.urlopen(url) as r, open(path, "wb") as f:
    shutil.copyfileobj(r, f)
with tarfile.open(path) as t:
    t.extractall(cache, filter="data")
os.rename(os.path.join(cache, f"llama_cpp_python-{version}", "vendor", "llama.cpp"), os.path.join(cache, "src"))
shutil.rmtree(os.path.join(cache, f"llama_cpp_python-{version}"))
os.remove(path)
PY
  fi
  command -v cmake >/dev/null || { echo "cmake is needed (apt-get install cmake)"; exit 1; }
  echo "building llama-server (cached in $CACHE)"
  t0=$(date +%s)
  cmake -S "$CACHE/src" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON >/dev/null
  cmake --build "$CACHE/build" --target llama-server -j "$(nproc)" >/dev/null
  echo "llama-server built in $(( $(date +%s) - t0 )) s"
fi

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
  --llama-server "$CACHE/build/bin/llama-server" \
  --switchyard "$TARGET/$PROFILE/switchyard" \
  --worker "$TARGET/$PROFILE/switchyard-worker" \
  --model models/SmolLM2-135M-Instruct.Q4_1.gguf
