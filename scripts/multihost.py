#!/usr/bin/env python3
"""Helpers of scripts/multihost.sh (issue #19), Python 3 standard library only.

    multihost.py gguf PATH                 the tiny llama GGUF the tests use (its tokenizer)
    multihost.py load ...                  a load client; one JSON line per request
    multihost.py wait ...                  waits until routers list (or stop listing) workers
    multihost.py watch ...                 polls routers' /admin/workers, one line per change
    multihost.py readyz-watch ...          what a restarting router's /readyz says, and when
    multihost.py busiest ...               the worker with the most requests in flight
    multihost.py report ...                reads a load run (+ router access logs): figures
    multihost.py impair ...                a userspace switch that delays and drops frames
                                           (for kernels without sch_netem)
    multihost.py offloads-off DEV...       turns checksum/segmentation offloads off (ioctl)

Every command prints machine-readable lines; multihost.sh decides PASS/FAIL.
"""

import argparse
import fcntl
import heapq
import http.client
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time

# --------------------------------------------------------------------------------------
# gguf: the tiny test model (a port of model_meta::tiny::write_tiny_llama)
# --------------------------------------------------------------------------------------

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_alphabet():
    """GPT-2's byte-to-unicode table: the 256 symbols of a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return sorted(chr(c) for c in cs)


def write_gguf(path, context_length=2048):
    hidden, heads, kv_heads, layers, ffn = 32, 4, 2, 2, 64
    tokens = byte_level_alphabet() + SPECIALS
    types = [1] * 256 + [3] * len(SPECIALS)
    vocab = len(tokens)
    eos = 256 + len(SPECIALS) - 1
    head_dim = hidden // heads
    kv_dim = head_dim * kv_heads
    rng = random.Random(0x5717C4)

    def rand(shape, scale):
        n = 1
        for d in shape:
            n *= d
        return shape, struct.pack(f"<{n}f", *(rng.uniform(-scale, scale) for _ in range(n)))

    def ones(n):
        return [n], struct.pack(f"<{n}f", *([1.0] * n))

    tensors = [
        ("token_embd.weight", *rand([vocab, hidden], 0.5)),
        ("output_norm.weight", *ones(hidden)),
        ("output.weight", *rand([vocab, hidden], 0.5)),
    ]
    for layer in range(layers):
        p = f"blk.{layer}"
        tensors += [
            (f"{p}.attn_q.weight", *rand([hidden, hidden], 0.2)),
            (f"{p}.attn_k.weight", *rand([kv_dim, hidden], 0.2)),
            (f"{p}.attn_v.weight", *rand([kv_dim, hidden], 0.2)),
            (f"{p}.attn_output.weight", *rand([hidden, hidden], 0.2)),
            (f"{p}.ffn_gate.weight", *rand([ffn, hidden], 0.2)),
            (f"{p}.ffn_up.weight", *rand([ffn, hidden], 0.2)),
            (f"{p}.ffn_down.weight", *rand([hidden, ffn], 0.2)),
            (f"{p}.attn_norm.weight", *ones(hidden)),
            (f"{p}.ffn_norm.weight", *ones(hidden)),
        ]
    U32, I32, F32, STR, ARR = 4, 5, 6, 8, 9

    def s(v):
        b = v.encode()
        return struct.pack("<Q", len(b)) + b

    def kv(key, typ, val):
        out = s(key) + struct.pack("<I", typ)
        if typ == U32:
            return out + struct.pack("<I", val)
        if typ == F32:
            return out + struct.pack("<f", val)
        if typ == STR:
            return out + s(val)
        elem, items = val
        out += struct.pack("<IQ", elem, len(items))
        for it in items:
            out += s(it) if elem == STR else struct.pack("<i", it)
        return out

    meta = [
        kv("general.architecture", STR, "llama"),
        kv("general.name", STR, "tiny-llama"),
        kv("llama.context_length", U32, context_length),
        kv("llama.embedding_length", U32, hidden),
        kv("llama.block_count", U32, layers),
        kv("llama.feed_forward_length", U32, ffn),
        kv("llama.attention.head_count", U32, heads),
        kv("llama.attention.head_count_kv", U32, kv_heads),
        kv("llama.rope.dimension_count", U32, head_dim),
        kv("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        kv("tokenizer.ggml.model", STR, "gpt2"),
        kv("tokenizer.ggml.pre", STR, "smollm"),
        kv("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        kv("tokenizer.ggml.token_type", ARR, (I32, types)),
        kv("tokenizer.ggml.merges", ARR, (STR, [])),
        kv("tokenizer.ggml.eos_token_id", U32, eos),
        kv("tokenizer.ggml.bos_token_id", U32, eos - 2),
        kv("tokenizer.chat_template", STR, CHATML),
    ]
    align = 32
    infos, offset = [], 0
    for name, shape, data in tensors:
        dims = list(reversed(shape))  # GGUF lists the innermost dimension first
        infos.append(s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", 0, offset))  # type 0: F32
        offset += (len(data) + align - 1) // align * align
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)) + b"".join(meta) + b"".join(infos)
    head += b"\0" * (-len(head) % align)
    with open(path, "wb") as f:
        f.write(head)
        for _, _, data in tensors:
            f.write(data + b"\0" * (-len(data) % align))


# --------------------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------------------


def split_url(url):
    scheme, rest = url.split("://", 1)
    hostport = rest.split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    return scheme, host, int(port)


def get_json(url, token=None, timeout=2.0, ctx=None):
    scheme, host, port = split_url(url)
    path = "/" + url.split("://", 1)[1].split("/", 1)[1] if "/" in url.split("://", 1)[1] else "/"
    if scheme == "https":
        c = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        body = r.read()
        return r.status, json.loads(body) if body else None
    finally:
        c.close()


def live_workers(admin, token, timeout=1.0):
    """The ids of the workers a router lists as live (None when it does not answer)."""
    try:
        status, body = get_json(f"{admin}/admin/workers", token, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError):
        return None
    if status != 200:
        return None
    return sorted(w["id"] for w in body if w.get("routing_state") == "live" and not w.get("static"))


# --------------------------------------------------------------------------------------
# load: a client alternating between routers
# --------------------------------------------------------------------------------------


def cmd_load(a):
    targets = a.targets.split(",")
    deadline = time.time() + a.duration if a.duration else None
    lock = threading.Lock()
    counter = [0]
    out = open(a.out, "w") if a.out else sys.stdout
    stop_file = a.stop_file
    body_for = {}

    def body(model):
        if model not in body_for:
            body_for[model] = json.dumps({
                "model": model,
                "messages": [{"role": "user", "content": "Say hi. " + "ab " * a.filler}],
                "max_tokens": a.max_tokens,
                "temperature": 0,
            }).encode()
        return body_for[model]

    def next_index():
        with lock:
            if a.requests and counter[0] >= a.requests:
                return None
            if deadline and time.time() >= deadline:
                return None
            if stop_file and os.path.exists(stop_file):
                return None
            counter[0] += 1
            return counter[0] - 1

    def one(target, rid):
        """One POST; (status, headers, body, error). A fresh connection each time, so a
        dead router shows as a refused connect, as a load balancer would see it."""
        _, host, port = split_url(target)
        c = http.client.HTTPConnection(host, port, timeout=a.timeout)
        try:
            headers = {"content-type": "application/json", "x-request-id": rid}
            if a.api_key:
                headers["authorization"] = f"Bearer {a.api_key}"
            c.request("POST", "/v1/chat/completions", body=body(a.model), headers=headers)
            r = c.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data, None
        except (OSError, http.client.HTTPException) as e:
            return None, {}, b"", f"{type(e).__name__}: {e}"
        finally:
            c.close()

    # like a load balancer in front of the routers: a router whose /readyz does not
    # answer 200 gets no new requests while another one does
    # (--ready-pool: and only once that pool has a live worker there; --ready-log gets a
    # line `<time> <target> <status> <pool there 0|1>` each time that changes)
    readyz = a.readyz.split(",") if a.readyz else []
    ready = [True] * len(targets)
    ready_log = open(a.ready_log, "w") if a.ready_log else None

    def poll_ready():
        seen = {}
        while True:
            for k, url in enumerate(readyz):
                try:
                    status, body = get_json(f"{url}/readyz", timeout=0.5)
                except (OSError, http.client.HTTPException, ValueError):
                    status, body = None, None
                has_pool = int(bool(a.ready_pool and body and a.ready_pool in body.get("pools_with_capacity", [])))
                ready[k] = status == 200 and (not a.ready_pool or has_pool == 1)
                if ready_log and seen.get(k) != (status, has_pool):
                    seen[k] = (status, has_pool)
                    ready_log.write(f"{time.time():.3f} {k} {status} {has_pool}\n")
                    ready_log.flush()
            time.sleep(0.05)

    if readyz:
        threading.Thread(target=poll_ready, daemon=True).start()

    def client(cid):
        if a.jitter_ms:  # clients out of step with each other
            time.sleep(rng.uniform(0, a.jitter_ms) / 1000)
        while True:
            i = next_index()
            if i is None:
                return
            first = i % len(targets)
            if not ready[first]:
                others = [k for k in range(len(targets)) if ready[k]]
                if others:
                    first = others[i % len(others)]
            rid = f"{a.tag}-{i:06d}"
            t0 = time.time()
            status, headers, data, err = one(targets[first], rid)
            fell_back = False
            if status is None and a.fallback and len(targets) > 1:
                # the router could not be reached (or dropped the connection before any
                # answer): the other one, as a load balancer in front of both would do
                fell_back = True
                first_err = err
                status, headers, data, err = one(targets[(first + 1) % len(targets)], rid + "-b")
                err = err and f"{first_err}; then {err}"
            t1 = time.time()
            rec = {
                "id": rid, "router": first, "start": t0, "end": t1, "ms": (t1 - t0) * 1000,
                "status": status, "attempts": int(headers.get("x-switchyard-attempts", "0") or 0),
                "pool": headers.get("x-switchyard-pool"), "fell_back": fell_back, "error": err,
            }
            if status == 200 and a.expect_text:
                try:
                    content = json.loads(data)["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    content = None
                if content != a.expect_text:
                    rec["error"] = f"unexpected content {content!r}"
            elif status != 200 and err is None:
                rec["error"] = data[:200].decode(errors="replace")
            with lock:
                out.write(json.dumps(rec) + "\n")
                out.flush()
            if a.pause_ms:
                time.sleep(a.pause_ms / 1000)
            if a.jitter_ms:
                time.sleep(rng.uniform(0, a.jitter_ms) / 1000)

    rng = random.Random()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if out is not sys.stdout:
        out.close()


# --------------------------------------------------------------------------------------
# wait / watch: the routers' registries
# --------------------------------------------------------------------------------------


def cmd_wait(a):
    """Waits until every admin URL lists exactly (--present) / none of (--absent) the ids.
    Prints `<seconds since --since> <admin>` for each router as it gets there."""
    admins = a.admins.split(",")
    present = set(a.present.split(",")) if a.present else None
    absent = set(a.absent.split(",")) if a.absent else set()
    since = a.since or time.time()
    done = {}
    end = time.time() + a.timeout
    while time.time() < end and len(done) < len(admins):
        for adm in admins:
            if adm in done:
                continue
            ids = live_workers(adm, a.token)
            if ids is None:
                continue
            ok = (present is None or present.issubset(ids)) and not (absent & set(ids))
            if ok:
                done[adm] = time.time() - since
                print(f"{done[adm]:.3f} {adm}", flush=True)
        time.sleep(a.interval)
    for adm in admins:
        if adm not in done:
            print(f"TIMEOUT {adm} {live_workers(adm, a.token)}", flush=True)
    sys.exit(0 if len(done) == len(admins) else 1)


def cmd_watch(a):
    """Polls every admin URL; prints `<unix time> <admin> <ids comma-separated | DOWN>` on
    each change, until --stop-file exists."""
    admins = a.admins.split(",")
    last = {}
    while not (a.stop_file and os.path.exists(a.stop_file)):
        for adm in admins:
            ids = live_workers(adm, a.token, timeout=3.0)
            v = "DOWN" if ids is None else (",".join(ids) or "-")
            if last.get(adm) != v:
                last[adm] = v
                print(f"{time.time():.3f} {adm} {v}", flush=True)
        time.sleep(a.interval)


def cmd_readyz_watch(a):
    """Polls <admin>/readyz every 10 ms (a router that is down or restarting: until it
    answers) until --pool has a live worker there. Prints what a load balancer checking the
    status alone would have seen: the first answer, and how long /readyz said 200 while the
    pool had no worker."""
    end = time.time() + a.timeout
    first = None
    ok_without = None
    while time.time() < end:
        try:
            status, body = get_json(f"{a.admin}/readyz", timeout=0.5)
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(0.01)
            continue
        t = time.time()
        pools = (body or {}).get("pools_with_capacity", [])
        if first is None:
            first = {"t": t, "status": status, "pools": pools}
        if status == 200 and a.pool not in pools and ok_without is None:
            ok_without = t
        if a.pool in pools:
            print(json.dumps({
                "first_status": first["status"], "first_pools": first["pools"],
                "ready_without_pool_ms": round((t - ok_without) * 1000) if ok_without else 0,
                "pool_after_first_answer_ms": round((t - first["t"]) * 1000),
            }), flush=True)
            return
        time.sleep(0.01)
    print(json.dumps({"timeout": True, "first": first}), flush=True)
    sys.exit(1)


def cmd_busiest(a):
    """Prints a registered worker that has just been sent a request (its in-flight count,
    all routers together, went up since the last poll 10 ms before) and has at least --min
    in flight: cut off now, it surely has a request still waiting for its first token."""
    end = time.time() + a.timeout
    prev = {}
    while time.time() < end:
        load = {}
        for adm in a.admins.split(","):
            try:
                status, body = get_json(f"{adm}/admin/workers", a.token, timeout=1.0)
            except (OSError, http.client.HTTPException, ValueError):
                continue
            if status != 200:
                continue
            for w in body:
                if not w.get("static") and w.get("routing_state") == "live":
                    load[w["id"]] = load.get(w["id"], 0) + w.get("router_in_flight", 0)
        fresh = [w for w in sorted(load) if load[w] >= a.min and w in prev and load[w] > prev[w]]
        if fresh:
            wid = max(fresh, key=lambda k: load[k])
            print(f"{wid} {load[wid]}", flush=True)
            return
        prev = load
        time.sleep(0.01)
    sys.exit(1)


# --------------------------------------------------------------------------------------
# report: figures of a load run
# --------------------------------------------------------------------------------------


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]


def access_lines(paths):
    """request_id -> the router's access line (JSON logs)."""
    # the router writes its log in batches, at most 10 ms after the lines are logged
    time.sleep(0.1)
    out = {}
    for p in paths:
        try:
            with open(p, errors="replace") as f:
                for line in f:
                    if '"request"' not in line:
                        continue
                    try:
                        j = json.loads(line)
                    except ValueError:
                        continue
                    if j.get("message") == "request" and "request_id" in j:
                        out[j["request_id"]] = j
        except OSError:
            pass
    return out


