//! `switchyard replay`: a trace of requests replayed through the real router (this binary's
//! `serve`, the same code path as production) in front of a simulated fleet, once per rules
//! file, side by side: what each rules file would cost and how fast it would answer.
//!
//! - **The fleet:** for every pool of a rules file, `--workers` simulated workers
//!   (`switchyard-worker --backend sim`) with the hardware profile of the pool's class
//!   ([`Profile`]: base time to first token, prefill and decode speed, concurrent streams;
//!   override with `--profile class=ttft_ms,prefill_tok_s,decode_tok_s,max_batch`), priced
//!   at the pool's `cost_per_hour`. The simulated workers load each model's tokenizer
//!   (from its GGUF) so token counts are the real ones.
//! - **Time compression:** `--speed N` runs the trace N times faster; every profile's times
//!   are divided by N too, so the fleet is loaded as it would be in real time. Latencies
//!   and costs are reported in real time (multiplied back by N).
//! - **Spot preemption:** `--preempt-every SECONDS` (trace time) SIGKILLs one worker of a spot
//!   pool without notice and starts a replacement, as a spot fleet does.
//! - **The trace** is JSON lines (docs/replay.md): `{"t": seconds, "model", "prompt_tokens",
//!   "max_tokens", "stream", "modality", "tenant"}`, or the router's own JSON access log
//!   (its `request` lines), so yesterday's traffic can be replayed against a new rules file.
//!   `--generate N` writes a synthetic trace instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use crate::demo::{Fleet, spawn};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The trace (JSON lines, or a router's JSON access log).
    #[arg(long, required_unless_present = "generate")]
    trace: Option<PathBuf>,
    /// A rules file to replay the trace against (repeatable: compared side by side).
    #[arg(long = "rules", required_unless_present = "generate")]
    rules: Vec<PathBuf>,
    /// Run the trace this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Kill one spot worker (and start a replacement) every this many trace seconds.
    #[arg(long)]
    preempt_every: Option<f64>,
    /// Simulated workers per pool.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// A class's hardware: `class=ttft_ms,prefill_tok_s,decode_tok_s,max_batch` (repeatable).
    #[arg(long)]
    profile: Vec<String>,
    /// The latency objective attainment is reported against: time to first token (ms).
    #[arg(long, default_value_t = 2000)]
    slo_ttft_ms: u64,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a synthetic trace of this many requests to `--out` and exit.
    #[arg(long)]
    generate: Option<usize>,
    /// Where `--generate` writes.
    #[arg(long, default_value = "trace.jsonl")]
    out: PathBuf,
    /// `--generate`: requests per second (Poisson arrivals).
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// `--generate`: the model the requests name.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// `--generate`: the random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One request of a trace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Seconds from the trace's start.
    pub t: f64,
    pub model: String,
    pub prompt_tokens: u64,
    pub max_tokens: u64,
    #[serde(default = "yes")]
    pub stream: bool,
    /// `text` (default), `image` or `audio`.
    #[serde(default)]
    pub modality: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
}

fn yes() -> bool {
    true
}

/// A hardware class as the simulated workers play it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Profile {
    pub ttft_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub max_batch: u32,
}

/// The default profiles, for an ~8B model (assumed figures of the order published for
/// vLLM on these cards and for llama.cpp on server CPUs; docs/replay.md says how to set
/// your own, which you should).
pub fn default_profile(class: &str) -> Profile {
    match class {
        "h100" => Profile {
            ttft_ms: 40.0,
            prefill_tokens_per_s: 20_000.0,
            decode_tokens_per_s: 90.0,
            max_batch: 64,
        },
        "l40s" => Profile {
            ttft_ms: 60.0,
            prefill_tokens_per_s: 6_000.0,
            decode_tokens_per_s: 45.0,
            max_batch: 32,
        },
        "cpu" => Profile {
            ttft_ms: 150.0,
            prefill_tokens_per_s: 300.0,
            decode_tokens_per_s: 12.0,
            max_batch: 4,
        },
        _ => Profile {
            ttft_ms: 80.0,
            prefill_tokens_per_s: 5_000.0,
            decode_tokens_per_s: 40.0,
            max_batch: 16,
        },
    }
}

