#!/usr/bin/env bash
# shellcheck disable=SC2317,SC2016 # functions called indirectly (trap, "start_router_$how"); sh -c scripts
# Checks the image deploy/image/build.sh wrote (issue #19): first what it contains, with no
# container runtime (the OCI archive unpacked; its binaries run in the unpacked root
# filesystem with chroot), then the image itself run with podman. See docs/container.md.
#
#   sudo deploy/image/check.sh [--archive FILE] [--no-run] [--no-install]
#
#   --archive FILE  the OCI archive (default deploy/image/out/switchyard.oci.tar)
#   --model FILE    a model for the worker smoke test when the image has none (default
#                   models/SmolLM2-135M-Instruct.Q4_1.gguf when present; mounted, not copied)
#   --no-run        content checks and the chroot smoke test only; no podman
#   --no-install    do not apt-get install podman/runc when missing
#   --keep          keep the work directory
#
# One line per check: PASS, FAIL, NOTE, SKIP. Exit 1 if any content or smoke check failed.
# A container runtime that cannot start containers on this machine is not a failure of the
# image: that prints "SKIP running: <the runtime's own error>" and the exit status is that
# of the other checks.
#
# The smoke test (in the chroot, then in a container): the router as deploy/k8s runs it
# (user 65532, read-only root, no capabilities in the container) with the demo overlay's
# rules, /healthz and /readyz; with a model, a worker (--backend sim) that registers,
# a chat completion through the router, the preStop hook (`switchyard preempt`) draining the
# worker, and the router exiting 0 on SIGTERM. Networking: loopback ports on the host's
# network (no bridge, no iptables needed).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
archive="$here/out/switchyard.oci.tar"
model=""
run=1
install=1
keep=0
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
while [ $# -gt 0 ]; do
  case "$1" in
    --archive) archive=$(abspath "${2:?}"); shift 2 ;;
    --archive=*) archive=$(abspath "${1#*=}"); shift ;;
    --model) model=$(abspath "${2:?}"); shift 2 ;;
    --model=*) model=$(abspath "${1#*=}"); shift ;;
    --no-run) run=0; shift ;;
    --no-install) install=0; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "check.sh: run as root (chroot, mounts, podman)" >&2; exit 2; }
[ -f "$archive" ] || { echo "check.sh: no $archive: run deploy/image/build.sh first" >&2; exit 2; }

fails=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; fails=$((fails + 1)); }
note() { echo "NOTE $*"; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
start=$(date +%s)

work=$(mktemp -d "${TMPDIR:-/var/tmp}/switchyard-check.XXXXXX")
root="$work/rootfs"
P=()           # podman with a private store, set below
bg_pids=()     # background unshare/chroot processes
containers=()  # podman containers
cleanup() {
  set +e
  for c in "${containers[@]}"; do "${P[@]}" rm -f -t 0 "$c" >/dev/null 2>&1; done
  for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${bg_pids[@]}"; do wait "$p" 2>/dev/null; done
  # What podman may have left mounted under the work directory (shm, the container's root).
  awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
  if [ "$keep" -eq 1 ]; then echo "work directory kept: $work"; else
    chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"; fi
}
trap cleanup EXIT

# --- the archive and the image's config ----------------------------------------------------
echo "== the archive: $archive ($(du -h "$archive" | cut -f1))"
mkdir -p "$work/oci" "$root"
tar -C "$work/oci" -xf "$archive"
# Verifies the OCI layout (index, manifest, config, every blob's digest) and the config;
# prints PASS/FAIL lines, then "LAYER <media type> <file>" and "VAR name value" lines.
python3 - "$work/oci" "$(git -C "$repo" rev-parse HEAD 2>/dev/null || true)" > "$work/config.out" <<'PY'
import hashlib, json, os, re, sys
oci, head = sys.argv[1], sys.argv[2]
def out(*a): print(*a, flush=True)
def ok(c, what): out(("PASS " if c else "FAIL ") + what); return c
def blob(d):
    alg, hexd = d.split(":", 1)
    p = os.path.join(oci, "blobs", alg, hexd)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""): h.update(chunk)
    ok(h.hexdigest() == hexd, f"blob {d[:19]}… matches its digest")
    return p
layout = json.load(open(os.path.join(oci, "oci-layout")))
ok(layout.get("imageLayoutVersion") == "1.0.0", "oci-layout 1.0.0")
index = json.load(open(os.path.join(oci, "index.json")))
ms = index.get("manifests", [])
ok(len(ms) == 1, f"index.json holds one manifest ({len(ms)})")
m0 = ms[0]
ref = m0.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
out(f"VAR ref {ref}")
manifest = json.load(open(blob(m0["digest"])))
ok(manifest.get("mediaType") == "application/vnd.oci.image.manifest.v1+json", "OCI image manifest")
cfg = json.load(open(blob(manifest["config"]["digest"])))
for l in manifest["layers"]:
    out(f"LAYER {l['mediaType']} {blob(l['digest'])}")
c = cfg.get("config", {})
ok(cfg.get("os") == "linux" and cfg.get("architecture") == "amd64", f"platform {cfg.get('os')}/{cfg.get('architecture')}")
ok(c.get("Entrypoint") == ["/usr/local/bin/switchyard"], f"entrypoint {c.get('Entrypoint')}")
out(f"NOTE cmd {c.get('Cmd')}")
user = c.get("User", "")
uid = user.split(":")[0]
ok(uid != "" and uid != "0" and uid != "root", f"user {user!r} is not root")
out(f"VAR user {user}")
ports = set(c.get("ExposedPorts", {}))
want = {"8080/tcp", "50051/tcp", "9090/tcp"}
ok(want <= ports, f"exposed ports {sorted(ports)} (want {sorted(want)})")
labels = c.get("Labels") or {}
for k in sorted(labels):
    out(f"NOTE label {k}={labels[k]}")
src = labels.get("org.opencontainers.image.source", "")
ok(bool(src), f"label org.opencontainers.image.source={src!r}")
rev = labels.get("org.opencontainers.image.revision", "")
ok(re.fullmatch(r"[0-9a-f]{40}", rev) is not None, f"label org.opencontainers.image.revision={rev!r} is a commit")
if head and rev and rev != head:
    out(f"NOTE the image was built from {rev[:12]}, the checkout is at {head[:12]}")
out(f"VAR version {labels.get('org.opencontainers.image.version', '')}")
out(f"VAR model {labels.get('io.switchyard.image.model', 'none')}")
PY
grep -E '^(PASS|FAIL|NOTE)' "$work/config.out"
fails=$((fails + $(grep -c '^FAIL' "$work/config.out" || true)))
var() { awk -v k="$1" '$1 == "VAR" && $2 == k {sub(/^VAR [^ ]+ ?/, ""); print; exit}' "$work/config.out"; }
ref=$(var ref); user=$(var user); version=$(var version); image_model=$(var model)
image_uid=${user%%:*}

# deploy/k8s names the image `switchyard` (and `switchyard-cuda` for GPU workers).
k8s_images=$(grep -rhoE '^\s+image:\s*\S+' "$repo/deploy/k8s/base" "$repo/deploy/k8s/workers" 2>/dev/null | awk '{print $2}' | sort -u | tr '\n' ' ')
check "image name ${ref%%:*} (tag ${ref#*:}) is the one deploy/k8s uses (image: ${k8s_images% })" \
  grep -rqE "^\s+image:\s*${ref%%:*}\s*$" "$repo/deploy/k8s/base" "$repo/deploy/k8s/workers"

# --- the root filesystem ----------------------------------------------------------------------
echo "== the root filesystem"
while read -r _ mt file; do
  case "$mt" in
    *tar+gzip) tar -C "$root" --numeric-owner -xzpf "$file" ;;
    *tar+zstd) zstd -dc "$file" | tar -C "$root" --numeric-owner -xpf - ;;
    *tar) tar -C "$root" --numeric-owner -xpf "$file" ;;
    *) fail "layer media type $mt not handled"; continue ;;
  esac
  # Whiteouts (a later layer deleting a file of an earlier one).
  find "$root" -name '.wh.*' | while read -r wh; do
    gone="$(dirname "$wh")/$(basename "$wh" | sed 's/^\.wh\.//')"
    if [ "$(basename "$wh")" = .wh..wh..opq ]; then rm -f "$wh"; else rm -rf "${gone:?}" "$wh"; fi
  done
