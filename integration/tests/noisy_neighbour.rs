//! A noisy neighbour (#18): tenant A floods the fleet with runaway generations that time
//! out, past its concurrency limit; its limits and then its circuit breaker shed it, while
//! tenant B's requests all succeed at the latency they had alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integration::{FLEET_RULES, Running, TestEnv, WorkerSpec, chat_body, eventually, sha256_hex};
use serde_json::{Value, json};

/// B's latencies for `n` sequential short requests (each must succeed).
async fn b_latencies(env: &Running, n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        let r = env
            .http
            .post(format!("{}/v1/chat/completions", env.proxy))
            .bearer_auth("key-b")
            .json(&chat_body("tiny", 30, 2, false))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(status, 200, "B's request {i}: {body}");
        out.push(t0.elapsed());
    }
    out
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_trips_its_breaker_and_the_other_tenant_is_unaffected() {
    let rules = format!(
        "{FLEET_RULES}tenants:\n  team-a:\n    keys: [{{ sha256: \"{}\" }}]\n    limits:\n      max_concurrent: 1\n      breaker: {{ error_percent: 50, min_requests: 3, window_s: 30, open_s: 60 }}\n  team-b:\n    keys: [{{ sha256: \"{}\" }}]\n",
        sha256_hex("key-a"),
        sha256_hex("key-b"),
    );
    // two batch slots, 20 ms a decode step: A's long answers take the slots for seconds
    let env = TestEnv::new()
        .rules(&rules)
        .router_arg("--total-timeout-ms")
        .router_arg("1500")
        .worker(WorkerSpec::new("cpu").faulty().arg("--max-batch").arg("2"))
        .start()
        .await
        .unwrap();
    env.faults(0, json!({ "token_delay_ms": 20 }))
        .await
        .unwrap();
    let env = Arc::new(env);

    let alone = p50(b_latencies(&env, 10).await);

    // A floods: four clients, each a runaway generation every 50 ms
    let stop = Arc::new(AtomicBool::new(false));
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let (env, stop) = (Arc::clone(&env), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = env
                        .http
                        .post(format!("{}/v1/chat/completions", env.proxy))
                        .bearer_auth("key-a")
                        .json(&chat_body("tiny", 30, 900, false))
                        .send()
                        .await
                        .unwrap();
                    let retry_after = r.headers().contains_key("retry-after");
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or_default();
                    statuses.push((status, body["error"]["code"].clone(), retry_after));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                statuses
            })
        })
        .collect();
    // B meanwhile, while A's breaker is still closed: every request succeeds
    let during = b_latencies(&env, 10).await;
    // A's answers time out (504) until the breaker opens
    let tenants = eventually(Duration::from_secs(30), "A's breaker open", || async {
        let t: Value = env
            .admin_get("/admin/tenants")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let a = t["tenants"]
            .as_array()?
            .iter()
            .find(|t| t["name"] == "team-a")?;
        (a["breaker"] == "open").then(|| t.clone())
    })
    .await
    .unwrap();
    // once A's last runaway answer has timed out, B has the fleet to itself again
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let shed = p50(b_latencies(&env, 20).await);
    stop.store(true, Ordering::Relaxed);
    let mut a = Vec::new();
    for f in flood {
        a.extend(f.await.unwrap());
    }

    let count = |s: u16| a.iter().filter(|(st, ..)| *st == s).count();
    println!(
        "B p50: alone {alone:?}, A flooding (breaker closed) {:?}, A shed {shed:?} ({:.2}× alone); \
         A: {} answers, {} × 504, {} × 429, {} × 503",
        p50(during),
        shed.as_secs_f64() / alone.as_secs_f64(),
        a.len(),
        count(504),
        count(429),
        count(503),
    );
    assert!(count(504) >= 2, "A's runaway generations time out: {a:?}");
    assert!(
        count(429) > 0,
        "A's flood passes its concurrency limit: {a:?}"
    );
    let open: Vec<_> = a
        .iter()
        .filter(|(s, code, _)| *s == 503 && code == "tenant_circuit_open")
        .collect();
    assert!(!open.is_empty(), "A is shed by its breaker: {a:?}");
    assert!(open.iter().all(|(.., retry_after)| *retry_after));
    assert!(
        a.iter().all(|(s, ..)| [429, 503, 504].contains(s)),
        "A never got an answer: {a:?}"
    );
    // B, with A shed, is as fast as alone (the bound leaves room for a 2-core machine's
    // noise; the note records the measured ratio)
    assert!(
        shed.as_secs_f64() <= alone.as_secs_f64() * 1.5 + 0.02,
        "B alone {alone:?}, with A shed {shed:?}"
    );
    let m = env.metrics().await.unwrap();
    assert!(
        m.contains(
            r#"switchyard_router_tenant_rejections_total{reason="circuit_open",tenant="team-a"}"#
        ),
        "{m}"
    );
    let b = tenants["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "team-b")
        .unwrap();
    assert_eq!(b["breaker"], "closed", "{tenants}");
}
