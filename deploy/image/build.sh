#!/usr/bin/env bash
# Builds the Switchyard container image (issue #19) from this repository, pulling no base
# image: a minimal Debian root filesystem made with mmdebstrap from Debian's packages (only
# the packages whose libraries `ldd` says the binaries load, plus base-files, netbase and
# ca-certificates), the two binaries in /usr/local/bin, a non-root user; assembled with
# buildah from scratch and written as an OCI archive. See docs/container.md.
#
#   sudo deploy/image/build.sh                        # binaries from target/release
#   sudo deploy/image/build.sh --build                # cargo build --release first
#   sudo deploy/image/build.sh --bin-dir target/debug # any directory holding both binaries
#   sudo deploy/image/check.sh                        # what the image contains; runs it
#
# Options:
#   --bin-dir DIR      where switchyard and switchyard-worker are
#                      (default ${CARGO_TARGET_DIR:-target}/release)
#   --build            run `cargo build --release --bins -p router -p pool-worker` first
#                      (never otherwise); implies the default --bin-dir
#   --tag NAME         the image's name (default switchyard:dev: deploy/k8s names the image
#                      `switchyard`, the demo overlay tags it `dev`)
#   --out FILE         the OCI archive (default deploy/image/out/switchyard.oci.tar)
#   --docker-archive   also write deploy/image/out/switchyard.docker.tar (docker-archive:
#                      for `docker load` or `kind load image-archive`)
#   --model FILE       put a model in the image at /models/<name of FILE> (none by default;
#                      deploy/k8s's CPU workers expect /models/SmolLM2-135M-Instruct.Q4_1.gguf)
#   --strip            strip debug info (line tables) from the binaries copied in
#   --suite NAME       Debian release of the root filesystem (default: the host's, so the
#                      glibc in the image is the one the binaries were linked against)
#   --mirror URL       Debian archive (default http://deb.debian.org/debian; -updates
#                      and -security are added from it and from --security-mirror)
#   --security-mirror URL  (default http://deb.debian.org/debian-security)
#   --source URL       the org.opencontainers.image.source label (default: git remote
#                      origin's URL; without a remote, file://<this repository>)
#   --uid N            the image's user, `switchyard` (default 10001; group the same)
#   --keep-work        keep the work directory (root filesystem, buildah storage)
#
# Needs root (mmdebstrap's chrootless mode writes files owned by root; buildah mounts its
# container), mmdebstrap and buildah (installed with apt-get when missing), and a Debian
# mirror. Nothing is written outside the work directory (removed at the end unless
# --keep-work) and --out; buildah uses a private store in the work directory, not
# /var/lib/containers.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

bin_dir=""
build=0
tag="switchyard:dev"
out="$here/out/switchyard.oci.tar"
docker_archive=0
model=""
strip_bins=0
suite=""
mirror="http://deb.debian.org/debian"
security_mirror="http://deb.debian.org/debian-security"
source_url=""
uid=10001
keep_work=0

die() { echo "build.sh: $*" >&2; exit 1; }
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$(abspath "${2:?--bin-dir needs a directory}"); shift 2 ;;
    --bin-dir=*) bin_dir=$(abspath "${1#*=}"); shift ;;
    --build) build=1; shift ;;
    --tag) tag=${2:?}; shift 2 ;;
    --tag=*) tag=${1#*=}; shift ;;
    --out) out=$(abspath "${2:?}"); shift 2 ;;
    --out=*) out=$(abspath "${1#*=}"); shift ;;
    --docker-archive) docker_archive=1; shift ;;
    --model) model=$(abspath "${2:?}"); shift 2 ;;
    --model=*) model=$(abspath "${1#*=}"); shift ;;
    --strip) strip_bins=1; shift ;;
    --suite) suite=${2:?}; shift 2 ;;
    --suite=*) suite=${1#*=}; shift ;;
    --mirror) mirror=${2:?}; shift 2 ;;
    --mirror=*) mirror=${1#*=}; shift ;;
    --security-mirror) security_mirror=${2:?}; shift 2 ;;
    --security-mirror=*) security_mirror=${1#*=}; shift ;;
    --source) source_url=${2:?}; shift 2 ;;
    --source=*) source_url=${1#*=}; shift ;;
    --uid) uid=${2:?}; shift 2 ;;
    --uid=*) uid=${1#*=}; shift ;;
    --keep-work) keep_work=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown option $1 (--help lists them)" ;;
  esac
