#!/usr/bin/env bash
# The test command: builds the binaries the integration tests start, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace
