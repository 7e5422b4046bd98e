#!/usr/bin/env bash
# shellcheck disable=SC2317 # the scenarios run as "s$n", the cleanup from a trap
# A multi-host Switchyard fleet on one machine (issue #19): two routers, three workers, an
# HTTPS upstream and a load client, each in its own network namespace with its own address
# on a private bridge (10.77.0.0/24). Real processes, real TCP; see docs/multihost.md.
#
#   sudo scripts/multihost.sh            # as root; about 75 s on a debug build
#
# Scenarios (one PASS/FAIL line each, with the figures):
#   1  workers register with both routers; a client alternating between them is served
#   2  router 1 SIGKILLed: router 2 serves on, no worker lost; router 1 restarted, re-joined
#   3  a worker host partitioned (its link down): leases expire within the TTL on both
#      routers, requests in flight fail over, the client sees no error; re-join on heal
#   4  50 ms ± 10 ms delay and 1 % loss between hosts: requests succeed; added latency
#   5  a static upstream behind HTTPS with an API key, on another host, is served
#
# Environment:
#   SWITCHYARD_BIN_DIR      the binaries (default target/debug)
#   MULTIHOST_SCALE         multiplies every load phase's length (default 1; 5 = a long run)
#   MULTIHOST_LEASE_TTL_MS  the routers' lease TTL (default 2000)
#   MULTIHOST_HEARTBEAT_MS  the heartbeat interval (default 500)
#   MULTIHOST_PREFIX        namespace name prefix (default sy: sy-br, sy-r1, ...)
#   MULTIHOST_SUBNET        the first three octets of the /24 (default 10.77.0)
#   MULTIHOST_IMPAIR        netem | userspace | auto (default auto: netem when the kernel
#                           has sch_netem, else the userspace impairing switch)
#   MULTIHOST_ONLY          the scenarios to run, comma-separated (default 1,2,3,4,5)
#   MULTIHOST_STRICT=1      scenario 3 also fails when a request in flight on the cut-off
#                           worker was held until the heal instead of failed over (a JSON
#                           answer whose header had come; see docs/multihost.md)
#   MULTIHOST_KEEP=1        keep the work directory (logs) instead of removing it
#
# Exit status: 0 when every scenario passed (or SKIP: no namespaces here), 1 otherwise.
# Everything it creates (namespaces, the interfaces in them, processes, the work
# directory) goes on exit, Ctrl-C and failures included; nothing outside is touched.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
T_START=$(date +%s)

