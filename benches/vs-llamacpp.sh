#!/usr/bin/env bash
# The worker engine beside llama.cpp on one machine: same GGUF (SmolLM2-135M-Instruct Q4_1),
# same threads, interleaved rounds, medians and ratios, with the CPU's ISA
# (benches/vs_llamacpp.py says what each figure is).
#
#   benches/vs-llamacpp.sh [--rounds 3] [--threads 2]
#
# Builds llama-bench from the llama.cpp vendored in PyPI's llama-cpp-python sdist
# (scripts/llamacpp-build.sh, cached; ~5-15 min the first time on 2 cores, GGML_NATIVE) and
# worker-bench in release. llama.cpp is built for this machine (GGML_NATIVE); the worker
# as shipped, for the portable x86-64-v3 baseline (its f32 GEMM dispatches at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(scripts/llamacpp-build.sh llama-bench)
scripts/fetch-model.sh >/dev/null
cargo build --release -p pool-worker --bin worker-bench
TARGET=${CARGO_TARGET_DIR:-target}
exec python3 benches/vs_llamacpp.py --llama-bench "$BIN/llama-bench" \
  --worker-bench "$TARGET/release/worker-bench" \
  --model models/SmolLM2-135M-Instruct.Q4_1.gguf "$@"