fn parse_profile(s: &str) -> Result<(String, Profile)> {
    let (class, rest) = s
        .split_once('=')
        .context("--profile wants class=ttft_ms,prefill_tok_s,decode_tok_s,max_batch")?;
    let v: Vec<&str> = rest.split(',').collect();
    if v.len() != 4 {
        bail!("--profile {s}: four values, got {}", v.len());
    }
    let num = |i: usize| -> Result<f64> {
        v[i].trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x > 0.0)
            .with_context(|| format!("--profile {s}: `{}` is not a positive number", v[i]))
    };
    Ok((
        class.to_string(),
        Profile {
            ttft_ms: num(0)?,
            prefill_tokens_per_s: num(1)?,
            decode_tokens_per_s: num(2)?,
            max_batch: num(3)? as u32,
        },
    ))
}

/// Reads a trace: its own format, or a router's JSON access log (`request` lines: their
/// time, model, tenant, prompt tokens, and completion tokens as `max_tokens`).
pub fn read_trace(text: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut first_ts: Option<f64> = None;
    // access lines, at their epoch times until the earliest is known
    let mut logged = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("line {}: not JSON", i + 1))?;
        if v.get("message").and_then(Value::as_str) == Some("request") {
            // the router's access line
            let (Some(ts), Some(model)) = (
                v.get("timestamp")
                    .and_then(Value::as_str)
                    .and_then(rfc3339_seconds),
                v.get("model")
                    .and_then(Value::as_str)
                    .filter(|m| !m.is_empty()),
            ) else {
                continue;
            };
            // the line is written as the request ends: it arrived `ms` before
            let ts = ts - v["ms"].as_f64().unwrap_or(0.0) / 1000.0;
            first_ts = Some(first_ts.map_or(ts, |f: f64| f.min(ts)));
            logged.push(Record {
                t: ts,
                model: model.to_string(),
                prompt_tokens: v["prompt_tokens"].as_u64().unwrap_or(1),
                max_tokens: v["completion_tokens"].as_u64().unwrap_or(64).max(1),
                stream: true,
                modality: None,
                tenant: v["tenant"].as_str().map(str::to_string),
            });
            continue;
        }
        let r: Record = serde_json::from_value(v)
            .with_context(|| format!("line {}: not a trace record", i + 1))?;
        out.push(r);
    }
    // access-log times become seconds from the earliest arrival
    let t0 = first_ts.unwrap_or(0.0);
    out.extend(logged.into_iter().map(|r| Record { t: r.t - t0, ..r }));
    out.sort_by(|a, b| a.t.total_cmp(&b.t));
    if out.is_empty() {
        bail!("the trace has no requests");
    }
    if out.iter().any(|r| !(r.t.is_finite() && r.t >= 0.0)) {
        bail!("the trace has a request at a negative or unreadable time");
    }
    Ok(out)
}

/// Seconds since the epoch of an RFC 3339 time (`2026-12-07T05:55:17.511302Z`).
fn rfc3339_seconds(t: &str) -> Option<f64> {
    let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// A synthetic mixed trace (docs/replay.md): Poisson arrivals at `rate`; 70 % short chats
/// (prompt log-normal around 300 tokens, answers 64–256), 20 % long-context requests
/// (2–7k prompt tokens, answers 128–512), 10 % image questions (50–400 tokens of text,
/// answers 32–128).
pub fn generate(n: usize, rate: f64, model: &str, seed: u64) -> Vec<Record> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    (0..n)
        .map(|i| {
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            t += -u.ln() / rate.max(1e-6);
            let kind: f64 = rng.random();
            let (prompt_tokens, max_tokens, modality) = if kind < 0.7 {
                // log-normal: exp(N(ln 300, 0.8))
                let z: f64 = (0..12).map(|_| rng.random::<f64>()).sum::<f64>() - 6.0;
                let p = (300f64.ln() + 0.8 * z).exp().clamp(8.0, 4_000.0);
                (p as u64, rng.random_range(64..=256), None)
            } else if kind < 0.9 {
                (
                    rng.random_range(2_000..=7_000),
                    rng.random_range(128..=512),
                    None,
                )
            } else {
                (
                    rng.random_range(50..=400),
                    rng.random_range(32..=128),
                    Some("image".into()),
                )
            };
            Record {
                t,
                model: model.to_string(),
                prompt_tokens,
                max_tokens,
                stream: true,
                modality,
                tenant: Some(format!("tenant-{}", i % 3)),
            }
        })
        .collect()
}