BIN_DIR=${SWITCHYARD_BIN_DIR:-target/debug}
case "$BIN_DIR" in /*) ;; *) BIN_DIR="$REPO/$BIN_DIR" ;; esac
SCALE=${MULTIHOST_SCALE:-1}
TTL=${MULTIHOST_LEASE_TTL_MS:-2000}
HB=${MULTIHOST_HEARTBEAT_MS:-500}
P=${MULTIHOST_PREFIX:-sy}
NET=${MULTIHOST_SUBNET:-10.77.0}
IMPAIR_MODE=${MULTIHOST_IMPAIR:-auto}
ONLY=${MULTIHOST_ONLY:-1,2,3,4,5}
HELPER="$REPO/scripts/multihost.py"
UPSTREAM_PY="$REPO/integration/upstream/openai_server.py"
SIM_TTFT_MS=300   # the sim workers' time to first token (their answer's header comes with it)
FIRST_BYTE_MS=2000 # ~7 times that: a worker silent before its header is given up on in 2 s
EXPIRY_TICK_MS=250 # the router's lease expiry loop (router/src/registry/mod.rs)

# host -> address (the switch namespace ${P}-br holds the bridge and no address)
declare -A ADDR=([r1]=$NET.11 [r2]=$NET.12 [w1]=$NET.21 [w2]=$NET.22 [w3]=$NET.23 [up]=$NET.31 [cl]=$NET.41)
HOSTS=(r1 r2 w1 w2 w3 up cl)
WORKERS=(w1 w2 w3)

say() { printf '%s\n' "$*"; }
skip() {
  say "SKIP: $*"
  exit 0
}
# seconds since the epoch with milliseconds
now() { date +%s.%3N; }
# a number rounded to an integer; -1 for none (a measurement that never came)
fx() { if [ -n "$1" ]; then awk -v v="$1" 'BEGIN { printf "%.0f", v }'; else echo -1; fi; }

# ---- preconditions: SKIP where this kernel or user cannot have namespaces -------------
[ "$(id -u)" = 0 ] || skip "not root (uid $(id -u)): creating network namespaces needs CAP_SYS_ADMIN"
command -v ip >/dev/null || skip "no \`ip\` command (iproute2) on PATH"
PY=$(command -v python3) || {
  say "FAIL: python3 is required (the load client and helpers)"
  exit 1
}
for b in switchyard switchyard-worker; do
  [ -x "$BIN_DIR/$b" ] || {
    say "FAIL: no $BIN_DIR/$b (build the binaries first: cargo build --bins)"
    exit 1
  }
done
command -v openssl >/dev/null || {
  say "FAIL: openssl is required (the upstream's test PKI)"
  exit 1
}
for h in br "${HOSTS[@]}"; do
  if ip netns list | awk '{print $1}' | grep -qx "$P-$h"; then
    say "FAIL: network namespace $P-$h already exists and this run did not create it" \
      "(a stale run? \`ip netns del $P-$h\`), or set MULTIHOST_PREFIX"
    exit 1
  fi
done
probe_err=$(ip netns add "$P-br" 2>&1) || skip "ip netns add $P-br failed: $probe_err"

# ---- cleanup: only what this run made ------------------------------------------------
CREATED=("$P-br")
WORK=$(mktemp -d /tmp/switchyard-multihost.XXXXXX)
FAILED=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  touch "$WORK/stop" 2>/dev/null
  local ns pids
  for ns in "${CREATED[@]}"; do
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
    [ "${#pids[@]}" -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null
  done
  sleep 0.5
  for ns in "${CREATED[@]}"; do
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
    [ "${#pids[@]}" -gt 0 ] && kill -KILL "${pids[@]}" 2>/dev/null
  done
  sleep 0.2
  for ns in "${CREATED[@]}"; do
    ip netns del "$ns" 2>/dev/null || say "cleanup: could not delete namespace $ns"
  done
  if [ "${MULTIHOST_KEEP:-0}" = 1 ]; then
    say "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

fail_setup() {
  say "FAIL: setup: $*"
  for f in "$WORK"/*.log "$WORK"/*.out; do
    [ -s "$f" ] && { say "--- ${f##*/}"; tail -n 15 "$f"; }
  done
  exit 1
}

# ---- the network ------------------------------------------------------------------------
in_ns() { # in_ns HOST CMD...
  local h=$1
  shift
  ip netns exec "$P-$h" "$@"
}
ip -n "$P-br" link set lo up
ip -n "$P-br" link add br0 type bridge || fail_setup "cannot create a bridge in $P-br"
ip -n "$P-br" link set br0 up
for h in "${HOSTS[@]}"; do
  ip netns add "$P-$h" || fail_setup "ip netns add $P-$h"
  CREATED+=("$P-$h")
  ip -n "$P-$h" link set lo up
  # the veth pair is made inside the switch namespace; its far end goes to the host
  ip -n "$P-br" link add "p-$h" type veth peer name eth0 netns "$P-$h" || fail_setup "veth for $h"
  ip -n "$P-br" link set "p-$h" master br0 up
  ip -n "$P-$h" addr add "${ADDR[$h]}/24" dev eth0
  ip -n "$P-$h" link set eth0 up
done

# delay/loss: the kernel's netem where it has one, else the userspace switch
if [ "$IMPAIR_MODE" = auto ]; then
  if in_ns cl tc qdisc add dev eth0 root netem delay 1ms 2>/dev/null; then
    in_ns cl tc qdisc del dev eth0 root
    IMPAIR_MODE=netem
  else
    IMPAIR_MODE=userspace
  fi
fi

