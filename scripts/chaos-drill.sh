#!/usr/bin/env bash
# The full chaos drill (#17): sustained load through the router while the spot worker is
# SIGKILLed and restarted every 1.5 s, the rules file is rewritten every 100 ms and the router
# is upgraded in place halfway. Release build. CI runs the same test bounded to 20 s.
#
#   scripts/chaos-drill.sh [SECONDS=300] [KILL_EVERY_MS=1500] [CLIENTS=6]
#
# Prints one line: answers, visible errors (must be 0), streams broken after their first
# byte (they end with an SSE error event), silent cuts (must be 0), kills, rewrites, and the
# router's RSS over the second half.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -m1 -o -w 'avx512_vnni\|avx512f\|avx2' /proc/cpuinfo | head -1 | sed 's/^/ISA: /' || true
cargo build --release --workspace --bins --tests
SWITCHYARD_CHAOS_SECS="${1:-300}" SWITCHYARD_CHAOS_KILL_MS="${2:-1500}" \
  SWITCHYARD_CHAOS_CLIENTS="${3:-6}" \
  cargo test --release -p integration --test chaos -- --nocapture 2>&1 | grep -E "chaos drill|test result|panicked"