done < <(grep '^LAYER ' "$work/config.out")
note "unpacked: $(du -sh "$root" | cut -f1) ($(grep -c '^LAYER ' "$work/config.out") layer(s))"

for b in switchyard switchyard-worker; do
  f="$root/usr/local/bin/$b"
  check "/usr/local/bin/$b: root-owned executable, mode 0755, $(du -h "$f" 2>/dev/null | cut -f1)" \
    test -f "$f" -a "$(stat -c '%u:%g %a' "$f" 2>/dev/null)" = "0:0 755"
done
if grep -q ":x:$image_uid:" "$root/etc/passwd" 2>/dev/null; then
  pass "user $user in /etc/passwd: $(awk -F: -v u="$image_uid" '$3 == u {print $1}' "$root/etc/passwd")"
else
  fail "user $user not in /etc/passwd"
fi
grep -q ':x:65532:' "$root/etc/passwd" && note "UID 65532 (deploy/k8s runAsUser) is in /etc/passwd as $(awk -F: '$3 == 65532 {print $1}' "$root/etc/passwd")"
suid=$(find "$root" -xdev -type f -perm /6000 -printf '/%P\n')
check "no setuid/setgid files${suid:+: $suid}" test -z "$suid"
ww=$(find "$root" -xdev \( -type f -o \( -type d ! -perm -1000 \) \) -perm -0002 -printf '/%P\n' | tr '\n' ' ')
check "no world-writable file, nor directory without the sticky bit${ww:+: $ww}" test -z "$ww"
check "/tmp is mode 1777" test "$(stat -c %a "$root/tmp")" = 1777
n_certs=$(grep -c 'BEGIN CERTIFICATE' "$root/etc/ssl/certs/ca-certificates.crt" 2>/dev/null || true)
check "CA bundle /etc/ssl/certs/ca-certificates.crt: ${n_certs:-0} certificates" test "${n_certs:-0}" -gt 100
# shellcheck disable=SC1091
os=$(. "$root/etc/os-release" && echo "$PRETTY_NAME")
libc=$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Version}' libc6 2>/dev/null || true)
check "$os, libc6 $libc (dpkg status of $(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package}\n' | wc -l) packages)" test -n "$libc"
host_libc=$(dpkg-query -W -f='${Version}' libc6 2>/dev/null || true)
[ -z "$host_libc" ] || [ "$host_libc" = "$libc" ] || note "this host's libc6 is $host_libc, the image's $libc"
if command -v objdump >/dev/null; then
  have=${libc%%-*}
  for b in switchyard switchyard-worker; do
    need=$(objdump -T "$root/usr/local/bin/$b" | grep -oE 'GLIBC_[0-9]+\.[0-9]+' | sed 's/GLIBC_//' | sort -uV | tail -1)
    check "$b needs glibc ${need:-?}, the image has $have" \
      test "$(printf '%s\n%s\n' "$need" "$have" | sort -V | tail -1)" = "$have"
  done
fi
[ -e "$root/bin/sh" ] || [ -e "$root/usr/bin/sh" ] || note "no shell in the image (kubectl exec sh fails; deploy/k8s's hooks need none)"
if [ "$image_model" != none ]; then
  check "model $image_model: readable by all, $(du -h "$root$image_model" 2>/dev/null | cut -f1)" \
    test -f "$root$image_model" -a "$(stat -c %a "$root$image_model" 2>/dev/null)" = 644
fi

