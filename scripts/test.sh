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
# A real Prometheus (and promtool) for the observability tests (Debian's package).
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # the package starts a system Prometheus on :9090; the tests start their own
  { $sudo systemctl stop prometheus || $sudo service prometheus stop || true; } >/dev/null 2>&1
fi
cargo build --workspace --bins
cargo test --workspace
