"""Drives scripts/engine-llamacpp.sh: a real llama.cpp server behind the registration sidecar.

Fleet (all on loopback): a router; llama-server (SmolLM2, --parallel 2, --metrics,
--api-key; the pool's `upstream.api_key` is that key) with
its sidecar in pool `llamacpp-spot`; one of our candle workers with the same model in
`cpu-ondemand`. Rules send `smollm2` to [llamacpp-spot, cpu-ondemand]. Checks, in order:

1. registration: the sidecar registers the engine with what llama.cpp reports (model id
   from --alias, context per slot, slots as max concurrency, engine `llamacpp`);
2. routing: requests through the router are answered by llama.cpp; its load (from
   llama.cpp's /metrics) shows in /admin/workers while a stream runs;
3. kill: llama-server is SIGKILLed while JSON and streamed requests run or wait on it.
   Every JSON request and every stream that had no token yet must complete with no error
   (failed over to cpu-ondemand); streams that already had tokens end with an error event
   (the commit point; mid-stream resume is issue #21) and are reported apart. The sidecar
   takes the dead engine out of routing;
4. restart: llama-server comes back on its port; the sidecar registers it again;
5. drain: SIGTERM on the sidecar while a stream runs on the engine: the router marks it
   draining at once, new requests go to cpu-ondemand, the running stream finishes, the
   sidecar exits once llama.cpp reports no request, and the engine is deregistered.

Standard library only. Exit status 1 if a check fails.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

FAILED = []
# llama-server is started with --api-key: the sidecar reads its models and metrics with it,
# the router sends it as the pool's upstream key; clients never have it
API_KEY = "sk-llama-secret"


def check(ok, what):
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILED.append(what)


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def wait(what, f, timeout=60, every=0.1):
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = f()
            if v:
                return v
        except Exception:
            pass
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


class Fleet:
    def __init__(self, a, tmp):
        self.a = a
        self.tmp = tmp
        self.procs = {}

    def spawn(self, name, cmd, listening=True):
        log = open(os.path.join(self.tmp, f"{name}.log"), "w")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        self.procs[name] = p
        line = ""
        if listening:
            line = p.stdout.readline().strip()
            if not line.startswith("LISTENING"):
                raise SystemExit(f"{name} did not start: {line!r}; log {log.name}")
        return p, line

    def log(self, name):
        with open(os.path.join(self.tmp, f"{name}.log")) as f:
            return f.read()

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def chat(proxy, stream, max_tokens, prompt="Write a short story about a lighthouse keeper."):
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    req = urllib.request.Request(
        f"{proxy}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    out = {"status": None, "pool": None, "text": "", "error": None, "done": False, "first_token_at": None}
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            out["status"] = r.status
            out["pool"] = r.headers.get("x-switchyard-pool")
            if not stream:
                v = json.load(r)
                out["text"] = v["choices"][0]["message"]["content"]
                out["done"] = True
                return out
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out["done"] = True
                    continue
                v = json.loads(data)
                if "error" in v:
                    out["error"] = v["error"]
                    continue
                choices = v.get("choices") or [{}]
                t = (choices[0].get("delta") or {}).get("content")
                if t:
                    if out["first_token_at"] is None:
                        out["first_token_at"] = time.time()
                    out["text"] += t
    except urllib.error.HTTPError as e:
        out["status"] = e.code
        out["error"] = e.read().decode(errors="replace")
    except Exception as e:  # a cut connection
        out["error"] = repr(e)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--switchyard", required=True)
    ap.add_argument("--worker", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    model = os.path.abspath(a.model)
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        isa = "AVX-512" if "avx512f" in info else ("AVX2" if "avx2" in info else "no AVX2")
        cpu = f"{cpu}, {isa}, {os.cpu_count()} cores"
    except Exception:
        pass
    print(f"host: {cpu}; {platform.platform()}")

    tmp = tempfile.mkdtemp(prefix="switchyard-llamacpp-")
    rules = os.path.join(tmp, "rules.yaml")
    with open(rules, "w") as f:
        f.write(f"""version: 1
models:
  smollm2:
    tokenizer: {{ gguf: {model} }}
    context_window: 2048
    default_max_tokens: 64
pools:
  llamacpp-spot: {{ class: cpu, capacity: spot,      cost_per_hour: 0.10, upstream: {{ api_key: {{ env: LLAMA_API_KEY }} }} }}
  cpu-ondemand:  {{ class: cpu, capacity: on_demand, cost_per_hour: 0.20 }}