# ---- files: tiny model, PKI, API key, rules -----------------------------------------
"$PY" "$HELPER" gguf "$WORK/tiny.gguf" || fail_setup "tiny model"
UP_NAME=upstream.multihost.test
UP_KEY="sk-upstream-$RANDOM$RANDOM"
CLIENT_KEY="sk-the-clients-own-$RANDOM"
REG_TOKEN="registry-$RANDOM$RANDOM$RANDOM"
ADMIN_TOKEN="admin-$RANDOM$RANDOM$RANDOM"
(
  cd "$WORK" || exit 1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout ca.key -out ca.pem -days 2 -subj "/CN=switchyard multihost test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" &&
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout server.key -out server.csr -subj "/CN=$UP_NAME" &&
    printf 'subjectAltName=DNS:%s,IP:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
      "$UP_NAME" "${ADDR[up]}" >server.ext &&
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
      -out server.pem -days 2 -extfile server.ext
) >"$WORK/pki.log" 2>&1 || fail_setup "openssl PKI (see pki.log)"
printf '%s\n' "$UP_KEY" >"$WORK/api-key.txt"
cat >"$WORK/rules.yaml" <<EOF
version: 1
models:
  tiny: { tokenizer: { gguf: "$WORK/tiny.gguf" }, context_window: 2048, default_max_tokens: 16 }
  ext-model: { tokenizer: { gguf: "$WORK/tiny.gguf" }, context_window: 2048 }
retry:
  max_attempts: 4
  budget_floor: 50
pools:
  sim: { class: cpu, capacity: on_demand, cost_per_hour: 0.20 }
  ext:
    class: h100
    capacity: on_demand
    cost_per_hour: 4
    workers: ["${ADDR[up]}:8443"]
    models: [ext-model]
    upstream:
      tls: true
      ca_file: "$WORK/ca.pem"
      server_name: $UP_NAME
      api_key: { file: "$WORK/api-key.txt" }
rules:
  - name: external
    when: { model: [ext-model] }
    route: [ext]
  - name: fleet
    route: [sim]
EOF
"$BIN_DIR/switchyard" rules check "$WORK/rules.yaml" >"$WORK/rules-check.log" 2>&1 ||
  fail_setup "rules: $(cat "$WORK/rules-check.log")"

# ---- processes ------------------------------------------------------------------------
declare -A PID
export SWITCHYARD_REGISTRY_TOKEN=$REG_TOKEN SWITCHYARD_ADMIN_TOKEN=$ADMIN_TOKEN
ROUTERS_GRPC="http://${ADDR[r1]}:50051,http://${ADDR[r2]}:50051"
ADMINS="http://${ADDR[r1]}:9090,http://${ADDR[r2]}:9090"
TARGETS="http://${ADDR[r1]}:8080,http://${ADDR[r2]}:8080"

