//! End-to-end harness: starts the real `switchyard` and `switchyard-worker` binaries on
//! ephemeral loopback ports and always stops them.
//!
//! ```ignore
//! let env = TestEnv::new().rules(RULES).worker(WorkerSpec::new("cpu")).start().await?;
//! ```
//! The binaries come from the same target directory as the test (`cargo build --workspace
//! --bins` first; the README's test command does).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where cargo put this workspace's binaries.
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no target dir")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: run `cargo build --workspace --bins` first",
            path.display()
        );
    }
    Ok(path)
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub line: String,
}

impl Proc {
    /// Spawns `cmd` and waits for its `LISTENING ...` line on stdout.
    pub fn spawn(cmd: Command, log: &Path) -> Result<Self> {
        Self::spawn_until(cmd, log, "LISTENING")
    }

    /// Spawns `cmd` and waits for a line on stdout that starts with `prefix`.
    fn spawn_until(mut cmd: Command, log: &Path, prefix: &'static str) -> Result<Self> {
        let log_file = std::fs::File::create(log)?;
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(l)) = lines.next() {
                if l.starts_with(prefix) {
                    let _ = tx.send(l);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => Ok(Self { child, line }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{cmd:?} did not start; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            }
        }
    }

    /// `key=value` field of the LISTENING line, or its second word.
    pub fn field(&self, key: &str) -> Option<String> {
        self.line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One worker to start.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub pool: String,
    pub fault_injection: bool,
    pub model: Option<PathBuf>,
    pub model_name: String,
    pub args: Vec<String>,
}

impl WorkerSpec {
    pub fn new(pool: &str) -> Self {
        Self {
            pool: pool.into(),
            fault_injection: false,
            model: None,
            model_name: "tiny".into(),
            args: Vec::new(),
        }
    }
    pub fn faulty(mut self) -> Self {
        self.fault_injection = true;
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    pub fn model(mut self, path: PathBuf, name: &str) -> Self {
        self.model = Some(path);
        self.model_name = name.into();
        self
    }
}

pub struct Worker {
    pub proc: Proc,
    pub url: String,
    pub pool: String,
}

#[derive(Default)]
pub struct TestEnv {
    rules: Option<String>,
    workers: Vec<WorkerSpec>,
    router_args: Vec<String>,
    expect: Option<usize>,
}

/// A started fleet. Everything is stopped when it is dropped.
pub struct Running {
    pub dir: tempfile::TempDir,
    pub router: Proc,
    pub workers: Vec<Worker>,
    pub proxy: String,
    pub grpc: String,
    pub admin: String,
    pub rules_path: PathBuf,
    pub tiny_model: PathBuf,
    pub http: reqwest::Client,
    router_args: Vec<String>,
    specs: Vec<WorkerSpec>,
}

/// Rules text may say `{TINY}` for the path of the generated tiny model.
impl TestEnv {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn rules(mut self, yaml: &str) -> Self {
        self.rules = Some(yaml.to_string());
        self
    }
    pub fn worker(mut self, w: WorkerSpec) -> Self {
        self.workers.push(w);
        self
    }
    /// How many workers must register before `start` returns (default: all).
    pub fn expect_registered(mut self, n: usize) -> Self {
        self.expect = Some(n);
        self
    }
    pub fn router_arg(mut self, a: &str) -> Self {
        self.router_args.push(a.to_string());
        self
    }