/// What one rules file gave on the trace.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub rules: String,
    pub requests: usize,
    pub failures: usize,
    pub preemptions: usize,
    pub cost_usd: f64,
    pub tokens: u64,
    pub usd_per_million_tokens: f64,
    pub ttft_ms: [f64; 3],
    pub e2e_ms: [f64; 3],
    pub slo_attainment: f64,
    /// Requests answered by each pool.
    pub by_pool: std::collections::BTreeMap<String, u64>,
}

fn percentiles(mut v: Vec<f64>) -> [f64; 3] {
    if v.is_empty() {
        return [f64::NAN; 3];
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    [at(0.5), at(0.95), at(0.99)]
}

pub fn run(args: ReplayArgs) -> Result<()> {
    if let Some(n) = args.generate {
        let trace = generate(n, args.rate, &args.model, args.seed);
        let text: String = trace
            .iter()
            .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
            .collect::<Result<_, _>>()?;
        std::fs::write(&args.out, text)?;
        println!(
            "{n} requests over {:.0} s written to {}",
            trace.last().map_or(0.0, |r| r.t),
            args.out.display()
        );
        return Ok(());
    }
    if !(args.speed.is_finite() && args.speed > 0.0) {
        bail!("--speed must be a positive number");
    }
    if args
        .preempt_every
        .is_some_and(|s| !(s.is_finite() && s > 0.0))
    {
        bail!("--preempt-every must be a positive number of seconds");
    }
    let trace_path = args.trace.as_ref().context("--trace is required")?;
    let trace = read_trace(&std::fs::read_to_string(trace_path)?)?;
    let mut profiles = std::collections::HashMap::new();
    for p in &args.profile {
        let (class, profile) = parse_profile(p)?;
        profiles.insert(class, profile);
    }
    let mut outcomes = Vec::new();
    for rules in &args.rules {
        outcomes.push(replay_one(&args, rules, &trace, &profiles)?);
    }
    println!(
        "{} requests, speed ×{}, {} workers per pool{}; latencies and cost in real time",
        trace.len(),
        args.speed,
        args.workers,
        args.preempt_every
            .map(|s| format!(", a spot worker killed every {s} s"))
            .unwrap_or_default()
    );
    println!(
        "{:<28} {:>9} {:>9} {:>10} {:>22} {:>22} {:>8} {:>8}",
        "rules",
        "$/1M tok",
        "cost $",
        "failures",
        "TTFT p50/p95/p99 ms",
        "e2e p50/p95/p99 ms",
        "SLO %",
        "preempt"
    );
    for o in &outcomes {
        println!(
            "{:<28} {:>9.3} {:>9.4} {:>10} {:>22} {:>22} {:>8.1} {:>8}",
            o.rules,
            o.usd_per_million_tokens,
            o.cost_usd,
            o.failures,
            format!(
                "{:.0}/{:.0}/{:.0}",
                o.ttft_ms[0], o.ttft_ms[1], o.ttft_ms[2]
            ),
            format!("{:.0}/{:.0}/{:.0}", o.e2e_ms[0], o.e2e_ms[1], o.e2e_ms[2]),
            o.slo_attainment * 100.0,
            o.preemptions
        );
        println!("{:<28} served by: {:?}", "", o.by_pool);
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&json!({
                "requests": trace.len(), "speed": args.speed, "slo_ttft_ms": args.slo_ttft_ms,
                "results": outcomes,
            }))?,
        )?;
    }
    Ok(())
}