wait_line() { # wait_line FILE PATTERN SECONDS
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
start_router() { # start_router r1
  local h=$1 a=${ADDR[$1]}
  : >"$WORK/$h.out"
  ip netns exec "$P-$h" "$BIN_DIR/switchyard" serve --rules "$WORK/rules.yaml" \
    --listen "$a:8080" --grpc "$a:50051" --admin "$a:9090" \
    --allow-networks "$NET.0/24" --heartbeat-ms "$HB" --lease-ttl-ms "$TTL" \
    --first-byte-timeout-ms "$FIRST_BYTE_MS" --total-timeout-ms 60000 \
    --threads 2 --log-format json --upgrade-sock "$WORK/$h-upgrade.sock" \
    >>"$WORK/$h.out" 2>>"$WORK/$h.log" &
  PID[$h]=$!
  wait_line "$WORK/$h.out" '^LISTENING' 20
}
start_worker() { # start_worker w1
  local h=$1
  ip netns exec "$P-$h" "$BIN_DIR/switchyard-worker" --model "$WORK/tiny.gguf" --model-name tiny \
    --backend sim --sim-ttft-ms "$SIM_TTFT_MS" --sim-tokens-per-s 200 \
    --listen "${ADDR[$h]}:8000" --router "$ROUTERS_GRPC" --pool sim --worker-id "$h" \
    --log-format json >"$WORK/$h.out" 2>"$WORK/$h.log" &
  PID[$h]=$!
}
# (backgrounded with `&` this is a subshell: fine to wait for, not to signal)
helper() { ip netns exec "$P-cl" "$PY" "$HELPER" "$@"; }
report_field() { # report_field JSON KEY  (a top-level key of a report line)
  "$PY" -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print(json.dumps(v) if isinstance(v,(dict,list)) else v)' "$1" "$2"
}
verdict() { # verdict N NAME OK DETAILS...
  local n=$1 name=$2 ok=$3
  shift 3
  if [ "$ok" = 1 ]; then
    say "PASS $n $name: $*"
  else
    say "FAIL $n $name: $*"
    FAILED=1
  fi
}

ip netns exec "$P-up" "$PY" "$UPSTREAM_PY" --api-key "$UP_KEY" --cert "$WORK/server.pem" --key "$WORK/server.key" \
  --host "${ADDR[up]}" --port 8443 >"$WORK/up.out" 2>"$WORK/up.log" &
PID[up]=$!
wait_line "$WORK/up.out" '^LISTENING' 15 || fail_setup "the upstream did not start"
for r in r1 r2; do
  start_router "$r" || fail_setup "router $r did not start"
done
T_WORKERS=$(now)
for w in "${WORKERS[@]}"; do start_worker "$w"; done

say "multihost: namespaces $P-{br,$(IFS=,; echo "${HOSTS[*]}")} on $NET.0/24; lease TTL $TTL ms," \
  "heartbeat $HB ms; delay/loss by $IMPAIR_MODE; binaries $BIN_DIR"

# every scenario starts from the whole fleet registered with both routers
JOIN=$(helper wait --admins "$ADMINS" --token "$ADMIN_TOKEN" --present w1,w2,w3 \
  --since "$T_WORKERS" --timeout 30) || fail_setup "the workers did not register with both routers: $JOIN"
JOIN_MS=$(fx "$(awk '$1>m {m=$1} END {print m*1000}' <<<"$JOIN")")

# ---- 1: register with both routers, alternate ----------------------------------------
s1() {
  local n
  n=$(awk -v s="$SCALE" 'BEGIN { printf "%d", 60 * s }')
  helper load --targets "$TARGETS" --requests "$n" --concurrency 4 --tag s1 --out "$WORK/s1.jsonl"
  local r
  r=$(helper report "$WORK/s1.jsonl" --workers-from "$WORK/r1.log,$WORK/r2.log")
  local served errors pairs
  served=$(report_field "$r" served_by)
  errors=$(report_field "$r" errors)
  # every router sent requests to every worker
  pairs=$("$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); print(sum(1 for r in ("r1","r2") for w in ("w1","w2","w3") if d.get(f"{r}/{w}",0)>0))' "$served")
  local ok=0
  [ "$errors" = 0 ] && [ "$(report_field "$r" requests)" = "$n" ] && [ "$pairs" = 6 ] && ok=1
  verdict 1 "register+alternate" "$ok" "$(report_field "$r" requests) requests over 2 routers," \
    "$errors errors, p50 $(report_field "$r" p50_ms) ms p95 $(report_field "$r" p95_ms) ms;" \
    "3 workers on both routers $JOIN_MS ms after they were started; served (router/worker) $served$([ "$ok" = 1 ] || say "; $(report_field "$r" first_errors)")"
}

# ---- 2: router 1 SIGKILLed, restarted -------------------------------------------------
s2() {
  rm -f "$WORK/stop"
  helper watch --admins "$ADMINS" --token "$ADMIN_TOKEN" --stop-file "$WORK/stop" \
    --interval 0.1 >"$WORK/s2-watch.log" 2>&1 &
  local watch=$!
  local dur
  dur=$(awk -v s="$SCALE" 'BEGIN { print 12 * s }')
  # the client stands for a load balancer: it sends to routers whose /readyz is 200, and a
  # request whose router cannot be reached goes to the other one
  # (the pool must be named: /readyz alone is 200 as soon as any pool has a worker, and
  # the static `ext` pool always has one)
  helper load --targets "$TARGETS" --readyz "$ADMINS" --ready-pool sim \
    --ready-log "$WORK/s2-ready.log" --duration "$dur" --concurrency 4 \
    --fallback --tag s2 --out "$WORK/s2.jsonl" &
  local load=$!
  sleep 2
  local t_kill
  t_kill=$(now)
  kill -KILL "${PID[r1]}"
  wait "${PID[r1]}" 2>/dev/null
  sleep "$(awk -v s="$SCALE" 'BEGIN { print 4 * s }')"
  # what router 1's /readyz says from its first answer until `sim` has a worker there
  helper readyz-watch --admin "http://${ADDR[r1]}:9090" --pool sim >"$WORK/s2-readyz.json" &
  local rzw=$!
  sleep 0.3
  local t_restart
  t_restart=$(now)
  start_router r1 || {
    verdict 2 "router SIGKILL" 0 "router 1 did not restart"
    touch "$WORK/stop"
    wait "$load" "$watch"
    return
  }
  local rejoin rejoin_ms=-1
  rejoin=$(helper wait --admins "http://${ADDR[r1]}:9090" --token "$ADMIN_TOKEN" \
    --present w1,w2,w3 --since "$t_restart" --timeout 30) &&
    rejoin_ms=$(fx "$(awk '{print $1 * 1000}' <<<"$rejoin")")
  wait "$load" "$rzw"
  touch "$WORK/stop"
  wait "$watch"
  local r
  r=$(helper report "$WORK/s2.jsonl")
  # how long the restarted router 1 said ready (/readyz 200) before `sim` had a worker
  local rz early_ms first_rz
  rz=$(cat "$WORK/s2-readyz.json")
  early_ms=$(report_field "$rz" ready_without_pool_ms)
  first_rz="$(report_field "$rz" first_status) $(report_field "$rz" first_pools)"
  # router 2's list of live workers, from the first poll to the last: never short of three
  local r2_states r2_lost
  r2_states=$(awk -v a="http://${ADDR[r2]}:9090" '$2==a {print $3}' "$WORK/s2-watch.log" | sort -u | tr '\n' ' ')
  r2_lost=$(awk -v a="http://${ADDR[r2]}:9090" '$2==a && $3!="w1,w2,w3"' "$WORK/s2-watch.log" | wc -l)
  # after the restart: both routers again, alternating
  helper load --targets "$TARGETS" --requests 20 --concurrency 2 --tag s2b --out "$WORK/s2b.jsonl"
  local rb
  rb=$(helper report "$WORK/s2b.jsonl")
  local ok=0 errors r2_errors
  errors=$(report_field "$r" errors)
  r2_errors=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["by_router"].get("1",[0,0])[1])' "$r")
  [ "$errors" = 0 ] && [ "$r2_errors" = 0 ] && [ "$r2_lost" = 0 ] && [ "$rejoin_ms" -ge 0 ] &&
    [ "$(report_field "$rb" errors)" = 0 ] && ok=1
  verdict 2 "router SIGKILL" "$ok" "$(report_field "$r" requests) requests during the outage," \
    "$errors errors ($r2_errors via router 2; $(report_field "$r" fell_back) sent to router 1" \
    "while it was down went to router 2), p50 $(report_field "$r" p50_ms) ms p95 $(report_field "$r" p95_ms) ms;" \
    "router 2's live workers throughout: ${r2_states% }; router 1 down $(fx "$(awk -v a="$t_kill" -v b="$t_restart" 'BEGIN{print (b-a)*1000}')") ms," \
    "3 workers re-joined it $rejoin_ms ms after its restart (its first /readyz: $first_rz;" \
    "200 without a \`sim\` worker for $early_ms ms); then $(report_field "$rb" requests)" \
    "alternating requests, $(report_field "$rb" errors) errors"
}

# ---- 3: a worker host partitioned ------------------------------------------------------
s3() {
  rm -f "$WORK/stop"
  # ~340 ms a request: 300 ms to the first token (the JSON answer's header comes with it),
  # then 8 tokens at 200/s; clients out of step
  helper load --targets "$TARGETS" --stop-file "$WORK/stop" --concurrency 8 --jitter-ms 100 \
    --tag s3 --out "$WORK/s3.jsonl" &
  local load=$!
  sleep "$(awk -v s="$SCALE" 'BEGIN { print 2 * s }')"
  # cut off: a worker that was just sent a request (so one surely waits for its first
  # token) and has at least two in flight
  local victim busy
  read -r victim busy < <(helper busiest --admins "$ADMINS" --token "$ADMIN_TOKEN" --min 2)
  local t_part
  t_part=$(now)
  ip -n "$P-br" link set "p-${victim:-w1}" down
  victim=${victim:-w1}
  local expiry exp1=-1 exp2=-1
  expiry=$(helper wait --admins "$ADMINS" --token "$ADMIN_TOKEN" --absent "$victim" \
    --since "$t_part" --timeout $((TTL * 3 / 1000 + 5)) --interval 0.02)
  exp1=$(fx "$(awk -v a="http://${ADDR[r1]}:9090" '$2==a {print $1*1000}' <<<"$expiry")")
  exp2=$(fx "$(awk -v a="http://${ADDR[r2]}:9090" '$2==a {print $1*1000}' <<<"$expiry")")
  # hold the partition a little past both expiries, then heal
  sleep "$(awk -v s="$SCALE" 'BEGIN { print 1.5 * s }')"
  local t_heal
  t_heal=$(now)
  ip -n "$P-br" link set "p-$victim" up
  local rejoin rj1=-1 rj2=-1
  rejoin=$(helper wait --admins "$ADMINS" --token "$ADMIN_TOKEN" --present w1,w2,w3 \
    --since "$t_heal" --timeout 30)
  rj1=$(fx "$(awk -v a="http://${ADDR[r1]}:9090" '$2==a {print $1*1000}' <<<"$rejoin")")
  rj2=$(fx "$(awk -v a="http://${ADDR[r2]}:9090" '$2==a {print $1*1000}' <<<"$rejoin")")
  sleep 2
  touch "$WORK/stop"
  wait "$load"
  local r
  r=$(helper report "$WORK/s3.jsonl" --at "$t_part" --heal "$t_heal" --worker "$victim" \
    --ttft-ms "$SIM_TTFT_MS" --logs "$WORK/r1.log,$WORK/r2.log")
  local errors inflight on_w pre pre_fo held held_ms at_cut moved bound_hi bound_lo
  errors=$(report_field "$r" errors)
  inflight=$(report_field "$r" in_flight)
  on_w=$(report_field "$r" in_flight_on_worker)
  pre=$(report_field "$r" before_header)
  pre_fo=$(report_field "$r" before_header_failed_over)
  held=$(report_field "$r" held)
  held_ms=$(report_field "$r" held_max_ms)
  at_cut=$(report_field "$r" finished_at_cut)
  moved=$(report_field "$r" failed_attempts_on_worker)
  # a lease lives TTL past its last heartbeat; the expiry loop runs every 250 ms; the
  # poll and the scheduler add a little
  bound_hi=$((TTL + EXPIRY_TICK_MS + 250))
  bound_lo=$((TTL - HB - 250))
  local ok=1 why=""
  [ "$errors" = 0 ] || { ok=0; why+=" client errors: $(report_field "$r" first_errors);"; }
  for e in $exp1 $exp2; do
    if [ "$e" -lt 0 ] || [ "$e" -gt "$bound_hi" ] || [ "$e" -lt "$bound_lo" ]; then
      ok=0
      why+=" a lease expiry outside [$bound_lo, $bound_hi] ms;"
    fi
  done
  [ "$pre" -ge 1 ] || { ok=0; why+=" no request waiting for $victim's first byte at the partition (nothing shown);"; }
  # before the worker's first byte: failed over, every one
  [ "$pre_fo" = "$pre" ] || { ok=0; why+=" $((pre - pre_fo)) request(s) waiting for $victim's first byte were not failed over: $(report_field "$r" in_flight_on_worker_rows);"; }
  [ "$moved" -ge 1 ] || { ok=0; why+=" no attempt on $victim failed over (nothing shown);"; }
  # after it (a JSON answer's header came, its body did not): the router holds them until
  # the worker is back or --total-timeout-ms; a finding, not failed by default
  if [ "$held" != 0 ] && [ "${MULTIHOST_STRICT:-0}" = 1 ]; then
    ok=0
    why+=" MULTIHOST_STRICT: $held request(s) held until $victim came back;"
  fi
  if [ "$rj1" -lt 0 ] || [ "$rj2" -lt 0 ]; then
    ok=0
    why+=" $victim did not re-join both routers;"
  fi
  verdict 3 "worker partition" "$ok" "$(report_field "$r" requests) requests, $errors errors," \
    "p50 $(report_field "$r" p50_ms) ms p95 $(report_field "$r" p95_ms) ms max $(report_field "$r" max_ms) ms;" \
    "lease of $victim expired ${exp1} ms (router 1) / ${exp2} ms (router 2) after the link went down" \
    "(TTL $TTL ms, heartbeat $HB ms); $inflight requests in flight then, $on_w on $victim" \
    "(the routers counted ${busy:-?} just before):" \
    "$pre before its first byte: $pre_fo failed over; $at_cut answered as the link went down;" \
    "$held after it (JSON header sent, body not) held by the routers until the heal$(
      [ "$held" = 0 ] || printf ' (NOTE: not failed over), up to %s ms' "$held_ms");" \
    "$moved attempts on $victim failed over in all; re-joined ${rj1} ms / ${rj2} ms after the heal${why:+ —$why}"
}

# ---- 4: delay and loss between hosts -----------------------------------------------------
IMPAIR_PID=""
impair_on() { # impair_on DELAY_MS JITTER_MS LOSS_FRACTION
  if [ "$IMPAIR_MODE" = netem ]; then
    local h pct
    pct=$(awk -v l="$3" 'BEGIN { print l * 100 }')
    for h in "${HOSTS[@]}"; do
      in_ns "$h" tc qdisc replace dev eth0 root netem delay "${1}ms" "${2}ms" loss "${pct}%" || return 1
    done
  else
    impair_off
    ip netns exec "$P-br" "$PY" "$HELPER" impair --ports "$(printf 'p-%s,' "${HOSTS[@]}" | sed 's/,$//')" \
      --delay-ms "$1" --jitter-ms "$2" --loss "$3" >>"$WORK/impair.log" 2>&1 &
    IMPAIR_PID=$!
    wait_line "$WORK/impair.log" "^IMPAIRING" 5 || return 1
    local h
    for h in "${HOSTS[@]}"; do ip -n "$P-br" link set "p-$h" nomaster; done
  fi
}
impair_off() {
  if [ "$IMPAIR_MODE" = netem ]; then
    local h
    for h in "${HOSTS[@]}"; do in_ns "$h" tc qdisc del dev eth0 root 2>/dev/null; done
  elif [ -n "$IMPAIR_PID" ]; then
    local h
    for h in "${HOSTS[@]}"; do ip -n "$P-br" link set "p-$h" master br0; done
    kill -TERM "$IMPAIR_PID" 2>/dev/null
    wait "$IMPAIR_PID" 2>/dev/null
    IMPAIR_PID=""
  fi
}
s4() {
  local dur
  dur=$(awk -v s="$SCALE" 'BEGIN { print 10 * s }')
  local how="tc netem on every host's eth0"
  if [ "$IMPAIR_MODE" = userspace ]; then
    how="the userspace switch (no sch_netem in this kernel), baseline through it at 0 ms / 0 %"
    # frames pass through a packet socket: the hosts must send them whole and checksummed
    local h
    for h in "${HOSTS[@]}"; do in_ns "$h" "$PY" "$HELPER" offloads-off eth0; done
    impair_on 0 0 0 || {
      verdict 4 "delay+loss" 0 "the userspace switch did not start: $(tail -3 "$WORK/impair.log")"
      return
    }
    sleep 1
  fi
  helper load --targets "$TARGETS" --duration "$dur" --concurrency 4 --tag s4a --out "$WORK/s4a.jsonl"
  impair_on 50 10 0.01 || {
    impair_off
    verdict 4 "delay+loss" 0 "could not apply the impairment ($IMPAIR_MODE)"
    return
  }
  rm -f "$WORK/stop"
  helper watch --admins "$ADMINS" --token "$ADMIN_TOKEN" --stop-file "$WORK/stop" \
    --interval 0.2 >"$WORK/s4-watch.log" 2>&1 &
  local watch=$!
  sleep 1
  helper load --targets "$TARGETS" --duration "$dur" --concurrency 4 --tag s4b --out "$WORK/s4b.jsonl"
  touch "$WORK/stop"
  wait "$watch"
  impair_off
  local a b
  a=$(helper report "$WORK/s4a.jsonl")
  b=$(helper report "$WORK/s4b.jsonl")
  local changes
  # a router's list short of a worker while impaired (an admin poll that timed out, a
  # lost SYN costs 1 s, is no change)
  changes=$(awk '$3!="w1,w2,w3" && $3!="DOWN"' "$WORK/s4-watch.log" | wc -l)
  local d50 d95 ok=0
  d50=$(awk -v x="$(report_field "$b" p50_ms)" -v y="$(report_field "$a" p50_ms)" 'BEGIN { printf "%.0f", x - y }')
  d95=$(awk -v x="$(report_field "$b" p95_ms)" -v y="$(report_field "$a" p95_ms)" 'BEGIN { printf "%.0f", x - y }')
  # the impairment must show (a request crosses six one-way delays, +300 ms: SYN, SYN-ACK,
  # request, router to worker and back, answer; half is asked) and every request succeed
  [ "$(report_field "$a" errors)" = 0 ] && [ "$(report_field "$b" errors)" = 0 ] &&
    [ "$(report_field "$b" requests)" -ge 10 ] && [ "$d50" -ge 150 ] && ok=1
  verdict 4 "delay+loss" "$ok" "50 ms ± 10 ms, 1 % loss by $how:" \
    "$(report_field "$b" requests) requests, $(report_field "$b" errors) errors," \
    "p50 $(report_field "$b" p50_ms) ms p95 $(report_field "$b" p95_ms) ms (failed over: $(report_field "$b" retried));" \
    "without: $(report_field "$a" requests) requests, $(report_field "$a" errors) errors," \
    "p50 $(report_field "$a" p50_ms) ms p95 $(report_field "$a" p95_ms) ms; added p50 +$d50 ms p95 +$d95 ms;" \
    "a router short of a worker meanwhile: $changes time(s)$([ "$ok" = 1 ] || say "; $(report_field "$b" first_errors)")"
}

# ---- 5: a static upstream behind HTTPS with an API key ---------------------------------
s5() {
  helper load --targets "$TARGETS" --model ext-model --requests 20 --concurrency 2 \
    --api-key "$CLIENT_KEY" --expect-text "hello from a server that is not Switchyard" \
    --tag s5 --out "$WORK/s5.jsonl"
  local r
  r=$(helper report "$WORK/s5.jsonl")
  local pools seen
  pools=$("$PY" -c 'import json,sys; print(",".join(sorted({json.loads(l)["pool"] or "-" for l in open(sys.argv[1])})))' "$WORK/s5.jsonl")
  # what the upstream saw: the pool's key on every request, never the client's
  seen=$(in_ns cl "$PY" - "$WORK/ca.pem" "${ADDR[up]}" "$UP_NAME" "$UP_KEY" "$CLIENT_KEY" <<'EOF'
import http.client, json, ssl, sys
ca, addr, name, key, client_key = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
c = http.client.HTTPSConnection(addr, 8443, context=ctx, timeout=5)
c.request("GET", "/seen")
seen = json.loads(c.getresponse().read())
good = sum(1 for s in seen if s["authorization"] == f"Bearer {key}")
leaked = sum(1 for s in seen if client_key in (s["authorization"] or ""))
hosts = sorted({s["host"] for s in seen})
print(f"{len(seen)} {good} {leaked} {','.join(hosts)}")
EOF
  )
  local n_seen good leaked hosts ok=0
  read -r n_seen good leaked hosts <<<"$seen"
  [ "$(report_field "$r" errors)" = 0 ] && [ "$pools" = ext ] && [ "${n_seen:-0}" -ge 20 ] &&
    [ "$good" = "$n_seen" ] && [ "$leaked" = 0 ] && ok=1
  verdict 5 "https upstream" "$ok" "$(report_field "$r" requests) requests for ext-model via both" \
    "routers to https://${ADDR[up]}:8443 (CA-verified as $UP_NAME, openssl CLI PKI):" \
    "$(report_field "$r" errors) errors, pool $pools, p50 $(report_field "$r" p50_ms) ms" \
    "p95 $(report_field "$r" p95_ms) ms; the upstream saw $n_seen requests, $good with the pool's key," \
    "$leaked with the client's, Host $hosts$([ "$ok" = 1 ] || say "; $(report_field "$r" first_errors)")"
}

for n in 1 2 3 4 5; do
  case ",$ONLY," in *",$n,"*) "s$n" ;; esac
done
say "multihost: $(($(date +%s) - T_START)) s in all"
if [ "$FAILED" != 0 ]; then
  [ "${MULTIHOST_KEEP:-0}" = 1 ] || say "(MULTIHOST_KEEP=1 keeps every log and the load runs' records)"
  for f in r1 r2 w1 w2 w3; do
    say "--- $f.log (last warnings)"
    grep -v '"level":"INFO"' "$WORK/$f.log" | tail -n 5
  done
  exit 1
fi
exit 0