    pub async fn start(self) -> Result<Running> {
        let dir = tempfile::tempdir()?;
        let tiny = dir.path().join("tiny.gguf");
        model_meta::tiny::write_tiny_llama(&tiny, 2048)?;
        let rules_path = dir.path().join("rules.yaml");
        let rules = self
            .rules
            .context("rules are required")?
            .replace("{TINY}", &tiny.display().to_string());
        std::fs::write(&rules_path, rules)?;
        let router = spawn_router(
            dir.path(),
            &rules_path,
            &["127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"],
            &self.router_args,
        )?;
        let proxy = router.field("proxy").context("proxy address")?;
        let grpc = router.field("grpc").context("grpc address")?;
        let admin = router.field("admin").context("admin address")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let mut workers = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            workers.push(spawn_worker(dir.path(), &grpc, &tiny, i, "", w)?);
        }
        let env = Running {
            dir,
            router,
            workers,
            proxy,
            grpc,
            admin,
            rules_path,
            tiny_model: tiny,
            http,
            router_args: self.router_args,
            specs: self.workers,
        };
        let n = self.expect.unwrap_or(env.workers.len());
        eventually(Duration::from_secs(30), "workers to register", || async {
            (env.live_workers().await.ok()? == n).then_some(())
        })
        .await?;
        // the proxy listener is bound by pingora after the LISTENING line: wait for it
        eventually(Duration::from_secs(10), "the proxy to listen", || async {
            env.http
                .get(format!("{}/v1/models", env.proxy))
                .send()
                .await
                .ok()
                .map(|_| ())
        })
        .await?;
        Ok(env)
    }
}

/// Starts worker `i` of `spec` (log `worker-<i><suffix>.log`, id `<pool>-<i><suffix>`).
fn spawn_worker(
    dir: &Path,
    grpc: &str,
    tiny: &Path,
    i: usize,
    suffix: &str,
    w: &WorkerSpec,
) -> Result<Worker> {
    let mut cmd = Command::new(bin("switchyard-worker")?);
    cmd.arg("--model").arg(w.model.as_deref().unwrap_or(tiny));
    cmd.args([
        "--model-name",
        &w.model_name,
        "--router",
        grpc,
        "--pool",
        &w.pool,
        "--worker-id",
        &format!("{}-{i}{suffix}", w.pool),
    ]);
    if w.fault_injection {
        cmd.arg("--fault-injection");
    }
    cmd.args(&w.args);
    let proc = Proc::spawn(cmd, &dir.join(format!("worker-{i}{suffix}.log")))?;
    let url = proc
        .line
        .split_whitespace()
        .nth(1)
        .context("worker url")?
        .to_string();
    Ok(Worker {
        proc,
        url,
        pool: w.pool.clone(),
    })
}

fn spawn_router(dir: &Path, rules: &Path, addrs: &[&str; 3], extra: &[String]) -> Result<Proc> {
    Proc::spawn(
        router_command(rules, addrs, extra)?,
        &dir.join("router.log"),
    )
}

fn router_command(rules: &Path, addrs: &[&str; 3], extra: &[String]) -> Result<Command> {
    let mut cmd = Command::new(bin("switchyard")?);
    cmd.args(["serve", "--rules"]).arg(rules).args([
        "--listen",
        addrs[0],
        "--grpc",
        addrs[1],
        "--admin",
        addrs[2],
        "--heartbeat-ms",
        "200",
        "--lease-ttl-ms",
        "1000",
    ]);
    cmd.args(extra);
    Ok(cmd)
}

fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://")
}

impl Running {
    /// Kills the router (SIGKILL) and starts a new one on the same ports and rules.
    pub async fn restart_router(&mut self) -> Result<()> {
        let _ = self.router.child.kill();
        let _ = self.router.child.wait();
        let addrs = [
            host_port(&self.proxy),
            host_port(&self.grpc),
            host_port(&self.admin),
        ];
        self.router = spawn_router(self.dir.path(), &self.rules_path, &addrs, &self.router_args)?;
        eventually(
            Duration::from_secs(10),
            "the new router's proxy to listen",
            || async {
                self.http
                    .get(format!("{}/v1/models", self.proxy))
                    .send()
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await
    }

    /// Kills worker `i` (SIGKILL: a preemption without notice) and starts it again with the
    /// same arguments and id; it registers again once its old lease has expired.
    pub fn restart_worker(&mut self, i: usize) -> Result<()> {
        self.respawn(i, "")
    }

    /// Kills worker `i` (SIGKILL) and starts a replacement with a new id (`<pool>-<i>-<n>`),
    /// as a spot pool replaces a preempted node: it registers at once (the old lease
    /// still runs out on its own).
    pub fn replace_worker(&mut self, i: usize, n: usize) -> Result<()> {
        self.respawn(i, &format!("-{n}"))
    }

    fn respawn(&mut self, i: usize, suffix: &str) -> Result<()> {
        let _ = self.workers[i].proc.child.kill();
        let _ = self.workers[i].proc.child.wait();
        self.workers[i] = spawn_worker(
            self.dir.path(),
            &self.grpc,
            &self.tiny_model,
            i,
            suffix,
            &self.specs[i],
        )?;
        Ok(())
    }

    /// A zero-downtime upgrade: starts a new router with `--upgrade` on the same addresses
    /// (log `router-upgraded.log`) and, once it waits for the sockets, sends the running
    /// one SIGQUIT. Returns the old process, which exits when its requests are done.
    pub fn upgrade_router(&mut self) -> Result<Proc> {
        let addrs = [
            host_port(&self.proxy),
            host_port(&self.grpc),
            host_port(&self.admin),
        ];
        let mut args = self.router_args.clone();
        args.push("--upgrade".into());
        let cmd = router_command(&self.rules_path, &addrs, &args)?;
        let new = Proc::spawn_until(
            cmd,
            &self.dir.path().join("router-upgraded.log"),
            "UPGRADING",
        )?;
        let old = std::mem::replace(&mut self.router, new);
        old.signal("QUIT");
        Ok(old)
    }

    /// Another router replica (log `router-<name>.log`) on `addrs` (proxy, gRPC, admin;
    /// port 0: any), with the rules at `rules` and `args`; the `LISTENING` line's fields
    /// give its addresses.
    pub fn another_router(
        &self,
        name: &str,
        rules: &Path,
        addrs: &[&str; 3],
        args: &[&str],
    ) -> Result<Proc> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let cmd = router_command(rules, addrs, &args)?;
        Proc::spawn(cmd, &self.dir.path().join(format!("router-{name}.log")))
    }

    /// POSTs to a worker's fault-injection endpoint.
    pub async fn faults(&self, worker: usize, faults: Value) -> Result<()> {
        let r = self
            .http
            .post(format!("{}/admin/faults", self.workers[worker].url))
            .json(&faults)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("faults: {}", r.status());
        }
        Ok(())
    }