def cmd_report(a):
    recs = []
    with open(a.run) as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
    ok = [r for r in recs if r["status"] == 200 and not r["error"]]
    errs = [r for r in recs if not (r["status"] == 200 and not r["error"])]
    lat = [r["ms"] for r in ok]
    res = {
        "requests": len(recs), "ok": len(ok), "errors": len(errs),
        "p50_ms": round(pct(lat, 50), 1), "p95_ms": round(pct(lat, 95), 1),
        "max_ms": round(max(lat), 1) if lat else None,
        "by_router": {}, "fell_back": sum(1 for r in recs if r.get("fell_back")),
        "retried": sum(1 for r in ok if r["attempts"] > 1),
        "first_errors": [f'{r["id"]} status={r["status"]} {r["error"]}' for r in errs[:5]],
    }
    for r in recs:
        k = str(r["router"])
        res["by_router"].setdefault(k, [0, 0])
        res["by_router"][k][0] += 1
        if r in errs:
            res["by_router"][k][1] += 1
    if a.at:
        # requests in flight at `--at` (the partition), joined with the routers' access
        # lines: which worker served each, and which attempts failed
        logs = access_lines(a.logs.split(",")) if a.logs else {}
        inflight = [r for r in recs if r["start"] < a.at < r["end"]]
        rows = []
        for r in inflight:
            line = logs.get(r["id"]) or logs.get(r["id"] + "-b") or {}
            rows.append({
                "id": r["id"], "status": r["status"], "ms": round(r["ms"]), "attempts": r["attempts"],
                "worker": line.get("worker"), "failures": line.get("failures", ""),
                # sent less than the worker's time to first token before the partition: its
                # answer's header (which comes with the first token) cannot have left yet
                "before_header": (a.at - r["start"]) * 1000 < a.ttft_ms,
                "age_ms": round((a.at - r["start"]) * 1000), "end": r["end"],
            })
        on_part = [x for x in rows if a.worker and (x["worker"] == a.worker or a.worker in (x["failures"] or ""))]
        res["in_flight"] = len(rows)
        res["in_flight_on_worker"] = len(on_part)
        res["in_flight_on_worker_failed_over"] = sum(1 for x in on_part if x["worker"] != a.worker and x["status"] == 200)
        pre = [x for x in on_part if x["before_header"]]
        res["before_header"] = len(pre)
        res["before_header_failed_over"] = sum(1 for x in pre if x["worker"] != a.worker and x["status"] == 200)
        # served by the cut-off worker after all: at the cut (its answer already on the
        # way), or held by the router until the link came back
        by_it = [x for x in on_part if x["worker"] == a.worker]
        held = [x for x in by_it if a.heal and x["end"] > a.heal]
        res["held"] = len(held)
        res["held_max_ms"] = max((x["ms"] for x in held), default=0)
        res["finished_at_cut"] = len(by_it) - len(held)
        res["in_flight_on_worker_rows"] = on_part
        # after the partition began, every request the partitioned worker answered
        served_after = [r for r in recs if r["start"] > a.at and (logs.get(r["id"]) or {}).get("worker") == a.worker]
        res["started_after_served_by_worker"] = len(served_after)
        res["failed_attempts_on_worker"] = sum(
            1 for j in logs.values() if a.worker and a.worker in (j.get("failures") or "")
        )
    if a.workers_from:
        logs = access_lines(a.workers_from.split(","))
        per = {}
        for r in ok:
            line = logs.get(r["id"]) or logs.get(r["id"] + "-b") or {}
            key = f'r{r["router"] + 1}/{line.get("worker")}'
            per[key] = per.get(key, 0) + 1
        res["served_by"] = dict(sorted(per.items()))
    print(json.dumps(res))


