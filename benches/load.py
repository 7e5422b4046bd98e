#!/usr/bin/env python3
"""Side-by-side load harness: Switchyard against the routers an operator would pick instead,
each a plain forwarder to the same mock OpenAI upstream (benches/src/bin/mock-openai.rs).

    python3 benches/load.py [--rounds 3] [--duration 5] [--only nginx,switchyard] [--quick]

Systems: direct (no proxy), nginx, haproxy (Debian), pingora (a bare forwarder built from
Switchyard's pingora version: benches/src/bin/pingora-forwarder.rs), Switchyard with its
defaults (JSON access log on) and with the access log off (switchyard-nolog), vllm-router,
sglang-router and the LiteLLM proxy (PyPI, installed into benches/.venv). Load comes from oha (installed with
`cargo install oha` into benches/.tools when missing). The system under test is pinned to
core 0, the mock and the load generator to core 1; rounds are interleaved so machine noise
hits every system alike, and figures are reported as ratios against direct and nginx.

Scenarios
  latency     concurrency 1: p50/p99, added = system - direct
  capacity    concurrency 32, closed loop: RPS and requests per CPU-second of the system
  sweep       open loop at rising request rates: the highest rate served with p99 <= 1/5/10 ms
  sse         added time to the first streamed chunk (sequential), and 256 concurrent
              streams checked chunk by chunk (none may be lost)
  prompt400k  a 400 KB prompt at concurrency 4 (Switchyard counts its tokens exactly: the
              rule threshold lies inside the byte-length bound)
  memory      RSS idle, under load (sampled mid-run) and after

Output: benches/results/load-<time>.json (raw), .md (tables and ratios), .png (plot).
"""
import argparse, asyncio, datetime, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "benches", ".venv")
TOOLS = os.path.join(ROOT, "benches", ".tools")
# The router as shipped: `--profile release-lto` (fat LTO, one codegen unit; 1.2× the
# requests per CPU-second of `--release`), and every other binary built the same way.
BIN = os.path.join(ROOT, "target", "release-lto")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
BODY = json.dumps({"model": "mock", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "Tell me about tiered routing. " * 30}]})
STREAM_BODY = json.dumps({"model": "mock", "max_tokens": 64, "stream": True,
                          "messages": [{"role": "user", "content": "Tell me about tiered routing."}]})
