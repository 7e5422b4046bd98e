#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests in deploy/k8s (run by scripts/validate-k8s.sh).

1. Renders every kustomization (a directory whose kustomization.yaml is a `Kustomization`;
   components are rendered through the overlays that use them) with `kubectl kustomize`.
2. Validates every rendered object, and every YAML file no kustomization uses, against the
   Kubernetes JSON schemas bundled in kubernetes-validate (strict: unknown fields are
   errors). Kinds of CRDs (KEDA's ScaledObject) have no schema there and are checked by hand.
3. Checks what a schema cannot (see check_build): probes, resources, security context, the
   rules ConfigMap mounted as a directory, workers' preStop drain and grace period, a
   PodDisruptionBudget and exactly one autoscaler per worker Deployment, references between
   objects, the rules file against docs/rules.schema.json, workers' pools against it, the
   router Deployment's rollout, workers finding the routers through `--router-dns` and the
   headless registry Service, the prometheus-adapter rule.

Every problem is printed as `FAIL <where>: <Kind> <namespace>/<name>: <what>`; the exit
status is 1 if there was any.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
RULES_SCHEMA = ROOT / "docs" / "rules.schema.json"

# Kubernetes versions whose schemas the objects must satisfy: the oldest these manifests
# are meant for (the router's `preStop.sleep` is on by default from 1.30) and the newest
# kubernetes-validate ships. Schemas list alpha fields too: this checks names and types,
# not feature gates.
DEFAULT_VERSIONS = ["1.30.0", "1.37.0"]

# YAML files that no kustomization includes, validated on their own.
PLAIN_FILES = {
    "base/secret.example.yaml",
    "autoscaling/prometheus-adapter-rules.yaml",
}
# Kinds from CRDs, checked by hand (check_scaled_object) instead of against a schema.
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "APIService",
                  "CustomResourceDefinition", "PriorityClass", "StorageClass"}

DESIRED_METRIC = "switchyard_router_pool_desired_workers"
# `switchyard preempt` waits this long past the deadline for the worker to exit.
PREEMPT_EXIT_S = 5
# The spot / on-demand node convention of deploy/k8s/workers (Karpenter's label).
CAPACITY_LABEL = "karpenter.sh/capacity-type"
GPU_RESOURCE = "nvidia.com/gpu"
# Volume types the `restricted` Pod Security level allows (the namespace enforces it).
RESTRICTED_VOLUMES = {"configMap", "emptyDir", "secret", "projected", "downwardAPI",
                      "persistentVolumeClaim", "ephemeral", "csi"}


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false), as the router's parser reads the rules file:
    PyYAML's 1.1 rules would turn `on:` (a retry policy key) into True."""


Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.checks = 0

    def check(self, ok: bool, where: str, obj: dict | None, what: str) -> bool:
        self.checks += 1
        if not ok:
            self.fail(where, obj, what)
        return ok

    def fail(self, where: str, obj: dict | None, what: str) -> None:
        line = f"FAIL {where}: {describe(obj)}{what}" if obj else f"FAIL {where}: {what}"
        self.failures.append(line)
        print(line, flush=True)


def describe(obj: dict) -> str:
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    name = md.get("name", "?")
    return f"{obj.get('kind', '?')} {ns + '/' if ns else ''}{name}: "


# ---------------------------------------------------------------------------------------
# rendering and schema validation


def kustomizations() -> tuple[list[Path], list[Path]]:
    """(buildable kustomizations, components) under deploy/k8s."""
    builds, components = [], []
    for k in sorted(K8S.rglob("kustomization.yaml")):
        if ".venv" in k.parts:
            continue
        kind = (yaml.safe_load(k.read_text()) or {}).get("kind", "Kustomization")
        (components if kind == "Component" else builds).append(k.parent)
    return builds, components


