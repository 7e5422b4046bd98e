#!/usr/bin/env bash
# Builds llama.cpp targets from the copy vendored in PyPI's `llama-cpp-python` sdist (model
# hubs and GitHub are unreachable from these machines; PyPI is not), cached in $LLAMA_CACHE
# (default ~/.cache/switchyard/llama.cpp-$VERSION). Prints the build's bin directory.
#
#   scripts/llamacpp-build.sh llama-server llama-bench
#
# ~5-15 min on 2 cores for a first target; later targets reuse the built library.
set -euo pipefail
VERSION=0.3.36
CACHE=${LLAMA_CACHE:-$HOME/.cache/switchyard/llama.cpp-$VERSION}
[ $# -gt 0 ] || { echo "usage: $0 TARGET..." >&2; exit 2; }
missing=()
for t in "$@"; do [ -x "$CACHE/build/bin/$t" ] || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  mkdir -p "$CACHE"
  if [ ! -d "$CACHE/src" ]; then
    echo "downloading llama-cpp-python $VERSION (sdist) from PyPI" >&2
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
  command -v cmake >/dev/null || { echo "cmake is needed (apt-get install cmake)" >&2; exit 1; }
  echo "building ${missing[*]} (cached in $CACHE)" >&2
  t0=$(date +%s)
  cmake -S "$CACHE/src" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON >/dev/null
  for t in "${missing[@]}"; do
    cmake --build "$CACHE/build" --target "$t" -j "$(nproc)" >/dev/null
  done
  echo "built ${missing[*]} in $(( $(date +%s) - t0 )) s" >&2
fi
echo "$CACHE/build/bin"