# --------------------------------------------------------------------------------------
# impair: a userspace L2 switch with netem's delay/jitter/loss (no sch_netem needed)
# --------------------------------------------------------------------------------------

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def cmd_impair(a):
    """Forwards frames between the given ports (interfaces detached from the bridge) like a
    learning switch; every frame leaving a port is dropped with --loss, else sent
    --delay-ms ± --jitter-ms (uniform, as netem without a distribution table) later.
    Frames are scheduled independently, so jitter reorders them, as netem's does."""
    ports = a.ports.split(",")
    socks = {}
    for p in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((p, 0))
        s.setblocking(False)
        socks[p] = s
    by_fd = {s.fileno(): p for p, s in socks.items()}
    where = {}  # source MAC -> port
    queue = []  # (due, seq, port, frame)
    seq = 0
    stats = {"frames": 0, "dropped": 0, "sent": 0}
    rng = random.Random(a.seed)
    poll = select.epoll()
    for fd in by_fd:
        poll.register(fd, select.EPOLLIN)
    stop = [False]

    def on_term(*_):
        stop[0] = True

    import signal
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print("IMPAIRING " + ",".join(ports), flush=True)
    while not stop[0]:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, port, frame = heapq.heappop(queue)
            try:
                socks[port].send(frame)
                stats["sent"] += 1
            except OSError:
                stats["dropped"] += 1
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 0.2
        for fd, _ in poll.poll(min(timeout, 0.2)):
            src_port = by_fd[fd]
            s = socks[src_port]
            while True:
                try:
                    frame, addr = s.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                stats["frames"] += 1
                dst, src = frame[0:6], frame[6:12]
                where[src] = src_port
                outs = [where[dst]] if dst in where and not dst[0] & 1 else [p for p in ports if p != src_port]
                for p in outs:
                    if p == src_port:
                        continue
                    if a.loss and rng.random() < a.loss:
                        stats["dropped"] += 1
                        continue
                    d = a.delay_ms + (rng.uniform(-a.jitter_ms, a.jitter_ms) if a.jitter_ms else 0)
                    seq += 1
                    heapq.heappush(queue, (time.monotonic() + max(0.0, d) / 1000, seq, p, frame))
    print("IMPAIR-STATS " + json.dumps(stats), flush=True)


