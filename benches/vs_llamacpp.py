#!/usr/bin/env python3
"""The worker engine beside llama.cpp on the same GGUF, threads and machine, interleaved.

Each round runs `llama-bench` (pp = prompt tokens per second over a 1k prompt, tg = one
stream's generated tokens per second over 128 tokens) and then `worker-bench` (prefill of
the same prompt length, decode of 1 and 4 streams of 128 tokens, and the prefix reuse
measurement), and a third run of each process with only pp + tg for peak memory (what the
kernel reports as the child's maximum resident set). Medians over the rounds, ratios
worker / llama.cpp, the CPU's vector extensions printed with them.

    benches/vs-llamacpp.sh [--rounds 3]   # builds both, then runs this
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys


def run(cmd):
    """Runs cmd; returns its stdout."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout


def rss_of(cmd):
    """Runs cmd (output discarded); returns its peak resident set in MiB, as the kernel
    accounts it for that one child (wait4's ru_maxrss)."""
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execv(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        sys.exit(f"{cmd[0]} failed (status {status})")
    return usage.ru_maxrss / 1024


def isa():
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8"]
    return model, [f for f in wanted if f in flags]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--worker-bench", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--shared-prefix", type=int, default=2048)
    a = ap.parse_args()
    model_name, flags = isa()
    print(f"CPU: {model_name}; {os.cpu_count()} cores; ISA: {' '.join(flags)}", flush=True)
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    llama = ([a.llama_bench, "-m", a.model, "-t", str(a.threads), "-p", str(a.prompt),
              "-n", str(a.gen), "-r", "2", "-o", "json"])
    worker = [a.worker_bench, "--model", a.model, "--prompts", str(a.prompt), "--streams", "1,4",
              "--decode-tokens", str(a.gen), "--rounds", "2", "--shared-prefix", str(a.shared_prefix)]
    # memory on equal work: one prompt of `prompt` tokens, one stream of `gen`, no extras
    worker_rss = [a.worker_bench, "--model", a.model, "--prompts", str(a.prompt), "--streams", "1",
                  "--decode-tokens", str(a.gen), "--rounds", "1", "--shared-prefix", "0",
                  "--prefix-cache-mib", "0"]
    rows = {k: [] for k in ["l_pp", "l_tg", "w_pp", "w_tg1", "w_agg4", "w_steady1", "w_steady4",
                            "w_reuse", "l_rss", "w_rss"]}
    for r in range(a.rounds):
        out = run(llama)
        for t in json.loads(out):
            if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0:
                rows["l_pp"].append(t["avg_ts"])
            elif t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0:
                rows["l_tg"].append(t["avg_ts"])
        out = run(worker)
        w = json.loads(out.strip().splitlines()[-1])
        rows["w_pp"].append(w["prefill"][0]["prompt_tok_per_s"])
        d = {x["streams"]: x for x in w["decode"]}
        rows["w_tg1"].append(d[1]["aggregate_tok_per_s"])
        rows["w_steady1"].append(d[1]["steady_tok_per_s"])
        rows["w_agg4"].append(d[4]["aggregate_tok_per_s"])
        rows["w_steady4"].append(d[4]["steady_tok_per_s"])
        if w.get("prefix_reuse"):
            rows["w_reuse"].append(w["prefix_reuse"]["first_over_later_median"])
        rows["l_rss"].append(rss_of(llama[:-2] + ["-o", "csv"]))
        rows["w_rss"].append(rss_of(worker_rss))
        print(f"round {r + 1}: llama pp {rows['l_pp'][-1]:.0f} tg {rows['l_tg'][-1]:.1f} | "
              f"worker pp {rows['w_pp'][-1]:.0f} tg1 {rows['w_tg1'][-1]:.1f} (steady {rows['w_steady1'][-1]:.1f}) "
              f"4-stream {rows['w_agg4'][-1]:.1f} (steady {rows['w_steady4'][-1]:.1f}) "
              f"reuse {rows['w_reuse'][-1] if rows['w_reuse'] else float('nan'):.1f}x | "
              f"RSS llama {rows['l_rss'][-1]:.0f} MiB worker {rows['w_rss'][-1]:.0f} MiB", flush=True)
    m = {k: statistics.median(v) for k, v in rows.items() if v}
    print()
    print(f"medians of {a.rounds} interleaved rounds, {a.threads} threads, {os.path.basename(a.model)}, ISA {' '.join(flags)}")
    print(f"prefill {a.prompt}: worker {m['w_pp']:.0f} tok/s, llama.cpp pp{a.prompt} {m['l_pp']:.0f}: {m['w_pp'] / m['l_pp']:.2f}x")
    print(f"decode 1 stream: worker {m['w_tg1']:.1f} tok/s (steady {m['w_steady1']:.1f}), llama.cpp tg{a.gen} {m['l_tg']:.1f}: "
          f"{m['w_tg1'] / m['l_tg']:.2f}x (steady {m['w_steady1'] / m['l_tg']:.2f}x)")
    print(f"decode 4 streams: {m['w_agg4']:.1f} tok/s aggregate = {m['w_agg4'] / m['w_tg1']:.2f}x one stream "
          f"(steady {m['w_steady4']:.1f} = {m['w_steady4'] / m['w_steady1']:.2f}x)")
    if "w_reuse" in m:
        print(f"prefix reuse ({a.shared_prefix} shared tokens): first TTFT / later TTFT = {m['w_reuse']:.1f}x")
    print(f"peak RSS, pp{a.prompt} + tg{a.gen}: worker {m['w_rss']:.0f} MiB, llama.cpp {m['l_rss']:.0f} MiB: {m['w_rss'] / m['l_rss']:.2f}x")
    print(json.dumps({"isa": flags, "cpu": model_name, "threads": a.threads, "medians": m}))


if __name__ == "__main__":
    main()