done

case "$uid" in ''|*[!0-9]*) die "--uid must be a number" ;; esac
[ "$uid" -ne 0 ] || die "--uid 0: the image's user must not be root"
[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap writes root-owned files; buildah mounts the container)"
# The paths below (x86_64-linux-gnu, the loader check.sh runs) and the image's platform are
# amd64's; other architectures are not built or tested.
[ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] || die "only amd64 (a Debian amd64 host) is supported"

start=$(date +%s)
step() { printf '[%3ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

# --- tools -------------------------------------------------------------------------------
missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v buildah >/dev/null || missing+=(buildah)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  step "installing ${missing[*]} (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } \
    || die "apt-get install ${missing[*]} failed"
fi

# --- binaries ----------------------------------------------------------------------------
if [ "$build" -eq 1 ]; then
  [ -z "$bin_dir" ] || die "--build writes target/release: leave out --bin-dir"
  step "cargo build --release --bins -p router -p pool-worker"
  (cd "$repo" && cargo build --release --bins -p router -p pool-worker)
fi
if [ -z "$bin_dir" ]; then
  target=${CARGO_TARGET_DIR:-target}
  case "$target" in /*) ;; *) target="$repo/$target" ;; esac
  bin_dir="$target/release"
fi
bins=(switchyard switchyard-worker)
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || die "no executable $bin_dir/$b (build it: cargo build --release --bins -p router -p pool-worker, or pass --build / --bin-dir)"
done
version=$("$bin_dir/switchyard" --version 2>/dev/null | awk '{print $2}') || true
[ -n "$version" ] || version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)

# The Debian packages that hold the libraries the binaries load (libc6, libgcc-s1 today).
lib_pkgs=()
for b in "${bins[@]}"; do
  deps=$(ldd "$bin_dir/$b" 2>&1) || true
  case "$deps" in *"not a dynamic executable"*|*"statically linked"*) continue ;; esac
  case "$deps" in *"not found"*) die "$b: a library is not found on this host: $deps" ;; esac
  while read -r lib; do
    # dpkg knows the path as the package ships it: /lib/... on bookworm, /usr/lib/... later.
    pkg=$(dpkg -S "$lib" 2>/dev/null | grep -v '^diversion' | head -1 | cut -d: -f1) \
      || pkg=$(dpkg -S "$(readlink -f "$lib")" 2>/dev/null | grep -v '^diversion' | head -1 | cut -d: -f1) || true
    [ -n "$pkg" ] || die "cannot tell which Debian package holds $lib (needed by $b)"
    lib_pkgs+=("$pkg")
  done < <(printf '%s\n' "$deps" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}')
done
mapfile -t lib_pkgs < <(printf '%s\n' "${lib_pkgs[@]}" | sed '/^$/d' | sort -u)

# --- root filesystem ---------------------------------------------------------------------
if [ -z "$suite" ]; then
  # shellcheck disable=SC1091
  suite=$(. /etc/os-release && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") || true
  [ -n "$suite" ] || die "the host is not Debian: name the release whose glibc matches the binaries' (--suite bookworm)"
fi
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null) || die "$repo is not a git checkout (the revision label needs one)"
dirty=false
[ -z "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ] || dirty=true
if [ -z "$source_url" ]; then
  source_url=$(git -C "$repo" remote get-url origin 2>/dev/null) || source_url="file://$repo"
fi
# Reproducible timestamps: mmdebstrap and buildah take the commit's time.
SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct)
export SOURCE_DATE_EPOCH

work=$(mktemp -d "${TMPDIR:-/var/tmp}/switchyard-image.XXXXXX")
B=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
ctr=""
cleanup() {
  if [ -n "$ctr" ]; then "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true; fi
  if [ "$keep_work" -eq 1 ]; then echo "work directory kept: $work"; else
    # vfs layers can hold read-only directories; make them removable first.
    chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"; fi
}
trap cleanup EXIT

rootfs="$work/rootfs"
packages="base-files,netbase,ca-certificates"
for pkg in "${lib_pkgs[@]}"; do packages+=",$pkg"; done
step "mmdebstrap $suite (custom, chrootless): $packages"
# chrootless: the host's dpkg installs into the directory, so the image needs no dpkg or
# shell of its own. Maintainer scripts that support DPKG_ROOT run; ca-certificates' does
# not build the bundle that way, so it is built below.
mmdebstrap --quiet --mode=chrootless --variant=custom --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*' \
  "$suite" "$rootfs" \
  "deb $mirror $suite main" "deb $mirror $suite-updates main" \
  "deb $security_mirror $suite-security main"

step "root filesystem: trim, CA bundle, users, binaries"
# What chrootless mode does not apply through --dpkgopt, and what a container must not
# carry from this host (its resolv.conf, hostname) or needs none of (device nodes: the
# runtime mounts /dev).
rm -rf "$rootfs"/usr/share/man "$rootfs"/usr/share/info "$rootfs"/usr/share/locale \
  "$rootfs"/usr/share/lintian "$rootfs"/usr/lib/x86_64-linux-gnu/gconv \
  "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old "$rootfs"/var/log/* \
  "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$rootfs/dev" -mindepth 1 -delete

# /etc/ssl/certs as ca-certificates' postinst and update-ca-certificates make it (neither
# runs in chrootless mode): every certificate enabled in /etc/ca-certificates.conf (all,
# Debian's default), a .pem link for each, and the bundle ca-certificates.crt, which
# rustls-native-certs loads for the router's HTTPS upstreams (pingora) unless a pool names
# its own CA.
certs="$rootfs/etc/ssl/certs"
mkdir -p "$certs"
(cd "$rootfs/usr/share/ca-certificates" && find . -name '*.crt' -type f | sed 's|^\./||' | LC_ALL=C sort) \
  > "$rootfs/etc/ca-certificates.conf"
: > "$certs/ca-certificates.crt"
n_certs=0
while read -r crt; do
  ln -sf "/usr/share/ca-certificates/$crt" "$certs/$(basename "$crt" .crt).pem"
  awk 1 "$rootfs/usr/share/ca-certificates/$crt" >> "$certs/ca-certificates.crt"
  n_certs=$((n_certs + 1))
done < "$rootfs/etc/ca-certificates.conf"
chmod 0644 "$rootfs/etc/ca-certificates.conf"
[ "$n_certs" -gt 100 ] || die "only $n_certs CA certificates found in the root filesystem"
chmod 0644 "$certs/ca-certificates.crt"

# Users: root, the image's user, and nonroot (65532), the UID deploy/k8s runs the pods as
# (runAsUser overrides the image's user; the entry only gives it a name).
cat > "$rootfs/etc/passwd" <<EOF
root:x:0:0:root:/root:/usr/sbin/nologin
switchyard:x:$uid:$uid:switchyard:/nonexistent:/usr/sbin/nologin
nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat > "$rootfs/etc/group" <<EOF
root:x:0:
switchyard:x:$uid:
nonroot:x:65532:
nogroup:x:65534:
EOF
printf 'root:*::0:::::\nswitchyard:*::0:::::\nnonroot:*::0:::::\nnobody:*::0:::::\n' > "$rootfs/etc/shadow"
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"; chmod 0640 "$rootfs/etc/shadow"
cat > "$rootfs/etc/nsswitch.conf" <<'EOF'
passwd:    files
group:     files
shadow:    files
hosts:     files dns
networks:  files
protocols: files
services:  files
EOF

rootfs_kb=$(du -sk "$rootfs" | cut -f1)   # Debian's part, before the binaries and model
install -d -m 0755 "$rootfs/usr/local/bin" "$rootfs/etc/switchyard" "$rootfs/models"
for b in "${bins[@]}"; do
  install -m 0755 -o 0 -g 0 "$bin_dir/$b" "$rootfs/usr/local/bin/$b"
  if [ "$strip_bins" -eq 1 ]; then strip --strip-debug "$rootfs/usr/local/bin/$b"; fi
done
model_label=none
if [ -n "$model" ]; then
  [ -f "$model" ] || die "--model $model: no such file"
  install -m 0644 -o 0 -g 0 "$model" "$rootfs/models/$(basename "$model")"
  model_label="/models/$(basename "$model")"
fi
chmod 1777 "$rootfs/tmp"
# Every file the commit's time, so the layer depends on the inputs only.
find "$rootfs" -newermt "@$SOURCE_DATE_EPOCH" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} + 2>/dev/null || true

# --- image -------------------------------------------------------------------------------
step "buildah: from scratch, copy the root filesystem, config, commit"
ctr=$("${B[@]}" from --name switchyard-image-build scratch)
mnt=$("${B[@]}" mount "$ctr")
tar -C "$rootfs" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
"${B[@]}" umount "$ctr" >/dev/null

rootfs_pkgs=$(dpkg-query --admindir="$rootfs/var/lib/dpkg" -W -f='${Package}=${Version} ' | sed 's/ $//')
"${B[@]}" config \
  --os linux --arch amd64 \
  --entrypoint '["/usr/local/bin/switchyard"]' \
  --cmd '["serve","--rules=/etc/switchyard/rules.yaml","--listen=0.0.0.0:8080","--grpc=0.0.0.0:50051","--admin=0.0.0.0:9090"]' \
  --user "$uid:$uid" \
  --workingdir / \
  --env PATH=/usr/local/bin:/usr/bin:/bin \
  --stop-signal SIGTERM \
  --port 8080/tcp --port 50051/tcp --port 9090/tcp \
  --label org.opencontainers.image.title=switchyard \
  --label "org.opencontainers.image.description=Switchyard LLM request router (switchyard) and worker / registration sidecar (switchyard-worker)" \
  --label "org.opencontainers.image.source=$source_url" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "org.opencontainers.image.version=$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label "io.switchyard.image.tree-dirty=$dirty" \
  --label "io.switchyard.image.rootfs=debian $suite (mmdebstrap custom): $rootfs_pkgs" \
  --label "io.switchyard.image.model=$model_label" \
  --created-by "deploy/image/build.sh" \
  "$ctr"

"${B[@]}" commit --quiet --format oci --timestamp "$SOURCE_DATE_EPOCH" "$ctr" "$tag" >/dev/null
mkdir -p "$(dirname "$out")"
rm -f "$out"
step "buildah push oci-archive:$out:$tag"
"${B[@]}" push --quiet "$tag" "oci-archive:$out:$tag"
if [ "$docker_archive" -eq 1 ]; then
  docker_out="$(dirname "$out")/switchyard.docker.tar"
  rm -f "$docker_out"
  step "buildah push docker-archive:$docker_out:$tag"
  "${B[@]}" push --quiet --format v2s2 "$tag" "docker-archive:$docker_out:$tag"
fi
image_id=$("${B[@]}" images --noheading --no-trunc --format '{{.ID}}' "$tag" | head -1)
unpacked_kb=$(du -sk "$rootfs" | cut -f1)

bin_sizes=""
for b in "${bins[@]}"; do bin_sizes+=" $b=$(du -h "$rootfs/usr/local/bin/$b" | cut -f1)"; done
step "done"
cat <<EOF
image      $tag  (id ${image_id#sha256:})
archive    $out  $(du -h "$out" | cut -f1) (compressed layers)
unpacked   $((unpacked_kb / 1024)) MiB: Debian $suite files $((rootfs_kb / 1024)) MiB, binaries:$bin_sizes$( [ -n "$model" ] && echo ", model $(du -h "$model" | cut -f1)")
packages   $rootfs_pkgs
revision   $revision$( [ "$dirty" = true ] && echo " (working tree has uncommitted changes)")
source     $source_url
EOF
if [ -z "$model" ]; then
  echo "note       no model in the image: deploy/k8s's CPU workers expect /models/SmolLM2-135M-Instruct.Q4_1.gguf (--model models/SmolLM2-135M-Instruct.Q4_1.gguf, or mount one)"
fi
