//! Drift signals (#21): a tenant whose prompts suddenly grow is seen in its drift index
//! within a window, through the real router; another tenant's index stays flat.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use integration::{Running, TestEnv, WorkerSpec, eventually, sha256_hex};
use serde_json::{Value, json};

fn rules() -> String {
    format!(
        r#"
version: 1
models:
  tiny:
    tokenizer: {{ gguf: "{{TINY}}" }}
    context_window: 2048
pools:
  cpu: {{ class: cpu, capacity: on_demand, cost_per_hour: 0.20 }}
rules:
  - name: all
    route: [cpu]
tenants:
  team-a:
    keys: [{{ sha256: "{}" }}]
  team-b:
    keys: [{{ sha256: "{}" }}]
"#,
        sha256_hex("key-a"),
        sha256_hex("key-b"),
    )
}

/// Sends `key`'s requests in a loop until `stop`; `long` makes its prompts ~1,500 tokens
/// (else ~20).
fn traffic(
    env: &Running,
    key: &'static str,
    long: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let (http, url) = (
        env.http.clone(),
        format!("{}/v1/chat/completions", env.proxy),
    );
    tokio::spawn(async move {
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            let text = if long.load(Ordering::Relaxed) {
                "many words ".repeat(140)
            } else {
                format!("hello {sent}")
            };
            let body = json!({
                "model": "tiny", "max_tokens": 1,
                "messages": [{ "role": "user", "content": text }],
            });
            let r = http
                .post(&url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{:?}", r.text().await);
            sent += 1;
        }
        sent
    })
}

fn psi(drift: &Value, tenant: &str, feature: &str) -> Option<f64> {
    drift["tenants"]
        .as_array()?
        .iter()
        .find(|t| t["tenant"] == tenant)?["psi"][feature]
        .as_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_prompts_grow_drifts_and_the_other_does_not() {
    let env = TestEnv::new()
        .rules(&rules())
        .router_arg("--drift-window-s")
        .router_arg("1")
        .router_arg("--drift-baseline-windows")
        .router_arg("3")
        .worker(
            WorkerSpec::new("cpu")
                .arg("--backend")
                .arg("sim")
                .arg("--sim-ttft-ms")
                .arg("1")
                .arg("--sim-tokens-per-s")
                .arg("100000"),
        )
        .start()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (a_long, b_long) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let a = traffic(&env, "key-a", Arc::clone(&a_long), Arc::clone(&stop));
    let b = traffic(&env, "key-b", b_long, Arc::clone(&stop));
    let drift = || async {
        env.admin_get("/admin/drift")
            .send()
            .await
            .ok()?
            .json::<Value>()
            .await
            .ok()
    };
    // a baseline: both tenants' usual traffic, compared window after window
    let steady = eventually(
        Duration::from_secs(20),
        "both tenants to have an index",
        || async {
            let d = drift().await?;
            (psi(&d, "team-a", "prompt_tokens").is_some()
                && psi(&d, "team-b", "prompt_tokens").is_some())
            .then_some(d)
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}",
            std::fs::read_to_string(env.dir.path().join("router.log")).map(|l| l.len())
        )
    });
    for t in ["team-a", "team-b"] {
        let v = psi(&steady, t, "prompt_tokens").unwrap();
        assert!(v < 0.1, "{t} steady: {v}: {steady}");
    }
    // team-a's prompts grow a hundredfold
    a_long.store(true, Ordering::Relaxed);
    let shifted = eventually(Duration::from_secs(5), "team-a's index to rise", || async {
        let d = drift().await?;
        (psi(&d, "team-a", "prompt_tokens")? > 0.25).then_some(d)
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let (sent_a, sent_b) = (a.await.unwrap(), b.await.unwrap());
    eprintln!("drift: {sent_a} + {sent_b} requests; {shifted}");
    let b_now = psi(&shifted, "team-b", "prompt_tokens").unwrap();
    assert!(b_now < 0.1, "team-b did not change: {b_now}");
    for feature in ["max_tokens", "modality", "model"] {
        let v = psi(&shifted, "team-a", feature).unwrap();
        assert!(v < 0.1, "team-a's {feature} did not change: {v}");
    }
    let m = env.metrics().await.unwrap();
    let gauge = m
        .lines()
        .find(|l| {
            l.starts_with(r#"switchyard_router_drift_psi{feature="prompt_tokens",tenant="team-a"}"#)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{m}"));
    assert!(gauge > 0.25, "{gauge}");
}
