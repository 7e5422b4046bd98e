#!/usr/bin/env bash
# The test command: builds the binaries the integration tests start, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# The official OpenAI Python SDK, for the tests that use it as the client (PyPI).
if [ ! -x integration/.venv/bin/python ] || ! integration/.venv/bin/python -c "import openai" 2>/dev/null; then
  if ! python3 -m venv integration/.venv 2>/dev/null; then
    # Debian's python3 keeps venv in its own package
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq python3-venv >/dev/null
    rm -rf integration/.venv && python3 -m venv integration/.venv
  fi
  integration/.venv/bin/pip install --quiet "openai>=1.50"
fi
# Real services for the tests that are about them (Debian's packages): Prometheus (and
# promtool) for the observability tests, redis-server for limits shared by routers. The
# packages start system services; the tests start their own on ephemeral ports.
need=""
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need="$need prometheus"
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
if [ -n "$need" ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $need >/dev/null
  for svc in prometheus redis-server; do
    { $sudo systemctl stop $svc || $sudo service $svc stop || true; } >/dev/null 2>&1
  done
fi
cargo build --workspace --bins
cargo test --workspace
# the NVML metrics code (CUDA builds turn it on): loads, and exports nothing without a driver
cargo test -p pool-worker --features nvml --lib gpu
