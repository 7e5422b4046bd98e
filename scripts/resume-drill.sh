#!/usr/bin/env bash
# The full mid-stream resume drill (#21): 8 clients stream through the router to a spot
# pool whose (simulated) worker is SIGKILLed and replaced every 700 ms; every broken stream
# must be continued on another worker, whole, with no text repeated or lost. Release
# build. CI runs the same test with 20 kills.
#
#   scripts/resume-drill.sh [KILLS=100] [KILL_EVERY_MS=700] [CLIENTS=8]
#
# Prints one line: kills, streams whole, streams broken (must be 0), streams resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -m1 -o -w 'avx512_vnni\|avx512f\|avx2' /proc/cpuinfo | head -1 | sed 's/^/ISA: /' || true
cargo build --release --workspace --bins --tests
SWITCHYARD_RESUME_KILLS="${1:-100}" SWITCHYARD_RESUME_KILL_MS="${2:-700}" \
  SWITCHYARD_RESUME_CLIENTS="${3:-8}" \
  cargo test --release -p integration --test resume streams_survive -- --nocapture 2>&1 |
  grep -E "resume drill|test result|panicked"
