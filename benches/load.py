#!/usr/bin/env python3
"""Side-by-side load harness: direct vs nginx vs Switchyard, each a plain forwarder to the
same mock OpenAI upstream (benches/src/bin/mock-openai.rs).

    python3 benches/load.py [--duration 10] [--rounds 3]

The system under test is pinned to core 0, the mock and the load generator (wrk) to core 1.
Rounds are interleaved so machine noise hits every system alike; figures are reported as
ratios against direct and nginx. Output: benches/results/load-<date>.json and .md.
Installs nginx and wrk from Debian when missing (needs root or sudo).
"""
import argparse, datetime, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = json.dumps({"model": "mock", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "Tell me about tiered routing. " * 30}]})


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def install():
    missing = [p for p, b in (("nginx", "nginx"), ("wrk", "wrk")) if not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        sudo = "" if os.geteuid() == 0 else "sudo "
        sh(f"{sudo}apt-get update -qq && {sudo}apt-get install -y -qq {' '.join(missing)} >/dev/null")


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def tree(pid):
    """`pid` and its child processes (nginx's workers), with their /proc stat fields."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1] is the parent pid
            yield int(entry), fields


def cpu_seconds(pid):
    """CPU time (user + system) of the process tree."""
    tck = os.sysconf("SC_CLK_TCK")
    return sum((int(f[11]) + int(f[12])) / tck for _, f in tree(pid))


def rss_mb(pid):
    """Resident memory of the process tree, MB."""
    total = 0.0
    for p, _ in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:")), 0.0)
        except OSError:
            continue
    return total


def wrk(url, conns, duration, script):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s", script, url],
                         check=True, capture_output=True, text=True).stdout
    def us(tag):
        m = re.search(rf"^\s+{tag}%\s+([\d.]+)(us|ms|s)", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v * {"us": 1, "ms": 1000, "s": 1e6}[unit]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50_us": us("50"), "p99_us": us("99"), "rps": rps, "requests": reqs,
            "non_2xx": int(errors.group(1)) if errors else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-build", action="store_true")
    a = ap.parse_args()
    install()
    if not a.skip_build:
        sh("cargo build --release --bins", cwd=ROOT)
    tmp = tempfile.mkdtemp()
    script = os.path.join(tmp, "post.lua")
    with open(script, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["Content-Type"] = "application/json"\n')
    procs = []
    try:
        mock_port = free_port()
        procs.append(subprocess.Popen(["taskset", "-c", "1", f"{ROOT}/target/release/mock-openai", "--listen", f"127.0.0.1:{mock_port}"], stdout=subprocess.DEVNULL))
        wait_port(mock_port)
        # Switchyard: one pool with the mock as a static worker
        rules = os.path.join(tmp, "rules.yaml")
        with open(rules, "w") as f:
            f.write(f"version: 1\npools:\n  mock: {{ class: cpu, capacity: on_demand, cost_per_hour: 0.2, workers: [\"127.0.0.1:{mock_port}\"] }}\nrules:\n  - name: all\n    route: [mock]\n")
        sy_port, grpc, admin = free_port(), free_port(), free_port()
        sy = subprocess.Popen(["taskset", "-c", "0", f"{ROOT}/target/release/switchyard", "serve", "--rules", rules, "--listen", f"127.0.0.1:{sy_port}",
                               "--grpc", f"127.0.0.1:{grpc}", "--admin", f"127.0.0.1:{admin}", "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "switchyard.log"), "w"), env={**os.environ, "RUST_LOG": "warn"})
        procs.append(sy)
        wait_port(sy_port)
        # nginx: one worker process, keepalive to the upstream
        ng_port = free_port()
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp}; client_max_body_size 64m;
  upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{ng_port}; location / {{ proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }} }} }}""")
        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        ng = subprocess.Popen(["taskset", "-c", "0", nginx_bin, "-c", conf, "-p", tmp])
        procs.append(ng)
        wait_port(ng_port)
        time.sleep(0.5)
        systems = {"direct": (mock_port, None), "nginx": (ng_port, ng.pid), "switchyard": (sy_port, sy.pid)}
        idle_rss = {"switchyard": rss_mb(sy.pid), "nginx": rss_mb(ng.pid)}
        results = {name: {"c1": [], "c32": []} for name in systems}
        for r in range(a.rounds):
            for name, (port, pid) in systems.items():
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                results[name]["c1"].append(wrk(url, 1, a.duration, script))
                cpu0 = cpu_seconds(pid) if pid else None
                res = wrk(url, 32, a.duration, script)
                if pid:
                    res["cpu_s"] = cpu_seconds(pid) - cpu0
                    res["req_per_cpu_s"] = res["requests"] / max(res["cpu_s"], 1e-9)
                results[name]["c32"].append(res)
                print(f"round {r + 1} {name:10} c1 p50 {results[name]['c1'][-1]['p50_us']:.0f}us p99 {results[name]['c1'][-1]['p99_us']:.0f}us | c32 {res['rps']:.0f} rps", file=sys.stderr)
        loaded_rss = {"switchyard": rss_mb(sy.pid), "nginx": rss_mb(ng.pid)}
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()

    def med(xs):
        xs = sorted(xs); return xs[len(xs) // 2]
    summary = {}
    for name in systems:
        c1, c32 = results[name]["c1"], results[name]["c32"]
        summary[name] = {"p50_us": med([x["p50_us"] for x in c1]), "p99_us": med([x["p99_us"] for x in c1]),
                         "rps_c32": med([x["rps"] for x in c32]),
                         "req_per_cpu_s": med([x.get("req_per_cpu_s", 0) for x in c32]),
                         "non_2xx": sum(x["non_2xx"] for x in c1 + c32)}
    d = summary["direct"]
    for name in ("nginx", "switchyard"):
        s = summary[name]
        s["added_p50_us"] = s["p50_us"] - d["p50_us"]
        s["added_p99_us"] = s["p99_us"] - d["p99_us"]
    sy, ng = summary["switchyard"], summary["nginx"]
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M")
    os.makedirs(os.path.join(ROOT, "benches/results"), exist_ok=True)
    raw = {"when": stamp, "rounds": a.rounds, "duration_s": a.duration, "raw": results, "summary": summary,
           "rss_mb": {"idle": idle_rss, "after_load": loaded_rss}}
    with open(os.path.join(ROOT, f"benches/results/load-{stamp}.json"), "w") as f:
        json.dump(raw, f, indent=1)
    md = [f"# Load harness, {stamp} ({a.rounds} interleaved rounds × {a.duration}s; SUT on core 0, mock + wrk on core 1)", "",
          "| system | p50 µs (c=1) | p99 µs (c=1) | added p50 / p99 µs | RPS c=32 | requests per CPU-second | RSS idle / after MB | non-2xx |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("direct", "nginx", "switchyard"):
        s = summary[name]
        added = f"{s.get('added_p50_us', 0):.0f} / {s.get('added_p99_us', 0):.0f}" if name != "direct" else "—"
        rss = f"{idle_rss.get(name, 0):.1f} / {loaded_rss.get(name, 0):.1f}" if name != "direct" else "—"
        md.append(f"| {name} | {s['p50_us']:.0f} | {s['p99_us']:.0f} | {added} | {s['rps_c32']:.0f} | {s['req_per_cpu_s']:.0f} | {rss} | {s['non_2xx']} |")
    md += ["", "Ratios (Switchyard / nginx):",
           f"- added latency p50: {sy['added_p50_us'] / max(ng['added_p50_us'], 1):.2f}×, p99: {sy['added_p99_us'] / max(ng['added_p99_us'], 1):.2f}×",
           f"- requests per CPU-second: {sy['req_per_cpu_s'] / max(ng['req_per_cpu_s'], 1):.2f}×",
           f"- idle RSS: {idle_rss['switchyard'] / max(idle_rss['nginx'], 0.1):.2f}×"]
    with open(os.path.join(ROOT, f"benches/results/load-{stamp}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
