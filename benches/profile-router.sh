#!/usr/bin/env bash
# Where the router's CPU goes per request, in the quick-ab setup (1 KB chat body, the mock
# upstream, wrk at 32 connections; the router on core 0, mock and wrk on core 1):
#
#   perf        a sampled profile (perf record, DWARF call graphs) and, when inferno is
#               installed (`cargo install inferno`), a flame graph: OUT/flame.svg
#   callgrind   user-space instructions per request (valgrind): deterministic, so an A/B
#               of two binaries shows changes far smaller than the host's noise. Kernel
#               time (system calls) is not in it: see benches/quick-ab.sh for those.
#
#   benches/profile-router.sh [--out DIR] [--secs 6] [perf|callgrind] [path/to/switchyard]
#
# Needs perf or valgrind (apt), wrk, and `cargo build --release -p router -p benches --bins`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/profile SECS=6
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    *) break ;;
  esac
done
MODE=${1:-perf}
BIN=${2:-target/release/switchyard}
MOCK=target/release/mock-openai
for t in wrk taskset; do command -v $t >/dev/null || { echo "needs $t"; exit 2; }; done
[ "$MODE" = perf ] && { command -v perf >/dev/null || { echo "needs perf"; exit 2; }; }
[ "$MODE" = callgrind ] && { command -v valgrind >/dev/null || { echo "needs valgrind"; exit 2; }; }
mkdir -p "$OUT"
TMP=$(mktemp -d); trap 'pkill -P $$ 2>/dev/null; rm -rf "$TMP"' EXIT
. benches/forwarder-fixture.sh
fixture "$TMP"
URL=http://127.0.0.1:18102/v1/chat/completions
load() { taskset -c 1 wrk -t1 -c32 -d"$1" -s "$TMP/body.lua" $URL; }
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); AVX-512: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no)"
taskset -c 1 $MOCK --listen 127.0.0.1:18101 --chunks 16 --itl-ms 2 >/dev/null 2>"$TMP/mock.log" &
ARGS=(serve --rules "$TMP/rules/rules.yaml" --listen 127.0.0.1:18102 --grpc 127.0.0.1:18103
  --admin 127.0.0.1:18104 --threads 1 --no-debug-headers)
case $MODE in
  perf)
    taskset -c 0 "$BIN" "${ARGS[@]}" >/dev/null 2>"$TMP/sys.log" &
    SYS=$! ;;
  callgrind)
    # the allocator's settings given, so the router does not re-execute itself under valgrind
    MIMALLOC_ARENA_EAGER_COMMIT=0 MIMALLOC_PURGE_DELAY=0 taskset -c 0 valgrind --tool=callgrind \
      --callgrind-out-file="$OUT/callgrind.out" "$BIN" "${ARGS[@]}" >/dev/null 2>"$TMP/sys.log" &
    SYS=$! ;;
  *) echo "mode: perf or callgrind"; exit 2 ;;
esac
for _ in $(seq 600); do
  curl -sf -o /dev/null -XPOST -d @"$TMP/body.json" -H 'content-type: application/json' $URL && break; sleep 0.2
done
load 2s >/dev/null
case $MODE in
  perf)
    perf record -F 1999 -g --call-graph dwarf,16384 -p $SYS -o "$OUT/perf.data" -- sleep "$SECS" 2>/dev/null &
    REC=$!
    load "${SECS}s" | grep -E 'Requests/sec'
    wait $REC
    perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -40 | cut -c1-120 || true  # (head closes the pipe)
    if command -v inferno-collapse-perf >/dev/null; then
      perf script -i "$OUT/perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph \
        --title "switchyard at c=32 ($(date -u +%F))" > "$OUT/flame.svg"
      echo "flame graph: $OUT/flame.svg"
    fi ;;
  callgrind)
    # counted from here: the start (tokenizer loading) and the warm-up are left out
    callgrind_control -z $SYS >/dev/null
    load "${SECS}s" > "$TMP/wrk.out"
    callgrind_control -d $SYS >/dev/null
    sleep 1
    reqs=$(grep -o '[0-9]* requests in' "$TMP/wrk.out" | cut -d' ' -f1)
    f=$(ls -t "$OUT"/callgrind.out* | head -1)
    ir=$(grep -h '^summary:' "$f" | awk '{print $2}')
    echo "$reqs requests, $ir instructions: $((ir / reqs)) per request ($f)"
    # each function's own instructions per request (callgrind_annotate, on a dump taken
    # mid-run, puts them all under the thread's start)
    python3 - "$f" "$reqs" <<'PY'
import collections, re, sys
names, cost, cur, call = {}, collections.Counter(), None, False
for line in open(sys.argv[1]):
    m = re.match(r"^(c?)fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
    if m:
        if m.group(3):
            names[m.group(2)] = m.group(3)
        if not m.group(1):
            cur = names.get(m.group(2))
        continue
    if line.startswith("calls="):
        call = True
    elif line[:1].isdigit() or line[:1] in "+-*":
        if not call and cur:
            cost[cur] += int(line.split()[-1])
        call = False
reqs, total = int(sys.argv[2]), sum(cost.values())
for name, ir in cost.most_common(30):
    print(f"{100 * ir / total:5.1f} % {ir // reqs:8d} per request  {name[:110]}")
PY
    ;;
esac