# SIOCETHTOOL with the legacy set commands: tx checksum, scatter-gather, TSO, GSO, GRO.
SIOCETHTOOL = 0x8946
ETHTOOL_SETS = [(0x00000017, "tx-checksum"), (0x00000019, "sg"), (0x0000001F, "tso"),
                (0x00000024, "gso"), (0x0000002C, "gro")]


def cmd_offloads_off(a):
    """Frames copied through a packet socket lose the kernel's offload metadata: a frame
    handed over with a partial checksum or as a 64 KiB segment would arrive broken. So
    the hosts send whole, checksummed frames while `impair` runs."""
    import array
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for dev in a.devs:
        for cmd, name in ETHTOOL_SETS:
            buf = array.array("B", struct.pack("<II", cmd, 0))
            addr, _ = buf.buffer_info()
            ifr = struct.pack("16sP", dev.encode(), addr) + b"\0" * 16
            try:
                fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
            except OSError as e:
                print(f"offloads-off {dev} {name}: {e}", file=sys.stderr)


# --------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("gguf")
    p.add_argument("path")
    p = sub.add_parser("load")
    p.add_argument("--targets", required=True)
    p.add_argument("--model", default="tiny")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=0)
    p.add_argument("--duration", type=float, default=0)
    p.add_argument("--stop-file")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--filler", type=int, default=10)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--pause-ms", type=float, default=0)
    p.add_argument("--fallback", action="store_true")
    p.add_argument("--readyz", help="admin URLs, one per target, whose /readyz gates it")
    p.add_argument("--ready-pool")
    p.add_argument("--ready-log")
    p.add_argument("--jitter-ms", type=float, default=0)
    p.add_argument("--api-key")
    p.add_argument("--expect-text")
    p.add_argument("--tag", default="req")
    p.add_argument("--out")
    p = sub.add_parser("wait")
    p.add_argument("--admins", required=True)
    p.add_argument("--token")
    p.add_argument("--present")
    p.add_argument("--absent")
    p.add_argument("--since", type=float)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--interval", type=float, default=0.05)
    p = sub.add_parser("watch")
    p.add_argument("--admins", required=True)
    p.add_argument("--token")
    p.add_argument("--stop-file", required=True)
    p.add_argument("--interval", type=float, default=0.1)
    p = sub.add_parser("readyz-watch")
    p.add_argument("--admin", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--timeout", type=float, default=30)
    p = sub.add_parser("busiest")
    p.add_argument("--admins", required=True)
    p.add_argument("--token")
    p.add_argument("--timeout", type=float, default=5)
    p.add_argument("--min", type=int, default=1)
    p = sub.add_parser("report")
    p.add_argument("run")
    p.add_argument("--at", type=float)
    p.add_argument("--worker")
    p.add_argument("--ttft-ms", type=float, default=0)
    p.add_argument("--heal", type=float)
    p.add_argument("--logs")
    p.add_argument("--workers-from")
    p = sub.add_parser("impair")
    p.add_argument("--ports", required=True)
    p.add_argument("--delay-ms", type=float, default=0)
    p.add_argument("--jitter-ms", type=float, default=0)
    p.add_argument("--loss", type=float, default=0)
    p.add_argument("--seed", type=int, default=19)
    p = sub.add_parser("offloads-off")
    p.add_argument("devs", nargs="+")
    a = ap.parse_args()
    if a.cmd == "gguf":
        write_gguf(a.path)
    elif a.cmd == "load":
        cmd_load(a)
    elif a.cmd == "wait":
        cmd_wait(a)
    elif a.cmd == "watch":
        cmd_watch(a)
    elif a.cmd == "readyz-watch":
        cmd_readyz_watch(a)
    elif a.cmd == "busiest":
        cmd_busiest(a)
    elif a.cmd == "report":
        cmd_report(a)
    elif a.cmd == "impair":
        cmd_impair(a)
    elif a.cmd == "offloads-off":
        cmd_offloads_off(a)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