/// A rules file rewritten for a time-compressed replay, removed when dropped.
struct ScaledRules(PathBuf);

impl Drop for ScaledRules {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The rules file as the router reads it at `speed`: its latency objectives, escalation
/// deadlines and backoffs divided by `speed` (the fleet runs that much faster), written
/// beside the original so that its relative paths still resolve (JSON, which is YAML).
fn scaled_rules(path: &Path, text: &str, speed: f64) -> Result<Option<ScaledRules>> {
    if speed == 1.0 {
        return Ok(None);
    }
    fn walk(v: &mut Value, speed: f64) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    match (k.as_str(), x.as_u64()) {
                        ("ttft_p95_ms" | "escalate_after_ms" | "backoff_ms", Some(n)) if n > 0 => {
                            *x = ((n as f64 / speed).round().max(1.0) as u64).into();
                        }
                        _ => walk(x, speed),
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, speed)),
            _ => {}
        }
    }
    let mut v: Value =
        serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    walk(&mut v, speed);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("rules.yaml");
    let out = path.with_file_name(format!(".replay-{}-{name}", std::process::id()));
    std::fs::write(&out, serde_json::to_vec_pretty(&v)?).with_context(|| {
        format!(
            "write {} (replay writes a scaled copy beside the rules)",
            out.display()
        )
    })?;
    Ok(Some(ScaledRules(out)))
}

/// One answer as the client saw it.
struct Seen {
    ok: bool,
    ttft: Option<Duration>,
    e2e: Duration,
    tokens: u64,
}