def referenced_files(kdir: Path) -> tuple[set[Path], set[Path]]:
    """Files a kustomization or component names, and the directories (bases, components)."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text()) or {}
    files, dirs = {kdir / "kustomization.yaml"}, set()

    def add(rel: str) -> None:
        p = (kdir / rel).resolve()
        (dirs if p.is_dir() else files).add(p)

    for rel in k.get("resources", []) + k.get("components", []):
        add(rel)
    for rel in k.get("patchesStrategicMerge", []):
        add(rel)
    for p in k.get("patches", []) + k.get("patchesJson6902", []):
        if "path" in p:
            add(p["path"])
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        for f in gen.get("files", []):
            add(f.split("=", 1)[-1])
        for f in gen.get("envs", []) + ([gen["env"]] if "env" in gen else []):
            add(f)
    return files, dirs


def render(kdir: Path, report: Report) -> list[dict] | None:
    rel = kdir.relative_to(K8S).as_posix()
    r = subprocess.run(["kubectl", "kustomize", str(kdir)], capture_output=True, text=True)
    if r.returncode != 0:
        report.fail(rel, None, f"kubectl kustomize failed:\n{r.stderr.strip()}")
        return None
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@functools.lru_cache(maxsize=None)
def _schema_contents(filename: str, version: str):
    return _original_schema_contents(filename, version)


# kubernetes-validate reads and parses a multi-megabyte definitions file for every object;
# once per file is enough.
_original_schema_contents = kv_utils.schema_contents
kv_utils.schema_contents = _schema_contents


def validate_schema(where: str, obj: dict, versions: list[str], report: Report) -> str:
    """'ok', 'crd' (no schema: checked by hand) or 'failed'."""
    if (obj.get("apiVersion"), obj.get("kind")) in CRD_KINDS:
        return "crd"
    for v in versions:
        report.checks += 1
        try:
            kubernetes_validate.validate(obj, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            report.fail(where, obj, f"Kubernetes {v} schema: at {path}: {e.message}")
            return "failed"
        except kv_utils.SchemaNotFoundError as e:
            report.fail(where, obj, e.message)
            return "failed"
    return "ok"


# ---------------------------------------------------------------------------------------
# helpers over rendered objects


def args_of(container: dict) -> dict[str, str]:
    """`--flag=value` and `--flag value` arguments (repeated flags: the last)."""
    out: dict[str, str] = {}
    argv = list(container.get("args", []))
    i = 0
    while i < len(argv):
        a = str(argv[i])
        if a.startswith("--"):
            if "=" in a:
                k, v = a[2:].split("=", 1)
            elif i + 1 < len(argv) and not str(argv[i + 1]).startswith("--"):
                k, v = a[2:], str(argv[i + 1])
                i += 1
            else:
                k, v = a[2:], ""
            out[k] = v
        i += 1
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def port_of(addr: str) -> int | None:
    m = re.search(r":(\d+)$", addr or "")
    return int(m.group(1)) if m else None


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    ml = (selector or {}).get("matchLabels", selector or {})
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def container_named(obj: dict, binary: str) -> dict | None:
    for c in pod_spec(obj).get("containers", []):
        if (c.get("command") or [""])[0].endswith("/" + binary):
            return c
    return None


def probe_port(probe: dict, container: dict) -> int | None:
    port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


# ---------------------------------------------------------------------------------------
# the checks a schema cannot do


def check_build(where: str, docs: list[dict], external_secret: dict, report: Report,
                rules_validator) -> None:
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    def find(kind: str, name: str) -> dict | None:
        return next((d for d in by_kind.get(kind, []) if d["metadata"]["name"] == name), None)

    workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])
    namespaces = {d["metadata"]["name"] for d in by_kind.get("Namespace", [])}

    for d in docs:
        if d["kind"] in CLUSTER_SCOPED:
            continue
        ns = d["metadata"].get("namespace")
        report.check(bool(ns), where, d, "no namespace (set `namespace:` in the kustomization)")
        if ns and namespaces:
            report.check(ns in namespaces, where, d, f"namespace {ns} is not created here")

    # --- the rules file(s): parse, validate against the rules schema
    rules_by_cm: dict[str, dict] = {}
    for cm in by_kind.get("ConfigMap", []):
        for key, text in (cm.get("data") or {}).items():
            if not key.endswith((".yaml", ".yml")):
                continue
            spec = yaml.load(text, Loader=Yaml12Loader)
            if not (isinstance(spec, dict) and "pools" in spec and "version" in spec):
                continue
            errors = sorted(rules_validator.iter_errors(spec), key=lambda e: list(e.path))
            for e in errors:
                path = ".".join(str(p) for p in e.path) or "(top)"
                report.fail(where, cm, f"{key}: rules schema: at {path}: {e.message}")
            report.checks += 1
            # references a schema cannot see (`switchyard rules check` finds the rest)
            pools = set(spec.get("pools") or {})
            routes = [(r.get("name", "?"), r.get("route", [])) for r in spec.get("rules") or []]
            routes.append(("default", (spec.get("default") or {}).get("route", [])))
            for rule, route in routes:
                for p in route:
                    report.check(p in pools, where, cm, f"{key}: rule {rule} routes to unknown pool {p}")
            rules_by_cm[cm["metadata"]["name"]] = spec

    # --- every Deployment / StatefulSet
    for w in workloads:
        spec = pod_spec(w)
        psc = spec.get("securityContext", {})
        report.check(psc.get("runAsNonRoot") is True, where, w, "pod securityContext.runAsNonRoot is not true")
        report.check((psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost"),
                     where, w, "pod seccompProfile is not RuntimeDefault")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            report.check(not spec.get(flag), where, w, f"{flag} is set")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            kinds = set(v) - {"name"}
            report.check(kinds <= RESTRICTED_VOLUMES, where, w,
                         f"volume {v['name']}: {sorted(kinds)} not allowed under Pod Security `restricted`")
            if "configMap" in v:
                name = v["configMap"]["name"]
                report.check(find("ConfigMap", name) is not None, where, w,
                             f"volume {v['name']}: ConfigMap {name} is not in this build")
            if "secret" in v:
                name = v["secret"]["secretName"]
                report.check(find("Secret", name) is not None or name == external_secret.get("name"),
                             where, w, f"volume {v['name']}: Secret {name} is not in this build")
        for c in spec.get("containers", []):
            cn = f"container {c['name']}: "
            report.check("readinessProbe" in c, where, w, cn + "no readinessProbe")
            res = c.get("resources", {})
            for k in ("cpu", "memory"):
                report.check(k in res.get("requests", {}), where, w, cn + f"no resources.requests.{k}")
            report.check("memory" in res.get("limits", {}), where, w, cn + "no resources.limits.memory")
            sc = c.get("securityContext", {})
            report.check(sc.get("allowPrivilegeEscalation") is False, where, w,
                         cn + "allowPrivilegeEscalation is not false")
            report.check(sc.get("readOnlyRootFilesystem") is True, where, w,
                         cn + "readOnlyRootFilesystem is not true")
            report.check("ALL" in (sc.get("capabilities") or {}).get("drop", []), where, w,
                         cn + "capabilities do not drop ALL")
            report.check(not sc.get("privileged"), where, w, cn + "privileged")
            env = env_of(c)
            # $(VAR) in command/args is expanded only from the container's own env
            for a in c.get("command", []) + c.get("args", []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(a)):
                    report.check(var in env, where, w, cn + f"`{a}` uses $({var}), which env does not define")
            for e in env.values():
                ref = (e.get("valueFrom") or {})
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    cm = find("ConfigMap", r["name"])
                    if report.check(cm is not None, where, w, cn + f"env {e['name']}: ConfigMap {r['name']} is not in this build"):
                        report.check(r["key"] in (cm.get("data") or {}), where, w,
                                     cn + f"env {e['name']}: ConfigMap {r['name']} has no key {r['key']}")
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    s = find("Secret", r["name"])
                    if s is not None:
                        keys = set(s.get("data") or {}) | set(s.get("stringData") or {})
                        report.check(r["key"] in keys, where, w,
                                     cn + f"env {e['name']}: Secret {r['name']} has no key {r['key']}")
                    else:
                        report.check(r["name"] == external_secret.get("name") and r["key"] in external_secret.get("keys", ()),
                                     where, w, cn + f"env {e['name']}: Secret {r['name']} (key {r['key']}) is neither in "
                                     "this build nor the documented one (base/secret.example.yaml)")
            for m in c.get("volumeMounts", []):
                v = volumes.get(m["name"])
                if not report.check(v is not None, where, w, cn + f"mount of unknown volume {m['name']}"):
                    continue
                if "configMap" in v:
                    # a subPath mount is copied once and never updated by the kubelet
                    report.check("subPath" not in m and "subPathExpr" not in m, where, w,
                                 cn + f"ConfigMap volume {m['name']} mounted with subPath: it would never update")

    # --- Services: their selectors find pods, their named target ports exist
    for svc in by_kind.get("Service", []):
        sel = svc["spec"].get("selector", {})
        targets = [w for w in workloads if selects(sel, pod_labels(w))]
        if not report.check(bool(targets), where, svc, "selects no pods of this build"):
            continue
        for p in svc["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            for w in targets:
                ports = [q for c in pod_spec(w)["containers"] for q in c.get("ports", [])]
                ok = any(q.get("name") == tp or q["containerPort"] == tp for q in ports)
                report.check(ok, where, svc, f"targetPort {tp} is no port of {w['kind']} {w['metadata']['name']}")

    # --- every ConfigMap is read by some pod (a leftover one, such as the old router address
    # list `switchyard-routers`, would suggest a setting that nothing uses)
    used_cms: set[str] = set()
    for w in workloads:
        spec = pod_spec(w)
        for v in spec.get("volumes", []):
            if "configMap" in v:
                used_cms.add(v["configMap"]["name"])
            for src in (v.get("projected") or {}).get("sources", []):
                if "configMap" in src:
                    used_cms.add(src["configMap"]["name"])
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    used_cms.add(ref["name"])
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef:
                    used_cms.add(ef["configMapRef"]["name"])
    for cm in by_kind.get("ConfigMap", []):
        report.check(cm["metadata"]["name"] in used_cms, where, cm, "no pod of this build uses it")

    # --- PDBs and autoscalers point at something
    pdbs = by_kind.get("PodDisruptionBudget", [])
    for pdb in pdbs:
        report.check(any(selects(pdb["spec"]["selector"], pod_labels(w)) for w in workloads),
                     where, pdb, "selects no pods of this build")
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    scaled = by_kind.get("ScaledObject", [])
    for h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        report.check(find(ref["kind"], ref["name"]) is not None, where, h,
                     f"scaleTargetRef {ref['kind']} {ref['name']} is not in this build")
    for so in scaled:
        check_scaled_object(where, so, find, report)

    # --- routers
    services = by_kind.get("Service", [])
    routers = [w for w in workloads if container_named(w, "switchyard")]
    for r in routers:
        check_router(where, r, find, pdbs, services, rules_by_cm, report)

    # --- workers
    pool_owner: dict[str, str] = {}
    for w in workloads:
        c = container_named(w, "switchyard-worker")
        if c is None:
            continue
        pool = args_of(c).get("pool", "cpu")
        report.check(pool not in pool_owner, where, w,
                     f"pool {pool} already has Deployment {pool_owner.get(pool)}")
        pool_owner[pool] = w["metadata"]["name"]
        check_worker(where, w, c, pdbs, hpas, scaled, rules_by_cm, report)
        check_worker_routers(where, w, c, services, workloads, report)


def is_zero(v) -> bool:
    """A rolling-update bound (an int or a percentage) that is 0 for any replica count."""
    return str(v).strip() in ("0", "0%")


def check_router(where: str, r: dict, find, pdbs: list[dict], services: list[dict], rules_by_cm: dict,
                 report: Report) -> None:
    c = container_named(r, "switchyard")
    a = args_of(c)
    env = env_of(c)
    report.check((c.get("args") or [""])[0] == "serve", where, r, "the router's first argument is not `serve`")
    # A Deployment (workers find every replica through DNS, so no replica needs a stable
    # name), at least 2 replicas, and a rollout that adds a new router before removing one
    if report.check(r["kind"] == "Deployment", where, r,
                    f"the routers are a {r['kind']}, not a Deployment: workers find the replicas "
                    "through the headless registry Service (--router-dns), no list of names is needed"):
        n = r["spec"].get("replicas", 1)
        report.check(isinstance(n, int) and n >= 2, where, r,
                     f"replicas {n}: fewer than 2 routers (no router left through a node drain or a "
                     "crash, and a PodDisruptionBudget of minAvailable 1 would block every drain)")
        st = r["spec"].get("strategy") or {}
        ru = st.get("rollingUpdate") or {}
        report.check(st.get("type", "RollingUpdate") == "RollingUpdate"
                     and "maxUnavailable" in ru and is_zero(ru["maxUnavailable"])
                     and not is_zero(ru.get("maxSurge", "25%")),
                     where, r, f"strategy {st}: a rolling update must add a router before removing one "
                     "(RollingUpdate, maxUnavailable 0, maxSurge at least 1), or it drops below "
                     f"{n} ready routers")
    # readiness / liveness on the admin listener's /readyz and /healthz
    admin_port = port_of(a.get("admin", "127.0.0.1:9090"))
    rp, lp = c.get("readinessProbe", {}), c.get("livenessProbe", {})
    report.check((rp.get("httpGet") or {}).get("path") == "/readyz" and probe_port(rp, c) == admin_port,
                 where, r, f"readinessProbe is not GET /readyz on the admin port {admin_port}")
    report.check((lp.get("httpGet") or {}).get("path") == "/healthz" and probe_port(lp, c) == admin_port,
                 where, r, f"livenessProbe is not GET /healthz on the admin port {admin_port}")
    # admin and registry beyond loopback need their token / allowed networks
    if not a.get("admin", "127.0.0.1").startswith("127."):
        report.check("SWITCHYARD_ADMIN_TOKEN" in env or "admin-token" in a, where, r,
                     "--admin listens beyond loopback without an admin token (the router would refuse to start)")
    if not a.get("grpc", "127.0.0.1").startswith("127."):
        report.check("SWITCHYARD_ALLOW_NETWORKS" in env or "allow-networks" in a, where, r,
                     "--grpc listens beyond loopback without --allow-networks (the router would refuse to start)")
        report.check("SWITCHYARD_REGISTRY_TOKEN" in env or "registry-token" in a, where, r,
                     "no registry token: only loopback workers could register")
    # the rules file: inside a ConfigMap mounted as a directory
    rules = a.get("rules", "")
    rules_dir, rules_file = os.path.dirname(rules), os.path.basename(rules)
    spec = pod_spec(r)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == rules_dir]
    if report.check(len(mounts) == 1, where, r, f"--rules {rules}: no single volume mounted at {rules_dir}"):
        m = mounts[0]
        v = volumes.get(m["name"], {})
        if report.check("configMap" in v, where, r, f"--rules {rules}: {rules_dir} is not a ConfigMap volume"):
            name = v["configMap"]["name"]
            cm = find("ConfigMap", name)
            report.check("subPath" not in m, where, r, "the rules ConfigMap is mounted with subPath: it would never update")
            report.check("items" not in v["configMap"], where, r,
                         "the rules ConfigMap volume lists `items`: mount it whole")
            report.check(not re.search(r"-[a-z0-9]{10}$", name), where, r,
                         f"the rules ConfigMap {name} has a hash suffix: each edit would roll the routers "
                         "instead of reloading (disableNameSuffixHash: true)")
            if cm is not None:
                report.check(rules_file in (cm.get("data") or {}), where, r,
                             f"--rules {rules}: ConfigMap {name} has no key {rules_file}")
                report.check(name in rules_by_cm, where, r, f"ConfigMap {name} holds no rules file")
    # SIGTERM: preStop sleep, then up to --shutdown-grace-s of draining, then 1 s more
    grace = spec.get("terminationGracePeriodSeconds", 30)
    sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
    drain = int(a.get("shutdown-grace-s", 30))
    report.check(sleep > 0, where, r, "no preStop sleep: SIGTERM would close the listeners before the "
                 "endpoint removal reaches the load balancers")
    report.check(grace > sleep + drain + 1, where, r,
                 f"terminationGracePeriodSeconds {grace} <= preStop sleep {sleep} + --shutdown-grace-s {drain} + 1")
    report.check(any(selects(p["spec"]["selector"], pod_labels(r)) for p in pdbs), where, r,
                 "no PodDisruptionBudget")
    # the registry: a headless Service over the router pods, on the gRPC port, publishing the
    # addresses of routers not ready yet (one turns ready only once a worker registered)
    grpc_port = port_of(a.get("grpc", "127.0.0.1:50051"))
    regs = [s for s in services if s["spec"].get("clusterIP") == "None"
            and s["metadata"].get("namespace") == r["metadata"].get("namespace")
            and selects(s["spec"].get("selector"), pod_labels(r))]
    if report.check(bool(regs), where, r, "no headless Service selects the router pods: workers' "
                    "--router-dns would have no name resolving to every router"):
        for svc in regs:
            check_registry_service(where, svc, r, c, grpc_port, report)


def check_registry_service(where: str, svc: dict, r: dict, c: dict, grpc_port: int | None,
                           report: Report) -> None:
    report.check(svc["spec"].get("publishNotReadyAddresses") is True, where, svc,
                 "publishNotReadyAddresses is not true: a new router turns ready only once a worker "
                 "has registered with it, and workers find it only through this name, so it would "
                 "never be found (no ready router on a fresh install, rollouts stuck)")
    on_grpc = False
    for p in svc["spec"].get("ports", []):
        tp = p.get("targetPort", p["port"])
        cport = tp if isinstance(tp, int) else next(
            (q["containerPort"] for q in c.get("ports", []) if q.get("name") == tp), None)
        on_grpc |= cport == grpc_port
    report.check(on_grpc, where, svc, f"no port targets the router's --grpc port {grpc_port} "
                 f"({r['kind']} {r['metadata']['name']})")


def check_worker_routers(where: str, w: dict, c: dict, services: list[dict], workloads: list[dict],
                         report: Report) -> None:
    """The worker registers through --router-dns, whose host is the headless registry Service
    of this build (in the worker's namespace), and whose port is the routers' gRPC port."""
    a = args_of(c)
    env = env_of(c)
    report.check("router" not in a, where, w,
                 f"--router {a.get('router')}: a fixed list of routers, which goes stale when they are "
                 "scaled or replaced; use --router-dns with the headless registry Service")
    url = a.get("router-dns") or env.get("SWITCHYARD_ROUTER_DNS", {}).get("value")
    if not report.check(bool(url), where, w, "no --router-dns: the worker would register with no "
                        "router (or serve standalone)"):
        return
    every = a.get("router-dns-every-s", "10")
    report.check(every.isdigit() and int(every) >= 1, where, w,
                 f"--router-dns-every-s {every} is not a whole number of seconds of at least 1")
    m = re.fullmatch(r"(https?)://([A-Za-z0-9.-]+):(\d+)/?", url)
    if not report.check(m is not None, where, w, f"--router-dns {url} is not http(s)://host:port"):
        return
    host, port = m.group(2), int(m.group(3))
    parts = host.split(".")
    ns = w["metadata"].get("namespace")
    # `svc` (the pod's own namespace, through the DNS search path), `svc.ns`, `svc.ns.svc`,
    # `svc.ns.svc.<cluster domain>`
    if not report.check(not host.replace(".", "").isdigit() and (len(parts) <= 2 or parts[2] == "svc"),
                        where, w, f"--router-dns host {host} is not a Service name (svc, svc.namespace, "
                        "svc.namespace.svc[.cluster domain])"):
        return
    svc_name, svc_ns = parts[0], parts[1] if len(parts) > 1 else ns
    svc = next((s for s in services if s["metadata"]["name"] == svc_name
                and s["metadata"].get("namespace") == svc_ns), None)
    if not report.check(svc is not None, where, w,
                        f"--router-dns {url}: no Service {svc_ns}/{svc_name} in this build"
                        + (f" (the worker runs in namespace {ns}: a namespace written into the URL "
                           "is not rewritten by kustomize's `namespace:`; the short name resolves in "
                           "the pod's own)" if svc_ns != ns else "")):
        return
    report.check(svc["spec"].get("clusterIP") == "None", where, w,
                 f"--router-dns {url}: Service {svc_name} is not headless, so its name resolves to one "
                 "virtual IP and the worker would register with one router, chosen at random")
    report.check(svc["spec"].get("publishNotReadyAddresses") is True, where, w,
                 f"--router-dns {url}: Service {svc_name} does not publish not-ready addresses, so a "
                 "router that no worker has registered with yet (hence not ready) is never found")
    sel = svc["spec"].get("selector")
    selected = [x for x in workloads if x["metadata"].get("namespace") == svc_ns and selects(sel, pod_labels(x))]
    routers = [x for x in selected if container_named(x, "switchyard")]
    others = [x["metadata"]["name"] for x in selected if x not in routers]
    report.check(bool(routers) and not others, where, w,
                 f"--router-dns {url}: Service {svc_name} selects "
                 + (f"pods that are no routers ({', '.join(others)})" if others else "no router pods"))
    for r in routers:
        grpc_port = port_of(args_of(container_named(r, "switchyard")).get("grpc", "127.0.0.1:50051"))
        report.check(port == grpc_port, where, w,
                     f"--router-dns {url}: port {port} is not the routers' --grpc port {grpc_port} "
                     f"({r['kind']} {r['metadata']['name']}; a headless Service maps no ports: workers "
                     "connect to the pod addresses directly)")


def check_worker(where: str, w: dict, c: dict, pdbs, hpas, scaled, rules_by_cm, report: Report) -> None:
    a = args_of(c)
    env = env_of(c)
    spec = pod_spec(w)
    name = w["metadata"]["name"]
    pool = a.get("pool", "cpu")
    # the address routers reach it at
    listen = a.get("listen", "127.0.0.1:0")
    port = port_of(listen)
    if "advertise-address" not in a and "SWITCHYARD_ADVERTISE_ADDRESS" not in env:
        report.check(listen.startswith("0.0.0.0:"), where, w, f"--listen {listen}: routers could not reach it")
        pod_ip = (env.get("POD_IP", {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        report.check(pod_ip == "status.podIP", where, w, "no POD_IP from the downward API (status.podIP) to advertise")
    report.check(port not in (None, 0), where, w, f"--listen {listen}: a fixed port is needed (probes, preStop)")
    # a worker id unique per pod
    wid = a.get("worker-id", "")
    pod_name = (env.get("POD_NAME", {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
    report.check(wid == "$(POD_NAME)" and pod_name == "metadata.name", where, w,
                 "--worker-id is not $(POD_NAME) from metadata.name: every replica would share one id, "
                 "and the routers refuse a second registration of an id")
    # readiness on /health, and no liveness on it (it answers 503 while draining)
    rp = c.get("readinessProbe", {})
    report.check((rp.get("httpGet") or {}).get("path") == "/health" and probe_port(rp, c) == port,
                 where, w, f"readinessProbe is not GET /health on port {port}")
    lp = c.get("livenessProbe") or {}
    report.check((lp.get("httpGet") or {}).get("path") != "/health", where, w,
                 "livenessProbe on /health: it answers 503 while draining, so draining workers would be killed")
    # preStop: `switchyard preempt` against this worker, within the grace period
    cmd = [str(x) for x in ((((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or [])]
    drain = int(a.get("drain-timeout-s", 30))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if report.check(len(cmd) >= 2 and cmd[0].endswith("/switchyard") and cmd[1] == "preempt", where, w,
                    "no preStop hook running `switchyard preempt`"):
        pa = args_of({"args": cmd[2:]})
        report.check(pa.get("worker") == f"http://127.0.0.1:{port}", where, w,
                     f"preStop --worker is {pa.get('worker')}, not this worker's loopback address "
                     f"http://127.0.0.1:{port} (/admin/preempt trusts loopback only without a token)")
        deadline = pa.get("deadline-s", "")
        if report.check(deadline.isdigit(), where, w, "preStop has no --deadline-s"):
            # `switchyard preempt` waits up to the deadline + 5 s for the worker to exit
            longest = max(int(deadline) + PREEMPT_EXIT_S, drain)
            report.check(grace > longest, where, w,
                         f"terminationGracePeriodSeconds {grace} is not greater than the drain deadline "
                         f"(--deadline-s {deadline} + {PREEMPT_EXIT_S} s that `switchyard preempt` waits "
                         f"for the exit; --drain-timeout-s {drain})")
    # a PDB, and exactly one autoscaler, which then owns the replica count
    labels = pod_labels(w)
    report.check(any(selects(p["spec"]["selector"], labels) for p in pdbs), where, w, "no PodDisruptionBudget")
    mine_hpa = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name
                and h["spec"]["scaleTargetRef"]["kind"] == "Deployment"]
    mine_so = [s for s in scaled if s["spec"]["scaleTargetRef"]["name"] == name]
    if report.check(len(mine_hpa) + len(mine_so) == 1, where, w,
                    f"{len(mine_hpa)} HorizontalPodAutoscalers and {len(mine_so)} ScaledObjects target it (want one)"):
        report.check("replicas" not in w["spec"], where, w,
                     "sets spec.replicas although an autoscaler owns the count (each apply would reset it)")
    for h in mine_hpa:
        metrics = h["spec"].get("metrics", [])
        ok = any(m.get("type") == "External"
                 and m["external"]["metric"]["name"] == DESIRED_METRIC
                 and (m["external"]["metric"].get("selector") or {}).get("matchLabels") == {"pool": pool}
                 and m["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
                 for m in metrics)
        report.check(ok, where, h, f"does not scale on External {DESIRED_METRIC}{{pool={pool}}} "
                     "with an AverageValue target of 1")
        report.check(h["spec"].get("minReplicas", 1) >= 1, where, h, "minReplicas below 1")
    for s in mine_so:
        queries = [t.get("metadata", {}).get("query", "") for t in s["spec"].get("triggers", [])]
        report.check(any(f'pool="{pool}"' in q for q in queries), where, s,
                     f"no trigger's query selects pool=\"{pool}\"")
    # the pool exists in the rules, and its hardware matches its class and capacity
    rules = next(iter(rules_by_cm.values()), None)
    if rules is None:
        return
    pools = rules.get("pools", {})
    if not report.check(pool in pools, where, w, f"--pool {pool} is not a pool of the rules file ({sorted(pools)})"):
        return
    models = rules.get("models") or {}
    if models and "model-name" in a:
        report.check(a["model-name"] in models, where, w,
                     f"--model-name {a['model-name']} is not a model of the rules file ({sorted(models)})")
    p = pools[pool]
    gpus = (c.get("resources", {}).get("limits") or {}).get(GPU_RESOURCE)
    if p.get("class") == "cpu":
        report.check(not gpus, where, w, f"pool {pool} is class cpu but asks for {GPU_RESOURCE}")
    else:
        report.check(bool(gpus), where, w, f"pool {pool} is class {p.get('class')} but asks for no {GPU_RESOURCE}")
        report.check(a.get("device", "cpu").startswith("cuda"), where, w,
                     f"pool {pool} is class {p.get('class')} but the worker runs on --device {a.get('device', 'cpu')}")
    selector = spec.get("nodeSelector", {})
    terms = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
             .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms", [])
    not_spot = any(e.get("key") == CAPACITY_LABEL and e.get("operator") == "NotIn" and "spot" in e.get("values", [])
                   for t in terms for e in t.get("matchExpressions", []))
    if p.get("capacity") == "spot":
        report.check(selector.get(CAPACITY_LABEL) == "spot", where, w,
                     f"pool {pool} is spot but its pods are not bound to spot nodes ({CAPACITY_LABEL}: spot)")
    else:
        report.check(selector.get(CAPACITY_LABEL) != "spot" and (not_spot or selector.get(CAPACITY_LABEL) == "on-demand"),
                     where, w, f"pool {pool} is on-demand but its pods may land on spot nodes")


def check_scaled_object(where: str, so: dict, find, report: Report) -> None:
    spec = so.get("spec", {})
    ref = spec.get("scaleTargetRef", {})
    report.check(find(ref.get("kind", "Deployment"), ref.get("name", "")) is not None, where, so,
                 f"scaleTargetRef {ref.get('name')} is not in this build")
    report.check(spec.get("minReplicaCount", 0) >= 1, where, so, "minReplicaCount below 1")
    report.check(spec.get("maxReplicaCount", 100) >= spec.get("minReplicaCount", 0), where, so,
                 "maxReplicaCount below minReplicaCount")
    triggers = spec.get("triggers", [])
    report.check(bool(triggers), where, so, "no triggers")
    for t in triggers:
        md = t.get("metadata", {})
        ok = (t.get("type") == "prometheus" and md.get("serverAddress", "").startswith("http")
              and DESIRED_METRIC in md.get("query", "") and md.get("threshold") == "1"
              and t.get("metricType", "AverageValue") == "AverageValue")
        report.check(ok, where, so, f"trigger is not a prometheus query of {DESIRED_METRIC} with threshold \"1\"")


def check_adapter_rules(where: str, cm: dict, report: Report) -> list[str]:
    """The prometheus-adapter config serves the metric the HPAs read; returns its queries."""
    config = yaml.safe_load(cm["data"]["config.yaml"])
    rules = [r for r in config.get("externalRules", []) if DESIRED_METRIC in r.get("seriesQuery", "")]
    if not report.check(len(rules) == 1, where, cm, f"no single externalRule for {DESIRED_METRIC}"):
        return []
    r = rules[0]
    report.check(r.get("name", {}).get("as", DESIRED_METRIC) == DESIRED_METRIC, where, cm,
                 f"the rule does not expose the metric as {DESIRED_METRIC}")
    q = r.get("metricsQuery", "")
    report.check(re.search(r"max\s+by\s*\(\s*pool\s*\)", q) is not None and "<<.LabelMatchers>>" in q,
                 where, cm, "metricsQuery is not `max by (pool)` over <<.Series>>{<<.LabelMatchers>>}")
    return [q.replace("<<.Series>>", DESIRED_METRIC)
             .replace("<<.LabelMatchers>>", 'namespace="switchyard",pool="cpu"')]


def promtool_check(queries: list[str], report: Report) -> str:
    """PromQL syntax of the autoscaling queries, when promtool is installed."""
    promtool = shutil.which("promtool")
    if not promtool:
        return "skipped (no promtool on PATH)"
    rules = {"groups": [{"name": "k8s-autoscaling-queries",
                         "rules": [{"record": f"switchyard:k8s_check_{i}", "expr": q} for i, q in enumerate(queries)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(rules, f)
    try:
        r = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    report.check(r.returncode == 0, "autoscaling", None,
                 f"promtool rejects an autoscaling query:\n{r.stdout}{r.stderr}")
    return f"{len(queries)} queries parse"


def rules_check_binary(files: list[tuple[str, str]], binary: str | None, report: Report) -> str:
    """`switchyard rules check` on every rules file, when a built router is at hand."""
    if not binary:
        return "skipped (no switchyard binary: build it, or pass --switchyard)"
    with tempfile.TemporaryDirectory() as tmp:
        for i, (where, text) in enumerate(files):
            p = Path(tmp) / f"rules-{i}.yaml"
            p.write_text(text)
            r = subprocess.run([binary, "rules", "check", str(p)], capture_output=True, text=True)
            report.check(r.returncode == 0, where, None,
                         f"switchyard rules check rejects the rules file:\n{r.stdout}{r.stderr}")
    return f"{len(files)} files compile"


# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubernetes-version", action="append", dest="versions",
                    help=f"schema version to validate against (repeatable; default {DEFAULT_VERSIONS})")
    ap.add_argument("--switchyard", help="a built `switchyard` binary for `rules check` "
                    "(default: the newer of target/debug and target/release, when present)")
    args = ap.parse_args()
    versions = args.versions or DEFAULT_VERSIONS
    built = [p for p in (ROOT / "target/debug/switchyard", ROOT / "target/release/switchyard")
             if p.is_file() and os.access(p, os.X_OK)]
    binary = args.switchyard or (str(max(built, key=lambda p: p.stat().st_mtime)) if built else None)
    t0 = time.monotonic()
    report = Report()
    rules_validator = jsonschema.Draft202012Validator(json.loads(RULES_SCHEMA.read_text()))

    # the documented Secret the manifests expect to be created outside kustomize
    example = yaml.safe_load((K8S / "base/secret.example.yaml").read_text())
    external_secret = {"name": example["metadata"]["name"], "keys": set(example.get("stringData", {}))}

    builds, components = kustomizations()
    used: set[Path] = set()
    objects = distinct = crds = 0
    seen: set[str] = set()
    rules_files: list[tuple[str, str]] = []
    queries: list[str] = []
    for kdir in builds + components:
        files, dirs = referenced_files(kdir)
        used |= files
        report.check(all(d in builds or d in components for d in dirs), kdir.relative_to(K8S).as_posix(), None,
                     "names a directory that is no kustomization here")
    for comp in components:
        report.check(any(comp in referenced_files(b)[1] for b in builds + components),
                     comp.relative_to(K8S).as_posix(), None, "component used by no kustomization: never rendered")
    for kdir in builds:
        where = kdir.relative_to(K8S).as_posix()
        docs = render(kdir, report)
        if docs is None:
            continue
        for d in docs:
            key = json.dumps(d, sort_keys=True)
            objects += 1
            if key in seen:
                continue
            seen.add(key)
            distinct += 1
            crds += validate_schema(where, d, versions, report) == "crd"
        try:
            check_build(where, docs, external_secret, report, rules_validator)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            # an object the schema already rejected, most likely
            report.fail(where, None, f"checks stopped at a malformed object ({type(e).__name__}: {e}); "
                        "fix the problems above first")
        for d in docs:
            if d["kind"] == "ConfigMap":
                for k, text in (d.get("data") or {}).items():
                    if k.endswith((".yaml", ".yml")) and "pools:" in text:
                        rules_files.append((f"{where}: ConfigMap {d['metadata']['name']}/{k}", text))
            if d["kind"] == "ScaledObject":
                queries += [t["metadata"]["query"] for t in d["spec"].get("triggers", [])
                            if "query" in t.get("metadata", {})]
        print(f"rendered {where}: {len(docs)} objects", flush=True)

    # YAML files no kustomization uses: each must be a known plain file
    for f in sorted(K8S.rglob("*.y*ml")):
        if ".venv" in f.parts or f.resolve() in used:
            continue
        rel = f.relative_to(K8S).as_posix()
        if not report.check(rel in PLAIN_FILES, rel, None,
                            "a YAML file no kustomization uses and the checks do not know"):
            continue
        for d in yaml.safe_load_all(f.read_text()):
            if not d:
                continue
            objects += 1
            distinct += 1
            validate_schema(rel, d, versions, report)
            if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {}):
                queries += check_adapter_rules(rel, d, report)
            if d["kind"] == "Secret":
                report.check(d["metadata"]["name"] == external_secret["name"], rel, d, "unexpected Secret")
    report.check(bool(queries), "autoscaling", None, "no prometheus-adapter rule or ScaledObject query found")

    promtool = promtool_check(sorted(set(queries)), report)
    uniq_rules = list({text: where for where, text in rules_files}.items())
    compiled = rules_check_binary([(w, t) for t, w in uniq_rules], binary, report)

    took = time.monotonic() - t0
    print(f"schemas: Kubernetes {', '.join(v.rsplit('.', 1)[0] for v in versions)} (kubernetes-validate "
          f"{kubernetes_validate.__version__}, strict): {distinct - crds} distinct objects "
          f"({objects} rendered or read in all); {crds} CRD objects checked by hand")
    print(f"rules files: {len(uniq_rules)} against docs/rules.schema.json; switchyard rules check: {compiled}")
    print(f"autoscaling queries: promtool: {promtool}")
    print(f"{report.checks} checks over {len(builds)} kustomizations ({', '.join(b.relative_to(K8S).as_posix() for b in builds)}), "
          f"{len(components)} components and {len(PLAIN_FILES)} plain files in {took:.1f} s")
    if report.failures:
        print(f"{len(report.failures)} problems (FAIL lines above)")
        return 1
    print("all manifests valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
