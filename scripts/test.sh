#!/usr/bin/env bash
# The test command: builds the binaries the integration tests start, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# The official OpenAI Python SDK, for the tests that use it as the client (PyPI).
if [ ! -x integration/.venv/bin/python ] || ! integration/.venv/bin/python -c "import openai" 2>/dev/null; then
  python3 -m venv integration/.venv
  integration/.venv/bin/pip install --quiet "openai>=1.50"
fi
cargo build --workspace --bins
cargo test --workspace
