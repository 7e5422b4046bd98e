#!/usr/bin/env bash
# A quick side-by-side of forwarders' cost per request: requests per CPU-second at 32
# concurrent clients (wrk, closed loop, 1 KB chat body, interleaved rounds, median) and
# system calls per request (strace -c), for pingora's bare forwarder and one or more
# Switchyard binaries. The system under test runs on core 0, the mock upstream and wrk on
# core 1. Cheaper than benches/load.py (no oha, no peers to install), for A/B checks while
# working on the data plane; load.py stays the run of record.
#
#   benches/quick-ab.sh [--rounds 3] [--secs 4] [--bin-dir target/release] \
#       [NAME=path/to/switchyard ...]
#
# Needs wrk and strace (apt), and `cargo build --release -p router -p benches --bins`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=3 SECS=4 BIN=target/release
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    --bin-dir) BIN=$2; shift 2 ;;
    *) break ;;
  esac
done
SYSTEMS=("pingora=$BIN/pingora-forwarder" "switchyard=$BIN/switchyard" "$@")
for t in wrk strace taskset; do command -v $t >/dev/null || { echo "needs $t"; exit 2; }; done
TMP=$(mktemp -d); trap 'pkill -P $$ 2>/dev/null; rm -rf "$TMP"' EXIT
. benches/forwarder-fixture.sh
fixture "$TMP"
URL=http://127.0.0.1:18102/v1/chat/completions
# start NAME BINARY -> pid of the system on core 0
start() {
  if [[ $1 == pingora* ]]; then
    taskset -c 0 "$2" --listen 127.0.0.1:18102 --upstream 127.0.0.1:18101 --threads 1 >/dev/null 2>"$TMP/sys.log" &
  else
    taskset -c 0 "$2" serve --rules "$TMP/rules/rules.yaml" --listen 127.0.0.1:18102 --grpc 127.0.0.1:18103 \
      --admin 127.0.0.1:18104 --threads 1 --no-debug-headers >/dev/null 2>"$TMP/sys.log" &
  fi
  SYSP=$!
  for _ in $(seq 100); do
    curl -sf -o /dev/null -XPOST -d @"$TMP/body.json" -H 'content-type: application/json' $URL && break; sleep 0.1
  done
  taskset -c 1 wrk -t1 -c32 -d1s -s "$TMP/body.lua" $URL >/dev/null
}
stop() { kill -9 "$SYSP" 2>/dev/null; wait "$SYSP" 2>/dev/null || true; }
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
taskset -c 1 "$BIN/mock-openai" --listen 127.0.0.1:18101 --chunks 16 --itl-ms 2 >/dev/null 2>"$TMP/mock.log" &
sleep 0.5
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); AVX-512: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no); $ROUNDS rounds x ${SECS}s"
declare -A RATES
for r in $(seq "$ROUNDS"); do
  for spec in "${SYSTEMS[@]}"; do
    name=${spec%%=*}; bin=${spec#*=}
    start "$name" "$bin"
    t0=$(ticks $SYSP)
    taskset -c 1 wrk -t1 -c32 -d"${SECS}s" -s "$TMP/body.lua" $URL >"$TMP/wrk.out"
    t1=$(ticks $SYSP)
    reqs=$(grep -o '[0-9]* requests in' "$TMP/wrk.out" | cut -d' ' -f1)
    RATES[$name]="${RATES[$name]:-} $(python3 -c "print(round($reqs/(($t1-$t0)/100)))")"
    stop
  done
done
median() { python3 -c 'import statistics,sys; print(round(statistics.median(map(float,sys.argv[1:]))))' "$@"; }
base=$(median ${RATES[pingora]})
printf "%-22s %-28s %8s %10s %14s\n" system "req per CPU-s (rounds)" median "/ pingora" "syscalls/req"
for spec in "${SYSTEMS[@]}"; do
  name=${spec%%=*}; bin=${spec#*=}
  start "$name" "$bin"
  strace -c -f -p "$SYSP" -o "$TMP/strace.out" 2>/dev/null & ST=$!
  sleep 0.5
  taskset -c 1 wrk -t1 -c32 -d2s -s "$TMP/body.lua" $URL >"$TMP/wrk.out"
  sleep 0.2; kill -INT $ST; wait $ST 2>/dev/null || true
  reqs=$(grep -o '[0-9]* requests in' "$TMP/wrk.out" | cut -d' ' -f1)
  calls=$(awk '$NF=="total" {print $4}' "$TMP/strace.out")
  stop
  m=$(median ${RATES[$name]})
  printf "%-22s %-28s %8s %9.2fx %14.2f\n" "$name" "${RATES[$name]}" "$m" "$(python3 -c "print($m/$base)")" "$(python3 -c "print($calls/$reqs)")"
done
