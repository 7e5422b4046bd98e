//! External engines behind the registration sidecar (`switchyard-worker --engine-url`).
//!
//! The engine is `integration/upstream/openai_server.py --engine vllm`: a server that is
//! not ours, speaking to a router as vLLM does — `/health`, `/v1/models` with
//! `max_model_len`, vLLM's `/metrics` load gauges, and a stream's header sent before its
//! first token. (A real llama.cpp server behind the sidecar is `scripts/engine-llamacpp.sh`;
//! its build does not fit CI's time.) The fleet: the engine in the spot pool
//! `vllm-spot`, one of our workers (tiny model, same model name) in `l40s-ondemand`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use integration::*;
use serde_json::{Value, json};

const RULES: &str = r#"
version: 1
models:
  ext-model:
    tokenizer: { gguf: "{TINY}" }
    context_window: 4096
    default_max_tokens: 16
pools:
  vllm-spot:     { class: l40s, capacity: spot,      cost_per_hour: 0.80 }
  l40s-ondemand: { class: l40s, capacity: on_demand, cost_per_hour: 1.86 }
rules:
  - name: all
    route: [vllm-spot, l40s-ondemand]
"#;

const ENGINE_TEXT: &str = "hello from a server that is not Switchyard";

/// The stand-in engine (a [`Proc`]: killed when dropped, stopped or not).
struct EngineServer {
    proc: Proc,
    url: String,
}

