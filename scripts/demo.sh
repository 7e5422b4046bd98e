#!/usr/bin/env bash
# The local demo fleet: the router with examples/rules.yaml and one SmolLM2 CPU worker for
# each pool (h100-spot, h100-ondemand, l40s-spot, l40s-ondemand, cpu). On this machine the
# GPU pools are labels: their workers run the same model on the CPU.
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cmake >/dev/null 2>&1; then
  echo "installing cmake (pingora's build needs it)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq cmake >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq cmake >/dev/null; fi
fi
scripts/fetch-model.sh
cargo build --release --bins
bin=target/release
PROXY=${PROXY:-127.0.0.1:8080}
GRPC=${GRPC:-127.0.0.1:50051}
ADMIN=${ADMIN:-127.0.0.1:9090}
logs=$(mktemp -d)
pids=()
cleanup() { kill -INT "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
"$bin/switchyard" serve --rules examples/rules.yaml --listen "$PROXY" --grpc "$GRPC" --admin "$ADMIN" 2>"$logs/router.log" &
pids+=($!)
for pool in cpu l40s-spot l40s-ondemand h100-spot h100-ondemand; do
  "$bin/switchyard-worker" --model models/SmolLM2-135M-Instruct.Q4_1.gguf --model-name smollm2 \
    --router "http://$GRPC" --pool "$pool" --worker-id "$pool-0" 2>"$logs/worker-$pool.log" >/dev/null &
  pids+=($!)
done
echo "waiting for 5 workers to register..."
for _ in $(seq 1 120); do
  n=$(curl -s "http://$ADMIN/admin/workers" | grep -o '"state":"live"' | wc -l || true)
  [ "$n" -ge 5 ] && break
  sleep 0.5
done
cat <<TXT

Switchyard is serving (logs in $logs).
  OpenAI API:  http://$PROXY/v1/chat/completions   (model: smollm2)
  Workers:     http://$ADMIN/admin/workers
  Metrics:     http://$ADMIN/metrics

Try:
  curl -si http://$PROXY/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":32}'
The x-switchyard-pool header says which pool answered. Ctrl-C stops the fleet.
TXT
wait