fn replay_one(
    args: &ReplayArgs,
    rules_path: &Path,
    trace: &[Record],
    profiles: &std::collections::HashMap<String, Profile>,
) -> Result<Outcome> {
    let text = std::fs::read_to_string(rules_path)
        .with_context(|| format!("read {}", rules_path.display()))?;
    let base = rules_path.parent().unwrap_or(Path::new("."));
    let rules = routing_rules::compile(&text, base)
        .map_err(|e| anyhow::anyhow!("{}: {e}", rules_path.display()))?;
    // one model's tokenizer GGUF for the simulated workers (they serve every model of the
    // file under its name; each worker is started for one model)
    let models: Vec<(String, PathBuf)> = rules
        .models()
        .iter()
        .map(|(name, m)| match &m.tokenizer {
            routing_rules::TokenizerRef::Gguf(p) => Ok((name.clone(), p.clone())),
            routing_rules::TokenizerRef::Json(_) => {
                bail!("model `{name}`: replay needs its tokenizer as a GGUF file")
            }
        })
        .collect::<Result<_>>()?;
    if models.is_empty() {
        bail!("{}: declares no model to replay", rules_path.display());
    }
    let dir = std::env::temp_dir().join(format!(
        "switchyard-replay-{}-{}",
        std::process::id(),
        rules_path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("rules")
    ));
    std::fs::create_dir_all(&dir)?;
    let me = std::env::current_exe()?;
    let worker_bin = me.with_file_name("switchyard-worker");
    if !worker_bin.exists() {
        bail!(
            "{} not found: build the workspace's binaries",
            worker_bin.display()
        );
    }
    let scaled = scaled_rules(rules_path, &text, args.speed)?;
    let serve_rules = scaled.as_ref().map_or(rules_path, |s| s.0.as_path());
    let mut fleet = Fleet(Vec::new());
    let mut router = Command::new(&me);
    router.arg("serve").arg("--rules").arg(serve_rules).args([
        "--listen",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]);
    // the router's own clocks run as fast as the trace
    router
        .arg("--slo-window-s")
        .arg(format!("{}", 10.0 / args.speed))
        .arg("--slo-cooldown-s")
        .arg(format!("{}", 5.0 / args.speed))
        .arg("--drift-window-s")
        .arg(format!("{}", 300.0 / args.speed));
    let line = spawn(&mut fleet, "router", router, &dir.join("router.log"))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
            .with_context(|| format!("the router's {k} address"))
    };
    let (proxy, grpc, admin) = (field("proxy")?, field("grpc")?, field("admin")?);
    let speed = args.speed;
    let spot: Vec<String> = rules
        .pools()
        .iter()
        .filter(|p| p.capacity == routing_rules::Capacity::Spot)
        .map(|p| p.name.to_string())
        .collect();
    // the worker processes, by (pool, index), for preemption
    let worker_cmd = |pool: &routing_rules::Pool, id: &str, model: &(String, PathBuf)| {
        let p = profiles
            .get(&pool.class)
            .copied()
            .unwrap_or_else(|| default_profile(&pool.class));
        let mut w = Command::new(&worker_bin);
        w.arg("--model").arg(&model.1).args([
            "--model-name",
            &model.0,
            "--router",
            &grpc,
            "--pool",
            &pool.name,
            "--worker-id",
            id,
            "--backend",
            "sim",
            "--sim-ttft-ms",
            &format!("{}", (p.ttft_ms / speed).round() as u64),
            "--sim-tokens-per-s",
            &format!("{}", p.decode_tokens_per_s * speed),
            "--sim-prefill-tokens-per-s",
            &format!("{}", p.prefill_tokens_per_s * speed),
            "--max-batch",
            &p.max_batch.to_string(),
            "--queue",
            "1024",
        ]);
        w
    };
    let mut expected = 0;
    // spot workers by pool, for preemption: (pool, worker id, model)
    let mut spot_workers: Vec<(String, String, (String, PathBuf))> = Vec::new();
    for pool in rules.pools().iter().filter(|p| p.workers.is_empty()) {
        for model in &models {
            for i in 0..args.workers {
                let id = format!("{}-{}-{i}", pool.name, model.0);
                let cmd = worker_cmd(pool, &id, model);
                spawn(&mut fleet, &id, cmd, &dir.join(format!("worker-{id}.log")))?;
                expected += 1;
                if pool.capacity == routing_rules::Capacity::Spot {
                    spot_workers.push((pool.name.to_string(), id, model.clone()));
                }
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3_600))
            .pool_max_idle_per_host(256)
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let live = match http.get(format!("{admin}/admin/workers")).send().await {
                Ok(r) => r
                    .json::<Vec<Value>>()
                    .await
                    .unwrap_or_default()
                    .iter()
                    .filter(|w| w["state"] == "live")
                    .count(),
                Err(_) => 0,
            };
            if live >= expected {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "only {live} of {expected} workers registered; logs in {}",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let started = tokio::time::Instant::now();
        let url = Arc::new(format!("{proxy}/v1/chat/completions"));
        let mut tasks = Vec::with_capacity(trace.len());
        // workers killed, and preemption times passed (a pool without a worker to kill
        // counts as a time passed, not as a preemption)
        let (mut preemptions, mut ticks) = (0usize, 0usize);
        let every = args.preempt_every.filter(|_| !spot.is_empty());
        for r in trace {
            let at = started + Duration::from_secs_f64(r.t / speed);
            // spot preemptions due before this arrival
            while let Some(every) = every {
                let due = started + Duration::from_secs_f64(every * (ticks + 1) as f64 / speed);
                if due > at {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let pool_name = &spot[ticks % spot.len()];
                ticks += 1;
                let Some((id, model)) =
                    spot_workers
                        .iter()
                        .position(|(p, ..)| p == pool_name)
                        .map(|i| {
                            let (_, id, model) = spot_workers.remove(i);
                            (id, model)
                        })
                else {
                    continue;
                };
                if let Some(pos) = fleet.0.iter().position(|(n, _)| *n == id) {
                    let (_, mut child) = fleet.0.remove(pos);
                    let _ = child.kill();
                    let _ = child.wait();
                    preemptions += 1;
                }
                // a replacement, as a spot fleet brings one up
                let pool = rules.pool(pool_name).context("spot pool")?;
                let new_id = format!("{pool_name}-{}-r{preemptions}", model.0);
                let cmd = worker_cmd(pool, &new_id, &model);
                spawn(
                    &mut fleet,
                    &new_id,
                    cmd,
                    &dir.join(format!("worker-{new_id}.log")),
                )?;
                spot_workers.push((pool_name.clone(), new_id, model));
            }
            tokio::time::sleep_until(at).await;
            let (http, url, r) = (http.clone(), Arc::clone(&url), r.clone());
            tasks.push(tokio::spawn(async move { send(&http, &url, &r).await }));
        }
        let mut seen = Vec::with_capacity(tasks.len());
        for t in tasks {
            seen.push(t.await?);
        }
        let metrics = http
            .get(format!("{admin}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let sum = |prefix: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        // worker time ran `speed` times faster: its real-time cost is that much more
        let cost_usd = sum("switchyard_router_cost_usd_total{") * speed;
        let mut by_pool = std::collections::BTreeMap::new();
        for l in metrics
            .lines()
            .filter(|l| l.starts_with("switchyard_router_requests_total{"))
        {
            let pool = l
                .split("pool=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?");
            let n = l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if pool != "none" {
                *by_pool.entry(pool.to_string()).or_insert(0) += n as u64;
            }
        }
        let prompt: u64 = trace.iter().map(|r| r.prompt_tokens).sum();
        let completion: u64 = seen.iter().map(|s| s.tokens).sum();
        let tokens = prompt + completion;
        let slo = Duration::from_millis(args.slo_ttft_ms);
        let real = |d: Duration| d.as_secs_f64() * speed * 1000.0;
        let ok: Vec<&Seen> = seen.iter().filter(|s| s.ok).collect();
        let within = ok
            .iter()
            .filter(|s| {
                s.ttft
                    .is_some_and(|t| Duration::from_secs_f64(t.as_secs_f64() * speed) <= slo)
            })
            .count();
        Ok(Outcome {
            rules: rules_path
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("?")
                .to_string(),
            requests: seen.len(),
            failures: seen.len() - ok.len(),
            preemptions,
            cost_usd,
            tokens,
            usd_per_million_tokens: cost_usd / (tokens.max(1) as f64) * 1e6,
            ttft_ms: percentiles(ok.iter().filter_map(|s| s.ttft.map(real)).collect()),
            e2e_ms: percentiles(ok.iter().map(|s| real(s.e2e)).collect()),
            slo_attainment: within as f64 / seen.len().max(1) as f64,
            by_pool,
        })
    })
}

/// Sends one trace record as a chat request; a stream is read to its end.
async fn send(http: &reqwest::Client, url: &str, r: &Record) -> Seen {
    let t0 = Instant::now();
    let text = "hello ".repeat(r.prompt_tokens.clamp(1, 200_000) as usize);
    let content = match r.modality.as_deref() {
        Some("image") => json!([
            { "type": "text", "text": text },
            { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0KGgo=" } }
        ]),
        _ => json!(text),
    };
    let body = json!({
        "model": r.model, "max_tokens": r.max_tokens, "stream": r.stream,
        "stream_options": { "include_usage": true },
        "messages": [{ "role": "user", "content": content }],
    });
    let failed = |t0: Instant| Seen {
        ok: false,
        ttft: None,
        e2e: t0.elapsed(),
        tokens: 0,
    };
    let Ok(resp) = http.post(url).json(&body).send().await else {
        return failed(t0);
    };
    if !resp.status().is_success() {
        return failed(t0);
    }
    let mut ttft = None;
    let mut tokens = 0;
    let mut bytes = resp.bytes_stream();
    let mut all = Vec::new();
    while let Some(chunk) = bytes.next().await {
        let Ok(chunk) = chunk else {
            return failed(t0);
        };
        if ttft.is_none() {
            ttft = Some(t0.elapsed());
        }
        all.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&all);
    let mut done = !r.stream;
    for frame in text.split("\n\n") {
        let Some(data) = frame.trim().strip_prefix("data: ") else {
            if !r.stream
                && let Ok(v) = serde_json::from_str::<Value>(frame)
            {
                tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            }
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if v.get("error").is_some() {
            return failed(t0);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    Seen {
        ok: done,
        ttft,
        e2e: t0.elapsed(),
        tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_and_records_are_read_as_a_trace() {
        let text = r#"{"timestamp":"2026-12-07T05:55:17.511302Z","level":"INFO","message":"request","status":200,"model":"smollm2","tenant":"team-a","prompt_tokens":15,"completion_tokens":40,"ms":500.0}
{"timestamp":"2026-12-07T05:55:18.011302Z","level":"INFO","message":"request","status":200,"model":"","prompt_tokens":0}
{"t":0.75,"model":"smollm2","prompt_tokens":900,"max_tokens":64,"modality":"image"}
{"timestamp":"2026-12-07T05:55:19.011302Z","level":"INFO","message":"request","status":200,"model":"smollm2","prompt_tokens":7}
"#;
        let t = read_trace(text).unwrap();
        assert_eq!(t.len(), 3, "the line without a model is no request");
        assert_eq!(t[0].t, 0.0);
        assert_eq!((t[0].prompt_tokens, t[0].max_tokens), (15, 40));
        assert_eq!(t[0].tenant.as_deref(), Some("team-a"));
        assert_eq!(t[1].modality.as_deref(), Some("image"));
        assert!(
            (t[2].t - 2.0).abs() < 1e-6,
            "arrival = end − ms: {}",
            t[2].t
        );
        assert!(read_trace("not json").is_err());
        assert!(read_trace("").is_err());
    }

    #[test]
    fn the_generator_follows_its_mix() {
        let t = generate(2000, 5.0, "m", 7);
        assert_eq!(t.len(), 2000);
        assert!(t.windows(2).all(|w| w[0].t <= w[1].t));
        let rate = t.len() as f64 / t.last().unwrap().t;
        assert!((4.0..6.0).contains(&rate), "{rate}");
        let long = t
            .iter()
            .filter(|r| r.prompt_tokens >= 2_000 && r.modality.is_none())
            .count();
        let image = t.iter().filter(|r| r.modality.is_some()).count();
        assert!((300..500).contains(&long), "{long}");
        assert!((130..270).contains(&image), "{image}");
        assert_eq!(
            generate(10, 5.0, "m", 7)[3].prompt_tokens,
            t[3].prompt_tokens,
            "seeded"
        );
    }

    #[test]
    fn profiles_parse_and_refuse_nonsense() {
        let (c, p) = parse_profile("h100=30,25000,120,128").unwrap();
        assert_eq!(c, "h100");
        assert_eq!(p.max_batch, 128);
        assert!(parse_profile("h100=30,25000,120").is_err());
        assert!(parse_profile("h100=30,-1,120,4").is_err());
        assert!(parse_profile("h100").is_err());
    }

    #[test]
    fn a_compressed_replay_scales_the_rules_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.yaml");
        let text = "version: 1\nretry: { backoff_ms: 0, escalate_after_ms: 800 }\nrules:\n  - name: a\n    route: [x]\n    slo: { ttft_p95_ms: 2000 }\n";
        let scaled = scaled_rules(&path, text, 10.0).unwrap().unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&scaled.0).unwrap()).unwrap();
        assert_eq!(v["rules"][0]["slo"]["ttft_p95_ms"], 200);
        assert_eq!(v["retry"]["escalate_after_ms"], 80);
        assert_eq!(v["retry"]["backoff_ms"], 0);
        let written = scaled.0.clone();
        drop(scaled);
        assert!(!written.exists(), "removed when done");
        assert!(scaled_rules(&path, text, 1.0).unwrap().is_none());
    }

    #[test]
    fn rfc3339_times_are_read() {
        let a = rfc3339_seconds("2026-12-07T05:55:17.5Z").unwrap();
        let b = rfc3339_seconds("2026-12-08T05:55:17.5Z").unwrap();
        assert_eq!(b - a, 86_400.0);
        assert_eq!(rfc3339_seconds("1970-01-01T00:00:01Z"), Some(1.0));
    }
}