BIG_BODY = json.dumps({"model": "mock", "max_tokens": 16,
                       "messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 9000}]})
SSE_CHUNKS = 16
ALL = ["direct", "nginx", "haproxy", "pingora", "switchyard", "switchyard-nolog", "vllm-router", "sglang-router", "litellm"]
# the baselines every Switchyard figure is also given as a ratio to
BASELINES = ["pingora", "nginx"]
# --fleet: Switchyard with 1 and with 1,000 registered (simulated, heartbeating) workers
FLEET = ["switchyard-1w", "switchyard-1000w"]


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# installation: Debian packages, oha, the Python peers (and matplotlib) in a venv

def install(only):
    need = [p for p, b in (("nginx", "nginx"), ("haproxy", "haproxy")) if p in only
            and not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}")]
    if need:
        sudo = "" if os.geteuid() == 0 else "sudo "
        sh(f"{sudo}apt-get update -qq && {sudo}apt-get install -y -qq {' '.join(need)} >/dev/null")
    if not oha_bin():
        log("installing oha (cargo install, a few minutes once)")
        sh(f"cargo install oha --locked --root {TOOLS} -q")
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        sh(f"{sys.executable} -m venv {VENV}")
    pkgs = ["matplotlib"] + (["sglang-router"] if "sglang-router" in only else []) \
        + (["vllm-router"] if "vllm-router" in only else []) \
        + (["litellm[proxy]"] if "litellm" in only else [])
    missing = subprocess.run([py, "-c", "import importlib.util,sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)",
                              *[{"matplotlib": "matplotlib", "sglang-router": "sglang_router", "vllm-router": "vllm_router", "litellm[proxy]": "litellm"}[p] for p in pkgs]])
    if missing.returncode:
        sh(f"{py} -m pip install -q {' '.join(repr(p) for p in pkgs)}")


def oha_bin():
    for p in (os.path.join(TOOLS, "bin", "oha"), shutil.which("oha") or ""):
        if p and os.path.exists(p):
            return p
    return None


# ---------------------------------------------------------------------------------------
# processes

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_http(port, path_body, timeout=120):
    """Until a POST answers 200 (routers that discover workers need a moment)."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            c = socket.create_connection(("127.0.0.1", port), 0.5)
            body = path_body.encode()
            c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            head = c.recv(64); c.close()
            if head.startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"port {port} never answered 200")


def tree(pid):
    """`pid` and its descendants, with their /proc stat fields."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    procs[int(entry)] = f.read().rsplit(")", 1)[1].split()
            except OSError:
                pass
    keep, grew = {pid}, True
    while grew:
        grew = False
        for p, f in procs.items():
            if p not in keep and int(f[1]) in keep:
                keep.add(p); grew = True
    return [(p, procs[p]) for p in keep if p in procs]


def cpu_seconds(pid):
    tck = os.sysconf("SC_CLK_TCK")
    return sum((int(f[11]) + int(f[12])) / tck for _, f in tree(pid))


def rss_mb(pid):
    total = 0.0
    for p, _ in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:")), 0.0)
        except OSError:
            pass
    return total


class Fleet:
    def __init__(self, only, tmp, variants=None):
        self.tmp, self.procs, self.systems = tmp, [], {}
        self.variants = variants or {}
        self.mock_port = free_port()
        self.spawn("mock", [f"{BIN}/mock-openai", "--listen", f"127.0.0.1:{self.mock_port}",
                            "--chunks", str(SSE_CHUNKS), "--itl-ms", "2"], core=1)
        wait_http(self.mock_port, BODY)
        self.systems["direct"] = (self.mock_port, None)
        try:
            for name in only:
                if name == "direct":
                    continue
                if name in self.variants:
                    port = self.start_switchyard(name, binary=self.variants[name])
                else:
                    port = getattr(self, "start_" + name.replace("-", "_"))()
                wait_http(port, BODY)
                log(f"{name} up on {port}")
        except BaseException:
            # a system that does not come up: stop the ones that did (the caller has no fleet)
            log(f"stopping the fleet; logs in {self.tmp}")
            self.stop()
            raise

    def spawn(self, name, argv, core=0, env=None):
        p = subprocess.Popen(["taskset", "-c", str(core), *argv], stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(self.tmp, f"{name}.log"), "w"), env={**os.environ, **(env or {})},
                             start_new_session=True)
        self.procs.append(p)
        return p

    def add(self, name, argv, env=None):
        port = free_port()
        p = self.spawn(name, [a.replace("{PORT}", str(port)) for a in argv], env=env)
        self.systems[name] = (port, p.pid)
        return port

    def write(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_nginx(self):
        conf = self.write("nginx.conf", f"""worker_processes 1; daemon off; pid {self.tmp}/nginx.pid; error_log {self.tmp}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {self.tmp}; proxy_temp_path {self.tmp}; client_max_body_size 64m; client_body_buffer_size 1m;
  upstream mock {{ server 127.0.0.1:{self.mock_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{{PORT}}; location / {{ proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }} }} }}""")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        port = free_port()
        with open(conf) as f:
            text = f.read().replace("{PORT}", str(port))
        self.write("nginx.conf", text)
        p = self.spawn("nginx", [nginx, "-c", conf, "-p", self.tmp])
        self.systems["nginx"] = (port, p.pid)
        return port

    def start_haproxy(self):
        port = free_port()
        conf = self.write("haproxy.cfg", f"""global
  maxconn 8192
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  http-reuse always
  server mock 127.0.0.1:{self.mock_port}
""")
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        p = self.spawn("haproxy", [haproxy, "-db", "-f", conf])
        self.systems["haproxy"] = (port, p.pid)
        return port

    def start_pingora(self):
        return self.add("pingora", [f"{BIN}/pingora-forwarder", "--listen", "127.0.0.1:{PORT}",
                                    "--upstream", f"127.0.0.1:{self.mock_port}", "--threads", "1"])

    def start_switchyard_nolog(self):
        return self.start_switchyard("switchyard-nolog", env={"RUST_LOG": "warn"})

    def start_vllm_router(self):
        return self.add("vllm-router", [os.path.join(VENV, "bin", "vllm-router"), "--host", "127.0.0.1",
                                        "--port", "{PORT}", "--worker-urls", f"http://127.0.0.1:{self.mock_port}",
                                        "--policy", "round_robin", "--log-level", "warning",
                                        # both Python-fronted routers export metrics on 29000 by default
                                        "--prometheus-port", str(free_port())])

    def start_switchyard(self, name="switchyard", registered=0, env=None, binary=None):
        """With `registered` > 0 the pool has no static worker: fleet-sim registers that many
        simulated workers over gRPC (all pointing at the mock) and heartbeats them."""
        model = ""
        if os.path.exists(MODEL):
            model = f"models:\n  mock:\n    tokenizer: {{ gguf: {MODEL} }}\n    context_window: 1048576\n"
        workers = "" if registered else f', workers: ["127.0.0.1:{self.mock_port}"]'
        # the rules in a directory of their own: the router watches the rules file's
        # directory, and the logs written next to it would wake the watcher on every line
        os.makedirs(os.path.join(self.tmp, f"rules-{name}"), exist_ok=True)
        rules = self.write(f"rules-{name}/rules.yaml", f"""version: 1
{model}pools:
  mock: {{ class: cpu, capacity: on_demand, cost_per_hour: 0.2{workers} }}
rules:
  - name: up-to-150k
    when: {{ context_tokens: {{ at_most: 150000 }} }}
    route: [mock]
  - name: all
    route: [mock]
""")
        grpc = free_port()
        port = self.add(name, [binary or f"{BIN}/switchyard", "serve", "--rules", rules,
                               "--listen", "127.0.0.1:{PORT}", "--grpc", f"127.0.0.1:{grpc}",
                               "--admin", f"127.0.0.1:{free_port()}", "--threads", "1", "--no-debug-headers"],
                        env=env)
        if registered:
            time.sleep(0.5)
            self.spawn(f"{name}-fleet", [f"{BIN}/fleet-sim", "--router", f"http://127.0.0.1:{grpc}",
                                         "--address", f"127.0.0.1:{self.mock_port}", "--workers", str(registered)], core=1)
        return port

    def start_switchyard_1w(self):
        return self.start_switchyard("switchyard-1w", 1)

    def start_switchyard_1000w(self):
        return self.start_switchyard("switchyard-1000w", 1000)

    def start_sglang_router(self):
        return self.add("sglang-router", [os.path.join(VENV, "bin", "sglang-router"), "launch", "--host", "127.0.0.1",
                                          "--port", "{PORT}", "--worker-urls", f"http://127.0.0.1:{self.mock_port}",
                                          "--policy", "round_robin", "--log-level", "warn",
                                          "--prometheus-port", str(free_port())])

    def start_litellm(self):
        conf = self.write("litellm.yaml", f"""model_list:
  - model_name: mock
    litellm_params: {{ model: openai/mock, api_base: "http://127.0.0.1:{self.mock_port}/v1", api_key: none }}
litellm_settings: {{ drop_params: true }}
""")
        return self.add("litellm", [os.path.join(VENV, "bin", "litellm"), "--config", conf, "--host", "127.0.0.1",
                                    "--port", "{PORT}", "--num_workers", "1"],
                        env={"LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true", "LITELLM_LOG": "ERROR"})

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        for p in self.procs:
            p.wait()


# ---------------------------------------------------------------------------------------
# load

def oha(port, conns, duration, body=BODY, rate=None):
    path = os.path.join(tempfile.gettempdir(), f"switchyard-load-body-{len(body)}.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(body)
    cmd = ["taskset", "-c", "1", oha_bin(), "--no-tui", "--output-format", "json", "-z", f"{duration}s",
           "-c", str(conns), "-m", "POST", "-H", "content-type: application/json", "-D", path]
    if rate:
        cmd += ["-q", str(rate), "--latency-correction"]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}/v1/chat/completions"], check=True, capture_output=True, text=True).stdout
    j = json.loads(out)
    codes = j.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    # requests still in flight when the run's time is up are cut by oha itself: not failures
    errors = {k: v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k}
    total = sum(codes.values()) + sum(errors.values())
    pct = j["latencyPercentiles"]
    return {"p50_us": (pct.get("p50") or 0) * 1e6, "p99_us": (pct.get("p99") or 0) * 1e6,
            "rps": j["summary"]["requestsPerSec"], "requests": total, "ok": ok, "failed": total - ok}


def measured(fleet, name, fn):
    """Runs fn(port) and adds the system's CPU time and mid-run RSS."""
    port, pid = fleet.systems[name]
    rss = []
    if pid:
        stop = threading.Event()
        def sample():
            while not stop.wait(0.5):
                rss.append(rss_mb(pid))
        t = threading.Thread(target=sample); t.start()
        cpu0 = cpu_seconds(pid)
    res = fn(port)
    if pid:
        stop.set(); t.join()
        res["cpu_s"] = cpu_seconds(pid) - cpu0
        res["req_per_cpu_s"] = res["requests"] / max(res["cpu_s"], 1e-9)
        res["rss_load_mb"] = max(rss) if rss else rss_mb(pid)
    return res


def sweep(port, duration):
    """Open-loop rates until p99 passes 10 ms or the rate is not kept up with."""
    points = []
    for rate in (250, 500, 1000, 2000, 3000, 4000, 5000, 6500, 8000, 10000, 13000, 16000, 20000):
        r = oha(port, 64, duration, rate=rate)
        r["rate"] = rate
        points.append(r)
        if r["p99_us"] > 10_000 or r["rps"] < 0.9 * rate or r["failed"]:
            break
    best = {}
    for bound in (1, 5, 10):
        good = [p["rate"] for p in points if p["p99_us"] <= bound * 1000 and p["rps"] >= 0.95 * p["rate"] and not p["failed"]]
        best[f"p99_le_{bound}ms"] = max(good, default=0)
    return {"points": points, **best}


def first_chunk_us(port, n):
    """Sequential streamed requests on one keep-alive connection (TCP_NODELAY): time from
    sending the request to the first byte of the body."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", STREAM_BODY, {"content-type": "application/json"})
        r = conn.getresponse()
        r.read1(1)
        out.append((time.perf_counter() - t0) * 1e6)
        r.read()
    conn.close()
    out.sort()
    return {"p50_us": out[len(out) // 2], "p99_us": out[int(len(out) * 0.99) - 1]}


async def one_stream(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = STREAM_BODY.encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    text = data.decode(errors="replace")
    return len(re.findall(r'"content":\s*"token "', text)), "[DONE]" in text, text[:300]


def concurrent_streams(port, n=256):
    async def run():
        return await asyncio.gather(*(one_stream(port) for _ in range(n)), return_exceptions=True)
    results = asyncio.run(run())
    ok = [r for r in results if not isinstance(r, Exception)]
    lost = sum(SSE_CHUNKS - c for c, _, _ in ok) + SSE_CHUNKS * (n - len(ok))
    bad = [t for c, done, t in ok if c != SSE_CHUNKS or not done][:3] + [repr(r) for r in results if isinstance(r, Exception)][:3]
    return {"streams": n, "completed": sum(1 for c, done, _ in ok if c == SSE_CHUNKS and done), "lost_chunks": lost,
            "errors": n - len(ok), "failed_examples": bad}


# ---------------------------------------------------------------------------------------

def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sweep-duration", type=int, default=3)
    ap.add_argument("--only", default=",".join(ALL))
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s, short sweep")
    ap.add_argument("--fleet", action="store_true", help="add Switchyard with 1 and 1,000 registered workers")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=BINARY",
                    help="also run this switchyard binary as system switchyard-NAME (another build, allocator, commit)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration, a.sweep_duration = 1, 2, 2
    variants = {"switchyard-" + v.split("=", 1)[0]: os.path.abspath(v.split("=", 1)[1]) for v in a.variant}
    only = ["direct"] + [s for s in a.only.split(",") if s in ALL + FLEET and s != "direct"] + list(variants)
    if a.fleet:
        only += [s for s in FLEET if s not in only]
    install(only)
    if not a.skip_build:
        sh("cargo build --profile release-lto -p router -p benches --bins", cwd=ROOT)
    log(f"CPU: {cpu_model()} ({isa()})")
    tmp = tempfile.mkdtemp()
    fleet = None
    res = {n: {"c1": [], "c32": [], "ttfc": [], "big": []} for n in only}
    try:
        fleet = Fleet(only, tmp, variants)
        time.sleep(1)
        idle = {n: rss_mb(pid) for n, (_, pid) in fleet.systems.items() if pid}
        for r in range(a.rounds):
            for n in only:
                res[n]["c1"].append(measured(fleet, n, lambda p: oha(p, 1, a.duration)))
                res[n]["c32"].append(measured(fleet, n, lambda p: oha(p, 32, a.duration)))
                res[n]["ttfc"].append(first_chunk_us(fleet.systems[n][0], 200))
                res[n]["big"].append(measured(fleet, n, lambda p: oha(p, 4, a.duration, body=BIG_BODY)))
                c1, c32 = res[n]["c1"][-1], res[n]["c32"][-1]
                log(f"round {r + 1} {n:13} c1 p50 {c1['p50_us']:.0f}us p99 {c1['p99_us']:.0f}us | c32 {c32['rps']:.0f} rps"
                    f" {c32.get('req_per_cpu_s', 0):.0f} req/cpu-s | ttfc p50 {res[n]['ttfc'][-1]['p50_us']:.0f}us")
        for n in only:
            res[n]["streams"] = concurrent_streams(fleet.systems[n][0])
            log(f"{n:13} streams: {res[n]['streams']}")
        for n in only:
            res[n]["sweep"] = sweep(fleet.systems[n][0], a.sweep_duration)
            log(f"{n:13} sweep: {[(p['rate'], round(p['p99_us'])) for p in res[n]['sweep']['points']]}")
        after = {n: rss_mb(pid) for n, (_, pid) in fleet.systems.items() if pid}
    finally:
        if fleet:
            fleet.stop()

    summary = {}
    for n in only:
        r = res[n]
        summary[n] = {
            "p50_us": med([x["p50_us"] for x in r["c1"]]), "p99_us": med([x["p99_us"] for x in r["c1"]]),
            "rps_c32": med([x["rps"] for x in r["c32"]]), "req_per_cpu_s": med([x.get("req_per_cpu_s", 0) for x in r["c32"]]),
            "ttfc_p50_us": med([x["p50_us"] for x in r["ttfc"]]), "ttfc_p99_us": med([x["p99_us"] for x in r["ttfc"]]),
            "big_p50_us": med([x["p50_us"] for x in r["big"]]), "big_rps": med([x["rps"] for x in r["big"]]),
            "failed": sum(x["failed"] for x in r["c1"] + r["c32"] + r["big"]),
            "streams_completed": r["streams"]["completed"], "lost_chunks": r["streams"]["lost_chunks"],
            **{k: r["sweep"][k] for k in ("p99_le_1ms", "p99_le_5ms", "p99_le_10ms")},
            "rss_idle_mb": idle.get(n, 0), "rss_load_mb": med([x.get("rss_load_mb", 0) for x in r["c32"]]), "rss_after_mb": after.get(n, 0),
        }
    d = summary["direct"]
    for n in only:
        s = summary[n]
        for k in ("p50_us", "p99_us", "ttfc_p50_us", "ttfc_p99_us", "big_p50_us"):
            s["added_" + k] = s[k] - d[k]
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M")
    out = os.path.join(ROOT, "benches", "results", f"load-{stamp}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"when": stamp, "rounds": a.rounds, "duration_s": a.duration, "cpu": cpu_model(),
                   "raw": res, "summary": summary}, f, indent=1)
    md = report(summary, only, a, stamp)
    with open(out + ".md", "w") as f:
        f.write(md)
    print(md)
    plot(out, summary, only, res)


def isa():
    with open("/proc/cpuinfo") as f:
        flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    return "AVX-512" + ("/VNNI" if "avx512_vnni" in flags else "") if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")


def report(summary, only, a, stamp):
    f0 = lambda v: f"{v:.0f}"
    md = [f"# Load harness, {stamp}", "",
          f"{a.rounds} interleaved rounds × {a.duration} s; system under test on core 0, mock and oha on core 1; {cpu_model()} ({isa()}).", "",
          "| system | added p50 / p99 µs (c=1) | RPS c=32 | req per CPU-s | max RPS p99≤1/5/10 ms | added first chunk p50 / p99 µs | 256 streams complete / lost chunks | 400 KB prompt added p50 µs | RSS idle / load / after MB | failed |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in only:
        s = summary[n]
        direct = n == "direct"
        md.append("| " + " | ".join([
            n,
            f"{f0(s['p50_us'])} / {f0(s['p99_us'])} (abs)" if direct else f"{f0(s['added_p50_us'])} / {f0(s['added_p99_us'])}",
            f0(s["rps_c32"]), "—" if direct else f0(s["req_per_cpu_s"]),
            f"{s['p99_le_1ms']} / {s['p99_le_5ms']} / {s['p99_le_10ms']}",
            f"{f0(s['ttfc_p50_us'])} / {f0(s['ttfc_p99_us'])} (abs)" if direct else f"{f0(s['added_ttfc_p50_us'])} / {f0(s['added_ttfc_p99_us'])}",
            f"{s['streams_completed']} / {s['lost_chunks']}",
            f"{f0(s['big_p50_us'])} (abs)" if direct else f0(s["added_big_p50_us"]),
            "—" if direct else f"{s['rss_idle_mb']:.1f} / {s['rss_load_mb']:.1f} / {s['rss_after_mb']:.1f}",
            str(s["failed"])]) + " |")
    ratio = lambda x, y: f"{x / y:.2f}×" if y else "n/a"
    base = [b for b in BASELINES if b in summary]
    ours = [n for n in only if n.startswith("switchyard")]
    if base and ours:
        md += ["", "Every system as a ratio to the baselines (added latency: lower is better; req per CPU-s: higher is better):", "",
               "| system | " + " | ".join(f"added p50 / {b} | req per CPU-s / {b} | added first chunk / {b}" for b in base) + " |",
               "| --- |" + " --- | --- | --- |" * len(base)]
        for n in only:
            if n == "direct":
                continue
            s = summary[n]
            md.append(f"| {n} | " + " | ".join(
                f"{ratio(s['added_p50_us'], summary[b]['added_p50_us'])} | {ratio(s['req_per_cpu_s'], summary[b]['req_per_cpu_s'])} | "
                f"{ratio(s['added_ttfc_p50_us'], summary[b]['added_ttfc_p50_us'])}" for b in base) + " |")
    if "switchyard" in summary:
        sy = summary["switchyard"]
        md += ["", "Ratios (Switchyard / peer; added latency: lower is better, throughput: higher is better):", ""]
        for n in only:
            if n in ["direct", "switchyard"] + FLEET:
                continue
            s = summary[n]
            md.append(f"- vs {n}: added p50 {ratio(sy['added_p50_us'], s['added_p50_us'])}, added p99 {ratio(sy['added_p99_us'], s['added_p99_us'])}, "
                      f"req per CPU-s {ratio(sy['req_per_cpu_s'], s['req_per_cpu_s'])}, max RPS at p99≤5 ms {ratio(sy['p99_le_5ms'], s['p99_le_5ms'])}, "
                      f"idle RSS {ratio(sy['rss_idle_mb'], s['rss_idle_mb'])}")
    if all(n in summary for n in FLEET):
        one, many = (summary[n] for n in FLEET)
        ratio = lambda x, y: f"{x / y:.2f}×" if y else "n/a"
        md += ["", "Fleet scale (Switchyard with 1,000 registered workers heartbeating every 2 s / with 1):", "",
               f"- added p50 {ratio(many['added_p50_us'], one['added_p50_us'])}, added p99 {ratio(many['added_p99_us'], one['added_p99_us'])}, "
               f"RPS c=32 {ratio(many['rps_c32'], one['rps_c32'])}, req per CPU-s {ratio(many['req_per_cpu_s'], one['req_per_cpu_s'])}, "
               f"RSS under load {many['rss_load_mb']:.1f} vs {one['rss_load_mb']:.1f} MB"]
    return "\n".join(md) + "\n"


def plot(out, summary, only, res):
    code = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = sys.argv[1]
d = json.load(open(out + ".json"))
names = [n for n in d["summary"] if n != "direct"]
fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
x = range(len(names))
ax[0].bar([i - 0.2 for i in x], [d["summary"][n]["added_p50_us"] for n in names], 0.4, label="p50")
ax[0].bar([i + 0.2 for i in x], [d["summary"][n]["added_p99_us"] for n in names], 0.4, label="p99")
ax[0].set_xticks(list(x), names, rotation=20); ax[0].set_yscale("log"); ax[0].set_ylabel("added latency, µs (c=1)"); ax[0].legend()
ax[1].bar(list(x), [d["summary"][n]["req_per_cpu_s"] for n in names])
ax[1].set_xticks(list(x), names, rotation=20); ax[1].set_yscale("log"); ax[1].set_ylabel("requests per CPU-second (c=32)")
for n in d["summary"]:
    pts = d["raw"][n]["sweep"]["points"]
    ax[2].plot([p["rate"] for p in pts], [p["p99_us"] / 1000 for p in pts], marker="o", label=n)
ax[2].set_xscale("log"); ax[2].set_yscale("log"); ax[2].axhline(5, color="grey", ls="--")
ax[2].set_xlabel("offered requests/s (open loop)"); ax[2].set_ylabel("p99 ms"); ax[2].legend(fontsize=8)
fig.suptitle("Switchyard vs peers, " + d["when"] + " (" + d["cpu"] + ")")
fig.tight_layout(); fig.savefig(out + ".png", dpi=110)
"""
    py = os.path.join(VENV, "bin", "python")
    r = subprocess.run([py, "-c", code, out])
    if r.returncode:
        log("plot failed")


if __name__ == "__main__":
    main()