rules:
  - name: all
    route: [llamacpp-spot, cpu-ondemand]
""")
    fleet = Fleet(a, tmp)
    try:
        run(fleet, a, model, rules)
    finally:
        fleet.stop()
    print(f"logs: {tmp}")
    if FAILED:
        print(f"{len(FAILED)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


def run(fleet, a, model, rules):
    os.environ["LLAMA_API_KEY"] = API_KEY  # the router reads the pool's key from it
    _, line = fleet.spawn("router", [a.switchyard, "serve", "--rules", rules, "--listen", "127.0.0.1:0",
                                     "--grpc", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                                     "--heartbeat-ms", "200", "--lease-ttl-ms", "1000"])
    fields = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
    proxy, grpc, admin = fields["proxy"], fields["grpc"], fields["admin"]

    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    llama_cmd = [a.llama_server, "--model", model, "--alias", "smollm2", "--host", "127.0.0.1",
                 "--port", str(port), "--metrics", "--parallel", "2", "--ctx-size", "4096",
                 "--threads", "1", "--api-key", API_KEY]
    engine_url = f"http://127.0.0.1:{port}"

    def start_llama():
        fleet.spawn("llama-server", llama_cmd, listening=False)
        t0 = time.time()
        wait("llama-server", lambda: urllib.request.urlopen(f"{engine_url}/health", timeout=2).status == 200)
        return time.time() - t0

    print(f"llama-server ready in {start_llama():.1f} s")
    sidecar, _ = fleet.spawn("sidecar", [a.worker, "--engine-url", engine_url, "--engine", "llamacpp",
                                         "--engine-api-key", API_KEY,
                                         "--router", grpc, "--pool", "llamacpp-spot",
                                         "--worker-id", "llamacpp-0", "--engine-poll-ms", "200",
                                         "--listen", "127.0.0.1:0", "--drain-timeout-s", "120"])
    fleet.spawn("worker", [a.worker, "--model", model, "--model-name", "smollm2", "--pool", "cpu-ondemand",
                           "--router", grpc, "--worker-id", "cpu-0", "--threads", "1"]
                if False else
                [a.worker, "--model", model, "--model-name", "smollm2", "--pool", "cpu-ondemand",
                 "--router", grpc, "--worker-id", "cpu-0"])

    def entry():
        for w in get_json(f"{admin}/admin/workers"):
            if w["id"] == "llamacpp-0":
                return w
        return None

    wait("both workers", lambda: len([w for w in get_json(f"{admin}/admin/workers") if w["state"] == "live"]) == 2)

    # 1 registration
    w = entry()
    print("registered:", json.dumps({k: w[k] for k in ("engine", "address", "models", "max_concurrency")}))
    check(w["engine"] == "llamacpp", "registered as engine llamacpp")
    check(w["address"] == f"127.0.0.1:{port}", "at the engine's own address (data plane direct)")
    check(w["models"][0]["name"] == "smollm2", "model id from llama-server --alias")
    check(w["models"][0]["max_context"] == 2048, "context per slot from llama.cpp (4096 / 2 slots)")
    check(w["max_concurrency"] == 2, "slots as max concurrency")

    # the engine enforces its key: only the router's requests (with the pool's key) pass
    try:
        urllib.request.urlopen(urllib.request.Request(
            f"{engine_url}/v1/chat/completions", data=b'{"messages":[{"role":"user","content":"hi"}]}',
            headers={"content-type": "application/json"}), timeout=10)
        status = 200
    except urllib.error.HTTPError as e:
        status = e.code
    check(status == 401, f"llama-server refuses a request without its API key ({status})")

    # 2 routing and load
    lat = []
    for _ in range(5):
        t0 = time.time()
        r = chat(proxy, False, 16)
        lat.append(time.time() - t0)
        check(r["status"] == 200 and r["pool"] == "llamacpp-spot" and r["text"], "JSON answer from llama.cpp")
    r = chat(proxy, True, 16)
    check(r["status"] == 200 and r["pool"] == "llamacpp-spot" and r["done"] and not r["error"], "stream from llama.cpp")
    lat.sort()
    print(f"JSON requests through the router to llama.cpp, 16 tokens: median {lat[len(lat)//2]*1000:.0f} ms")
    seen = {"max": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                e = entry()
                if e:
                    seen["max"] = max(seen["max"], e["reported"]["in_flight"])
            except Exception:
                pass
            time.sleep(0.05)
    t = threading.Thread(target=poll)
    t.start()
    chat(proxy, True, 160)
    stop.set()
    t.join()
    check(seen["max"] >= 1, f"llama.cpp's load in /admin/workers while a stream ran (in_flight up to {seen['max']})")

    # 3 kill the engine mid-work
    results = [None] * 8
    def one(i):
        results[i] = chat(proxy, i % 2 == 1, 96, prompt=f"Tell me fact number {i} about the sea.")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    wait("the engine to be busy", lambda: (entry() or {}).get("reported", {}).get("in_flight", 0) >= 1, timeout=30, every=0.02)
    time.sleep(0.3)
    left = {}

    def watch_leave():
        while time.time() - killed_at < 30:
            try:
                if entry() is None:
                    left["at"] = time.time()
                    return
            except Exception:
                pass
            time.sleep(0.02)
    killed_at = time.time()
    fleet.procs["llama-server"].send_signal(signal.SIGKILL)
    watcher = threading.Thread(target=watch_leave)
    watcher.start()
    for th in threads:
        th.join()
    watcher.join()
    js = [r for i, r in enumerate(results) if i % 2 == 0]
    ss = [r for i, r in enumerate(results) if i % 2 == 1]
    js_ok = sum(1 for r in js if r["status"] == 200 and r["done"] and not r["error"])
    early = [r for r in ss if r["first_token_at"] is None or r["first_token_at"] > killed_at]
    late = [r for r in ss if r not in early]
    early_ok = sum(1 for r in early if r["status"] == 200 and r["done"] and not r["error"])
    failed_over = sum(1 for r in js + early if r["pool"] == "cpu-ondemand")
    print(f"kill: JSON {js_ok}/{len(js)} complete; streams without a token at the kill {early_ok}/{len(early)} complete; "
          f"{failed_over} of those answered by cpu-ondemand; streams already committed: {len(late)} "
          f"({sum(1 for r in late if r['error'])} ended with an error event)")
    check(js_ok == len(js), "every JSON request completed despite the kill (failed over)")
    check(early_ok == len(early), "every stream without a token yet completed with no error (failed over)")
    check("at" in left, "the sidecar took the dead engine out of routing")
    if "at" in left:
        print(f"the sidecar took the dead engine out of routing {left['at'] - killed_at:.2f} s after the kill")
    r = chat(proxy, False, 8)
    check(r["status"] == 200 and r["pool"] == "cpu-ondemand", "requests go to cpu-ondemand meanwhile")

    # 4 restart
    print(f"llama-server back in {start_llama():.1f} s")
    wait("the engine to be registered again", lambda: (entry() or {}).get("state") == "live", timeout=30)
    r = chat(proxy, False, 8)
    check(r["status"] == 200 and r["pool"] == "llamacpp-spot", "the restarted engine is routed to again")

    # 5 drain
    out = {}
    long = threading.Thread(target=lambda: out.update(chat(proxy, True, 200)))
    long.start()
    wait("the stream to run on the engine", lambda: (entry() or {}).get("reported", {}).get("in_flight", 0) >= 1, timeout=30, every=0.02)
    t_term = time.time()
    sidecar.send_signal(signal.SIGTERM)
    wait("draining", lambda: (entry() or {}).get("state") == "draining", timeout=5, every=0.02)
    print(f"draining on the router {time.time() - t_term:.2f} s after SIGTERM")
    r = chat(proxy, False, 8)
    check(r["status"] == 200 and r["pool"] == "cpu-ondemand", "new work goes elsewhere during the drain")
    long.join()
    check(out.get("status") == 200 and out.get("pool") == "llamacpp-spot" and out.get("done") and not out.get("error"),
          "the running stream finished on the engine")
    code = sidecar.wait(timeout=60)
    print(f"the sidecar exited {time.time() - t_term:.2f} s after SIGTERM (status {code})")
    check(code == 0, "the sidecar exited cleanly")
    check(entry() is None, "the engine is deregistered")
    check("the engine is idle" in fleet.log("sidecar"), "it waited for llama.cpp to report no request")


if __name__ == "__main__":
    sys.exit(main())