    /// The admin token the router was started with (`--admin-token`), if any.
    pub fn admin_token(&self) -> Option<&str> {
        let at = self.router_args.iter().position(|a| a == "--admin-token")?;
        self.router_args.get(at + 1).map(String::as_str)
    }

    /// A GET of the admin API, with the admin token when the router has one.
    pub fn admin_get(&self, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.get(format!("{}{path}", self.admin));
        match self.admin_token() {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn workers_json(&self) -> Result<Vec<Value>> {
        Ok(self
            .admin_get("/admin/workers")
            .send()
            .await?
            .json()
            .await?)
    }

    pub async fn live_workers(&self) -> Result<usize> {
        Ok(self
            .workers_json()
            .await?
            .iter()
            .filter(|w| w["state"] == "live")
            .count())
    }

    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await?
            .text()
            .await?)
    }

    /// `/metrics` once `ready` holds (polled for up to 5 s; the last scrape either way).
    /// A request's own series are recorded as it is logged, just after its answer is sent,
    /// so a test that reads them right after the answer polls.
    pub async fn metrics_until(&self, ready: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.metrics().await?;
            if ready(&m) || Instant::now() >= deadline {
                return Ok(m);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Worker `i`'s metric `name` (an unlabelled counter or gauge) from its `/metrics`; 0
    /// when absent.
    pub async fn worker_metric(&self, i: usize, name: &str) -> Result<f64> {
        let url = format!("{}/metrics", self.workers[i].url);
        let text = self.http.get(url).send().await?.text().await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// POSTs a chat request through the router.
    pub async fn chat(&self, body: &Value) -> Result<reqwest::Response> {
        Ok(self
            .http
            .post(format!("{}/v1/chat/completions", self.proxy))
            .json(body)
            .send()
            .await?)
    }

    /// A process's log as written so far. The router's log thread writes its lines in
    /// batches (at most 10 ms after they are logged): this waits 100 ms first, so that the
    /// lines of requests already answered are there.
    pub fn log(&self, name: &str) -> String {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

/// The demo fleet's rules with the tiny model (`{TINY}` is replaced by `start`).
pub const FLEET_RULES: &str = r#"
version: 1
models:
  tiny:
    tokenizer: { gguf: "{TINY}" }
    context_window: 2048
    default_max_tokens: 16
pools:
  h100-spot:     { class: h100, capacity: spot,      cost_per_hour: 2.90 }
  h100-ondemand: { class: h100, capacity: on_demand, cost_per_hour: 6.98 }
  l40s-spot:     { class: l40s, capacity: spot,      cost_per_hour: 0.80 }
  l40s-ondemand: { class: l40s, capacity: on_demand, cost_per_hour: 1.86 }
  cpu:           { class: cpu,  capacity: on_demand, cost_per_hour: 0.20 }
rules:
  - name: multimodal
    when: { modality: { any_of: [image, audio] } }
    route: [h100-spot, h100-ondemand]
  - name: light
    when: { context_tokens: { at_most: 1024 } }
    route: [cpu]
  - name: chat
    when: { context_tokens: { at_most: 4096 } }
    route: [l40s-spot, l40s-ondemand]
  - name: long-context
    route: [h100-spot, h100-ondemand]
"#;

/// A response header as a string ("" when absent).
pub fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A chat body with `words` filler words, greedy decoding, `max_tokens` tokens.
pub fn chat_body(model: &str, filler_bytes: usize, max_tokens: u32, stream: bool) -> Value {
    let text = "ab ".repeat(filler_bytes / 3);
    serde_json::json!({
        "model": model,
        "messages": [{ "role": "user", "content": format!("Say hi. {text}") }],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1,
        "stream": stream,
    })
}

/// One fault-injectable `cpu` worker on [`FLEET_RULES`] with `faults` already set.
pub async fn faulty_cpu(router_args: &[&str], faults: Value) -> Result<Running> {
    let mut env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu").faulty());
    for a in router_args {
        env = env.router_arg(a);
    }
    let env = env.start().await?;
    env.faults(0, faults).await?;
    Ok(env)
}

/// The usual failover fleet on [`FLEET_RULES`]: a fault-injectable `<class>-spot` worker
/// (index 0) and a `<class>-ondemand` worker (index 1).
pub async fn spot_and_on_demand(class: &str, router_args: &[&str]) -> Result<Running> {
    let mut env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new(&format!("{class}-spot")).faulty())
        .worker(WorkerSpec::new(&format!("{class}-ondemand")));
    for a in router_args {
        env = env.router_arg(a);
    }
    env.start().await
}

/// The SHA-256 of an API key, hex: what a rules file holds for a tenant's key.
pub fn sha256_hex(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