impl EngineServer {
    fn start(dir: &std::path::Path) -> Result<Self> {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/openai_server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).args([
            "--engine",
            "vllm",
            "--model",
            "ext-model",
            "--max-model-len",
            "3000",
        ]);
        let proc = Proc::spawn(cmd, &dir.join("engine.log"))?;
        let port: u16 = proc
            .line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no port in {:?}", proc.line))?;
        Ok(Self {
            proc,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    fn signal(&self, sig: &str) {
        self.proc.signal(sig);
    }

    async fn control(&self, http: &reqwest::Client, v: Value) -> Result<()> {
        let r = http
            .post(format!("{}/control", self.url))
            .json(&v)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "control: {}", r.status());
        Ok(())
    }
}

/// The fleet, the engine and its sidecar (id `vllm-0`, reading the engine every 200 ms).
async fn fleet() -> Result<(Running, EngineServer, Proc)> {
    let mut ours = WorkerSpec::new("l40s-ondemand");
    ours.model_name = "ext-model".into();
    let env = TestEnv::new().rules(RULES).worker(ours).start().await?;
    let engine = EngineServer::start(env.dir.path())?;
    let mut cmd = Command::new(bin("switchyard-worker")?);
    cmd.args(["--engine-url", &engine.url, "--engine", "vllm"])
        .args(["--router", &env.grpc, "--pool", "vllm-spot"])
        .args(["--worker-id", "vllm-0", "--engine-poll-ms", "200"])
        .args(["--drain-timeout-s", "20", "--device", "cuda:0"]);
    let sidecar = Proc::spawn(cmd, &env.dir.path().join("sidecar.log"))?;
    eventually(
        Duration::from_secs(20),
        "the engine to register",
        || async {
            let w = engine_entry(&env).await?;
            (w["state"] == "live").then_some(())
        },
    )
    .await?;
    Ok((env, engine, sidecar))
}

/// The engine's entry in `/admin/workers`.
async fn engine_entry(env: &Running) -> Option<Value> {
    env.workers_json()
        .await
        .ok()?
        .into_iter()
        .find(|w| w["id"] == "vllm-0")
}

/// A streamed answer: its pool, the text of its deltas, whether it ended with `[DONE]`,
/// and any error event.
async fn stream(env: &Running) -> Result<(String, String, bool, Option<Value>)> {
    let r = env.chat(&chat_body("ext-model", 10, 8, true)).await?;
    anyhow::ensure!(r.status() == 200, "status {}", r.status());
    let pool = header(&r, "x-switchyard-pool");
    let body = r.text().await?;
    let mut text = String::new();
    let mut done = false;
    let mut error = None;
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data)?;
        if v.get("error").is_some() {
            error = Some(v);
            continue;
        }
        if let Some(t) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            text.push_str(t);
        }
    }
    Ok((pool, text, done, error))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_behind_its_sidecar_is_registered_routed_to_and_reports_its_load() -> Result<()> {
    let (env, engine, _sidecar) = fleet().await?;
    let w = engine_entry(&env).await.context("engine entry")?;
    // registered as the engine, at the engine's address, with what its API says
    assert_eq!(w["engine"], "vllm", "{w}");
    assert_eq!(w["device"], "cuda:0", "{w}");
    assert_eq!(w["pool"], "vllm-spot", "{w}");
    assert_eq!(
        w["address"],
        engine.url.trim_start_matches("http://"),
        "{w}"
    );
    assert_eq!(w["models"][0]["name"], "ext-model", "{w}");
    assert_eq!(
        w["models"][0]["max_context"], 3000,
        "the window from max_model_len: {w}"
    );

    // requests go straight to the engine, JSON and streamed
    let r = env.chat(&chat_body("ext-model", 10, 8, false)).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "vllm-spot");
    let v: Value = r.json().await?;
    assert_eq!(v["choices"][0]["message"]["content"], ENGINE_TEXT);
    let (pool, text, done, error) = stream(&env).await?;
    assert_eq!(pool, "vllm-spot");
    assert_eq!(text.trim(), ENGINE_TEXT);
    assert!(done && error.is_none(), "{error:?}");

    // the engine's own queue, read from its metrics, reaches the router
    engine.control(&env.http, json!({ "waiting": 5 })).await?;
    let reported = eventually(Duration::from_secs(5), "the engine's queue", || async {
        let w = engine_entry(&env).await?;
        (w["reported"]["queued"] == 5).then_some(w)
    })
    .await?;
    assert_eq!(reported["reported_load"], 5, "{reported}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_before_its_first_token_is_failed_over_with_no_client_error() -> Result<()>
{
    let (env, engine, _sidecar) = fleet().await?;
    // the engine sends each stream's header at once and its first token 3 s later
    engine
        .control(&env.http, json!({ "first_token_ms": 3000 }))
        .await?;
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let env = &env;
            async move { stream(env).await }
        })
        .collect();
    let kill = async {
        // every stream's header sent, no token yet
        eventually(
            Duration::from_secs(10),
            "3 streams on the engine",
            || async {
                let w = engine_entry(&env).await?;
                (w["reported"]["in_flight"] == 3).then_some(())
            },
        )
        .await
        .expect("the streams reached the engine");
        engine.signal("KILL");
    };
    let (results, ()) = tokio::join!(futures::future::join_all(clients), kill);
    for r in results {
        let (pool, text, done, error) = r?;
        assert!(
            error.is_none(),
            "the client saw the engine's death: {error:?}"
        );
        assert!(done, "the stream ended without [DONE]");
        assert_eq!(pool, "l40s-ondemand", "served by the on-demand worker");
        assert!(
            !text.is_empty() && text.trim() != ENGINE_TEXT,
            "the answer is the fallback worker's: {text:?}"
        );
    }
    // the sidecar takes the dead engine out of routing
    eventually(
        Duration::from_secs(5),
        "the dead engine to leave",
        || async { engine_entry(&env).await.is_none().then_some(()) },
    )
    .await?;
    let (pool, _, done, error) = stream(&env).await?;
    assert_eq!(pool, "l40s-ondemand");
    assert!(done && error.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_engine_leaves_routing_and_a_request_waiting_on_it_fails_over() -> Result<()> {
    let (env, engine, _sidecar) = fleet().await?;
    // SIGSTOP: the engine's socket still accepts connections, but nothing answers — as a
    // hung engine or a partitioned host. Only the sidecar's health check sees it.
    engine.signal("STOP");
    let t0 = std::time::Instant::now();
    let r = env.chat(&chat_body("ext-model", 10, 8, false)).await?;
    let waited = t0.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
    // the router's first-byte timeout is 120 s: the failover came from the engine leaving
    // routing, not from a timeout
    assert!(
        waited < Duration::from_secs(30),
        "failed over after {waited:?}"
    );
    assert!(engine_entry(&env).await.is_none(), "still routed to");
    let log = env.log("sidecar.log");
    assert!(log.contains("leaving routing"), "{log}");
    // thawed, it is registered again
    engine.signal("CONT");
    eventually(
        Duration::from_secs(10),
        "the engine to come back",
        || async {
            let w = engine_entry(&env).await?;
            (w["state"] == "live").then_some(())
        },
    )
    .await?;
    let r = env.chat(&chat_body("ext-model", 10, 8, false)).await?;
    assert_eq!(header(&r, "x-switchyard-pool"), "vllm-spot");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_sidecar_drains_the_engine_before_it_leaves() -> Result<()> {
    let (env, engine, mut sidecar) = fleet().await?;
    // a stream and a JSON answer that take ~3 s on the engine
    engine
        .control(&env.http, json!({ "token_ms": 300 }))
        .await?;
    let long = stream(&env);
    let json_body = chat_body("ext-model", 10, 8, false);
    let long_json = async {
        let r = env.chat(&json_body).await?;
        let pool = header(&r, "x-switchyard-pool");
        let v: Value = r.json().await?;
        anyhow::Ok((pool, v))
    };
    let drain = async {
        eventually(Duration::from_secs(5), "both to run", || async {
            let w = engine_entry(&env).await?;
            (w["reported"]["in_flight"] == 2).then_some(())
        })
        .await?;
        sidecar.signal("TERM");
        eventually(Duration::from_secs(5), "the engine to drain", || async {
            let w = engine_entry(&env).await?;
            (w["state"] == "draining").then_some(())
        })
        .await?;
        // new work goes elsewhere at once
        let r = env.chat(&chat_body("ext-model", 10, 8, false)).await?;
        anyhow::ensure!(r.status() == 200);
        Ok::<_, anyhow::Error>(header(&r, "x-switchyard-pool"))
    };
    let (long, long_json, during) = tokio::join!(long, long_json, drain);
    assert_eq!(during?, "l40s-ondemand");
    // the JSON answer, held by the router until its body, finished on the engine too: the
    // drain kept the engine's lease (a lease let expire would have given up on it)
    let (pool, v) = long_json?;
    assert_eq!(pool, "vllm-spot", "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], ENGINE_TEXT);
    let (pool, text, done, error) = long?;
    assert_eq!(pool, "vllm-spot");
    assert_eq!(
        text.trim(),
        ENGINE_TEXT,
        "the running stream finished on the engine"
    );
    assert!(done && error.is_none(), "{error:?}");
    let status = sidecar
        .exited_within(Duration::from_secs(10))
        .await
        .context("the sidecar did not exit after the drain")?;
    assert!(status.success(), "{status:?}");
    assert!(engine_entry(&env).await.is_none(), "deregistered");
    let log = env.log("sidecar.log");
    assert!(log.contains("the engine is idle"), "{log}");
    Ok(())
}