# --- the binaries, in the root filesystem (chroot) -------------------------------------------
echo "== the binaries in the root filesystem (chroot, as the image's user $user)"
# A private mount namespace per command: /proc and /dev mounted as a runtime would, gone when
# it exits. The environment is the image's, not this shell's.
# root_cmd USER[:GROUP] [VAR=value...] -- command... sets RC to the command line; in_root runs
# it. Run in the background, "${RC[@]}" & gives unshare's PID, whose only child is the command.
chroot_bin=$(command -v chroot)
root_cmd() {
  local u=$1; shift; local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  RC=(env -i PATH=/usr/local/bin:/usr/bin:/bin CHROOT="$chroot_bin" "${envs[@]}"
    unshare --mount --fork --kill-child=SIGTERM -- sh -c '
      r=$1; u=$2; shift 2
      mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" || exit 125
      if [ -n "${MOUNT_MODEL:-}" ]; then mount --bind "$MOUNT_MODEL" "$r$MODEL_PATH" || exit 125; fi
      exec "$CHROOT" --userspec="$u" "$r" "$@"' sh "$root" "$u" "$@")
}
in_root() { root_cmd "$@"; "${RC[@]}"; }
quiet() { "$@" >/dev/null 2>&1; }
chroot_u="$image_uid:$image_uid"
loader=/lib64/ld-linux-x86-64.so.2
for b in switchyard switchyard-worker; do
  libs=$(in_root "$chroot_u" -- $loader --list "/usr/local/bin/$b" 2>&1) || true
  if [ -n "$libs" ] && ! grep -q 'not found' <<<"$libs" && grep -q 'libc.so.6 => /' <<<"$libs"; then
    pass "$b: the image's loader resolves every library: $(awk '/=>/{print $1}' <<<"$libs" | tr '\n' ' ')"
  else
    fail "$b: the image's loader: $libs"
  fi
done
out=$(in_root "$chroot_u" -- /usr/local/bin/switchyard --version 2>&1) || true
check "switchyard --version: $out" test "$out" = "switchyard $version"
check "switchyard --help" quiet in_root "$chroot_u" -- /usr/local/bin/switchyard --help
check "switchyard-worker --help" quiet in_root "$chroot_u" -- /usr/local/bin/switchyard-worker --help
out=$(in_root 65532:65532 -- /usr/local/bin/switchyard --version 2>&1) || true
check "as UID 65532 (deploy/k8s runAsUser): switchyard --version: $out" test "$out" = "switchyard $version"
mkdir -p "$root/etc/switchyard/base" "$root/etc/switchyard/demo" "$root/etc/switchyard/broken"
cp "$repo/deploy/k8s/base/rules.yaml" "$root/etc/switchyard/base/rules.yaml"
cp "$repo/deploy/k8s/overlays/demo/rules.yaml" "$root/etc/switchyard/demo/rules.yaml"
printf 'version: 1\npools:\n  cpu: { class: cpu, capacity: on_demand }\nrules:\n  - name: all\n    route: [gpu]\n' \
  > "$root/etc/switchyard/broken/rules.yaml"
for r in base demo; do
  out=$(in_root "$chroot_u" -- /usr/local/bin/switchyard rules check "/etc/switchyard/$r/rules.yaml" 2>&1) || true
  check "switchyard rules check deploy/k8s $r rules.yaml: $out" grep -q ': ok (' <<<"$out"
done
rc=0; in_root "$chroot_u" -- /usr/local/bin/switchyard rules check /etc/switchyard/broken/rules.yaml >/dev/null 2>&1 || rc=$?
check "switchyard rules check rejects a broken file (exit $rc)" test "$rc" -eq 1

# --- smoke test: router (and worker) serving -------------------------------------------------
model_src=""
model_path=/models/SmolLM2-135M-Instruct.Q4_1.gguf   # where deploy/k8s's rules and workers look
if [ "$image_model" != none ]; then
  model_path=$image_model
elif [ -n "$model" ]; then
  model_src=$model
elif [ -f "$repo/models/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  model_src="$repo/models/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
have_model=0
if [ "$image_model" != none ] || [ -n "$model_src" ]; then have_model=1; fi

free_ports() { python3 -c 'import socket
ss=[socket.socket() for _ in range(4)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(" ".join(str(s.getsockname()[1]) for s in ss))'; }
http_code() { curl -s -o /dev/null -m 3 -w '%{http_code}' "$@" || true; }
wait_code() { # wait_code WANT SECONDS URL [COMMAND: gives up as soon as it fails]
  local want=$1 t=$2 url=$3 i code=""; shift 3
  for ((i = 0; i < t * 5; i++)); do
    code=$(http_code "$url"); [ "$code" = "$want" ] && return 0
    if [ $# -gt 0 ] && ! "$@"; then echo "(the process exited)"; return 1; fi
    sleep 0.2
  done
  echo "(last answer: ${code:-none})"; return 1
}

# smoke RUNNER: RUNNER is chroot or podman; the functions below differ between them.
smoke() {
  local how=$1 p g a w reg=check-registry-token
  read -r p g a w < <(free_ports)
  local router_args=(serve --rules=/etc/switchyard/rules.yaml "--listen=127.0.0.1:$p" "--grpc=127.0.0.1:$g"
    "--admin=127.0.0.1:$a" --shutdown-grace-s=5 --threads=2 --max-buffered-bytes=268435456)
  start_router "$how" "$reg" "${router_args[@]}" || { fail "$how: router did not start: $(tail -5 "$work/$how-router.log")"; return; }
  if out=$(wait_code 200 30 "http://127.0.0.1:$a/healthz" alive "$how" router); then
    pass "$how: router /healthz 200"
  else
    fail "$how: router /healthz $out: $(tail -5 "$work/$how-router.log")"; stop_router "$how"; return
  fi
  check "$how: router /readyz 503 before any worker" test "$(http_code "http://127.0.0.1:$a/readyz")" = 503
  if [ "$have_model" -eq 1 ]; then
    local worker_args=(--model="$model_path" --model-name=smollm2 --backend=sim "--listen=127.0.0.1:$w"
      "--router=http://127.0.0.1:$g" --pool=cpu --worker-id=check-worker --drain-timeout-s=10 --log-format=json)
    if start_worker "$how" "$reg" "${worker_args[@]}" && out=$(wait_code 200 60 "http://127.0.0.1:$a/readyz" alive "$how" worker); then
      pass "$how: worker (--backend sim) registered: router /readyz 200"
      local body
      body=$(curl -s -m 30 "http://127.0.0.1:$p/v1/chat/completions" -H 'content-type: application/json' \
        -d '{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":8}' || true)
      check "$how: a chat completion through the router: ${body:0:120}" grep -q '"choices"' <<<"$body"
      if preempt_worker "$how" "$w"; then
        pass "$how: preStop hook \`switchyard preempt --worker http://127.0.0.1:$w --deadline-s 20\`: worker drained and exited ($preempt_msg)"
      else
        fail "$how: switchyard preempt: $preempt_msg: $(tail -3 "$work/$how-preempt.log")"
      fi
      if out=$(wait_code 503 15 "http://127.0.0.1:$a/readyz"); then
        pass "$how: router /readyz 503 once the worker left"
      else
        fail "$how: router /readyz after the worker left $out"
      fi
    else
      fail "$how: worker did not register ${out:-}: $(tail -5 "$work/$how-worker.log")"
    fi
    stop_worker "$how"
  else
    note "$how: no model (none in the image, no models/SmolLM2-135M-Instruct.Q4_1.gguf, no --model): worker not started"
  fi
  local t0
  t0=$(date +%s%N)
  stop_router "$how"
  check "$how: router exits 0 on SIGTERM (exit $stop_rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms)" test "$stop_rc" = 0
}

# chroot runner: the router as UID 65532 (deploy/k8s's runAsUser), the worker as the image's user.
router_pid=""; worker_pid=""
start_router_chroot() {
  local reg=$1; shift
  mkdir -p "$root/etc/switchyard"; cp "$repo/deploy/k8s/overlays/demo/rules.yaml" "$root/etc/switchyard/rules.yaml"
  local m=()
  if [ -n "$model_src" ]; then mkdir -p "$root/models"; touch "$root$model_path"; m=(MOUNT_MODEL="$model_src" MODEL_PATH="$model_path"); fi
  root_cmd 65532:65532 SWITCHYARD_REGISTRY_TOKEN="$reg" SWITCHYARD_LOG_FORMAT=json "${m[@]}" -- /usr/local/bin/switchyard "$@"
  "${RC[@]}" > "$work/chroot-router.log" 2>&1 &
  router_pid=$!; bg_pids+=("$router_pid")
}
start_worker_chroot() {
  local reg=$1; shift; local m=()
  [ -z "$model_src" ] || m=(MOUNT_MODEL="$model_src" MODEL_PATH="$model_path")
  root_cmd "$chroot_u" SWITCHYARD_REGISTRY_TOKEN="$reg" "${m[@]}" -- /usr/local/bin/switchyard-worker "$@"
  "${RC[@]}" > "$work/chroot-worker.log" 2>&1 &
  worker_pid=$!; bg_pids+=("$worker_pid")
}
preempt_worker_chroot() { # sets preempt_msg
  local rc=0 wrc=0
  in_root "$chroot_u" -- /usr/local/bin/switchyard preempt --worker "http://127.0.0.1:$1" --deadline-s 20 \
    > "$work/chroot-preempt.log" 2>&1 || rc=$?
  if kill -0 "$worker_pid" 2>/dev/null; then preempt_msg="preempt exit $rc, the worker still running"; return 1; fi
  wait "$worker_pid" || wrc=$?
  preempt_msg="preempt exit $rc, worker exit $wrc"
  [ "$rc" -eq 0 ] && [ "$wrc" -eq 0 ]
}
stop_worker_chroot() { kill "$worker_pid" 2>/dev/null || true; wait "$worker_pid" 2>/dev/null || true; }
stop_router_chroot() { # sets stop_rc
  # SIGTERM to the router itself (unshare's child); unshare exits with its status.
  local child
  child=$(pgrep -P "$router_pid" | head -1) || true
  kill -TERM "${child:-$router_pid}" 2>/dev/null || true
  stop_rc=0; wait "$router_pid" 2>/dev/null || stop_rc=$?
}

# podman runner: as deploy/k8s runs the pods: user 65532, read-only root with a /tmp, every
# capability dropped, no privilege escalation; rules mounted read-only at /etc/switchyard.
run_flags=()
start_router_podman() {
  local reg=$1; shift
  mkdir -p "$work/rules"; cp "$repo/deploy/k8s/overlays/demo/rules.yaml" "$work/rules/rules.yaml"
  local m=(); [ -z "$model_src" ] || m=(-v "$model_src:$model_path:ro")
  "${P[@]}" run -d --name sy-check-router "${run_flags[@]}" --network host --read-only --tmpfs /tmp \
    --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges \
    -v "$work/rules:/etc/switchyard:ro" "${m[@]}" \
    -e SWITCHYARD_REGISTRY_TOKEN="$reg" -e SWITCHYARD_LOG_FORMAT=json "$image" "$@" \
    > "$work/podman-router.log" 2>&1 || return 1
  containers+=(sy-check-router)
}
start_worker_podman() {
  local reg=$1; shift
  local m=(); [ -z "$model_src" ] || m=(-v "$model_src:$model_path:ro")
  "${P[@]}" run -d --name sy-check-worker "${run_flags[@]}" --network host --read-only --tmpfs /tmp \
    --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges "${m[@]}" \
    -e SWITCHYARD_REGISTRY_TOKEN="$reg" --entrypoint /usr/local/bin/switchyard-worker "$image" "$@" \
    > "$work/podman-worker.log" 2>&1 || return 1
  containers+=(sy-check-worker)
}
preempt_worker_podman() { # sets preempt_msg
  # The preStop hook: exec'd in the worker's container, as deploy/k8s's cpu worker has it.
  # preempt waits for the worker to exit; the worker is the container's PID 1, so its exit
  # ends the container and kills the exec'd preempt (137). Passes on the worker's exit 0.
  local rc=0 i state
  "${P[@]}" exec sy-check-worker /usr/local/bin/switchyard preempt --worker "http://127.0.0.1:$1" --deadline-s 20 \
    > "$work/podman-preempt.log" 2>&1 || rc=$?
  for ((i = 0; i < 50; i++)); do
    state=$("${P[@]}" inspect -f '{{.State.Running}} {{.State.ExitCode}}' sy-check-worker 2>&1)
    [ "${state%% *}" = false ] && break; sleep 0.2
  done
  preempt_msg="exec of preempt exit $rc, worker container exit ${state#* }"
  if [ "$rc" -ne 0 ]; then
    preempt_msg+="; the exec'd preempt was killed when the worker, PID 1, exited: Kubernetes would report this preStop hook as failed although the drain completed"
  fi
  [ "$state" = "false 0" ]
}
stop_worker_podman() { "${P[@]}" logs sy-check-worker >> "$work/podman-worker.log" 2>&1 || true; "${P[@]}" rm -f -t 2 sy-check-worker >/dev/null 2>&1 || true; }
stop_router_podman() { # sets stop_rc
  "${P[@]}" stop -t 15 sy-check-router >/dev/null 2>&1 || true
  "${P[@]}" logs sy-check-router >> "$work/podman-router.log" 2>&1 || true
  stop_rc=$("${P[@]}" inspect -f '{{.State.ExitCode}}' sy-check-router 2>/dev/null) || stop_rc="?"
}
alive() { # alive RUNNER router|worker
  if [ "$1" = chroot ]; then local v="${2}_pid"; kill -0 "${!v}" 2>/dev/null
  else [ "$("${P[@]}" inspect -f '{{.State.Running}}' "sy-check-$2" 2>/dev/null)" = true ]; fi
}
start_router() { local how=$1; shift; "start_router_$how" "$@"; }
start_worker() { local how=$1; shift; "start_worker_$how" "$@"; }
preempt_worker() { local how=$1; shift; "preempt_worker_$how" "$@"; }
stop_worker() { "stop_worker_$1"; }
stop_router() { "stop_router_$1"; }

echo "== smoke test in the chroot (no container runtime)"
smoke chroot

finish() {
  echo "== $fails failed check(s), $(( $(date +%s) - start )) s"
  [ "$fails" -eq 0 ] && exit 0
  exit 1
}
[ "$run" -eq 1 ] || { echo "SKIP running: --no-run"; finish; }

# --- the image, run --------------------------------------------------------------------------
echo "== the image, run with podman"
if ! command -v podman >/dev/null; then
  if [ "$install" -eq 1 ] && command -v apt-get >/dev/null; then
    echo "installing podman (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends podman runc >/dev/null 2>&1 || true
  fi
  command -v podman >/dev/null || { echo "SKIP running: podman is not installed"; finish; }
fi
# A private store, no systemd, no journald: nothing of this machine's containers touched.
P=(podman --root "$work/storage" --runroot "$work/run" --tmpdir "$work/tmp" --storage-driver vfs
   --cgroup-manager cgroupfs --events-backend file)
if ! out=$("${P[@]}" load -i "$archive" 2>&1); then echo "SKIP running: podman load: $out"; finish; fi
image=$(sed -n 's/^Loaded image[^:]*: //p' <<<"$out" | head -1)
[ -n "$image" ] || image=$("${P[@]}" images -q 2>/dev/null | head -1) || true
check "podman load: $image" test -n "$image"

# Try podman's defaults first; then what is known to stand in the way in sandboxes: rlimits
# above this machine's hard limits (podman asks for nofile 1048576, nproc 4194304 as root),
# crun refusing a hybrid cgroup v1/v2 hierarchy (runc accepts it). Every refusal is printed.
hard_nofile=$(ulimit -Hn); [ "$hard_nofile" = unlimited ] && hard_nofile=1048576
[ "$hard_nofile" -le 1048576 ] || hard_nofile=1048576
lowered=(--ulimit "nofile=$hard_nofile:$hard_nofile" --ulimit nproc=4096:4096)
attempts=("" "${lowered[*]}")
if command -v runc >/dev/null; then attempts+=("--runtime runc" "--runtime runc ${lowered[*]}"); fi
ran=0; errors=""; used=""
for flags in "${attempts[@]}"; do
  read -r -a fl <<<"$flags"
  # --runtime is a global option of podman; the rest belong to `run`.
  glob=(); rf=()
  for ((i = 0; i < ${#fl[@]}; i++)); do
    if [ "${fl[i]}" = --runtime ]; then glob+=(--runtime "${fl[i + 1]}"); i=$((i + 1)); else rf+=("${fl[i]}"); fi
  done
  if out=$("${P[@]}" "${glob[@]}" run --rm --network none "${rf[@]}" "$image" --version 2>&1) && [ "$out" = "switchyard $version" ]; then
    pass "podman ${glob[*]} run --rm --network none ${rf[*]} $image --version: $out"
    P+=("${glob[@]}"); run_flags=("${rf[@]}"); used="$flags"; ran=1; break
  fi
  echo "     podman ${glob[*]:+${glob[*]} }run ${rf[*]:+${rf[*]} }--version: $out"
  errors+="${errors:+; }[${flags:-defaults}] $out"
done
if [ "$ran" -eq 0 ]; then
  echo "SKIP running: no container could be started on this machine: $errors"
  finish
fi
[ -z "$errors" ] || note "podman ran containers here only with: $used (refused before: $errors)"

echo "== smoke test in containers"
smoke podman
finish
