//! Deadline escalation (#21): a rule sends a request to its cheap tier first and, when no
//! first token has come within `retry.escalate_after_ms`, also starts it on the next tier;
//! the first to produce a token is served and the other is cancelled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use integration::{TestEnv, WorkerSpec, header};
use serde_json::{Value, json};

const RULES: &str = r#"
version: 1
models:
  tiny:
    tokenizer: { gguf: "{TINY}" }
    context_window: 2048
pools:
  cpu:           { class: cpu,  capacity: on_demand, cost_per_hour: 0.20 }
  l40s-ondemand: { class: l40s, capacity: on_demand, cost_per_hour: 1.86 }
rules:
  - name: cascade
    route: [cpu, l40s-ondemand]
    retry: { escalate_after_ms: 300 }
"#;

fn ask(stream: bool) -> Value {
    json!({
        "model": "tiny",
        "messages": [{ "role": "user", "content": "Say hi." }],
        "max_tokens": 8,
        "temperature": 0,
        "stream": stream,
    })
}

/// A CPU tier slowed by fault injection (3 s to its first token): every request is served
/// by the next tier soon after the 300 ms deadline, never after the slow tier's 3 s, and
/// the slow tier never generates any of them (its attempts are cancelled before they run).
/// A JSON answer is not escalated. With the CPU tier fast again, nothing escalates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tier_is_escalated_past_and_no_request_runs_twice() {
    let env = TestEnv::new()
        .rules(RULES)
        .worker(WorkerSpec::new("cpu").faulty())
        .worker(WorkerSpec::new("l40s-ondemand"))
        .start()
        .await
        .unwrap();
    // (its warm-up generated a token)
    let warm = env
        .worker_metric(0, "switchyard_worker_generated_tokens_total")
        .await
        .unwrap();
    env.faults(0, json!({ "delay_first_token_ms": 3000 }))
        .await
        .unwrap();
    let mut waits = Vec::new();
    for _ in 0..6 {
        let t0 = Instant::now();
        let r = env.chat(&ask(true)).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
        let text = r.text().await.unwrap();
        assert!(!text.contains("\"error\""), "{text}");
        waits.push(t0.elapsed());
    }
    let slowest = waits.iter().max().unwrap();
    eprintln!("escalated answers took {waits:?}");
    assert!(
        *slowest < Duration::from_millis(2500),
        "served by the next tier, not after the slow tier's 3 s: {waits:?}"
    );
    let m = env.metrics().await.unwrap();
    assert!(
        m.contains(
            r#"switchyard_router_escalations_total{from_pool="cpu",served="escalated",to_pool="l40s-ondemand"} 6"#
        ),
        "{m}"
    );
    // the slow tier's attempts were cancelled before they generated anything (its delay
    // comes before the engine), and stay so once the delay has passed
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        env.worker_metric(0, "switchyard_worker_generated_tokens_total")
            .await
            .unwrap(),
        warm
    );
    assert_eq!(
        env.worker_metric(0, "switchyard_worker_in_flight")
            .await
            .unwrap(),
        0.0
    );
    let log = env.log("router.log");
    let line = log
        .lines()
        .filter(|l| l.contains("\"message\":\"request\""))
        .find(|l| l.contains("cpu/cpu-0:outpaced"))
        .unwrap_or_else(|| panic!("the outpaced attempt in the access line: {log}"));
    assert!(line.contains("\"pool\":\"l40s-ondemand\""), "{line}");

    // a JSON answer is not escalated: its first byte comes when the generation ends, so a
    // hedge would run it twice (it waits for the slow tier)
    let t0 = Instant::now();
    let r = env.chat(&ask(false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "cpu");
    assert!(t0.elapsed() >= Duration::from_millis(3000));

    // the CPU tier fast again: it serves, nothing escalates
    env.faults(0, json!({ "delay_first_token_ms": 0 }))
        .await
        .unwrap();
    let r = env.chat(&ask(false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "cpu");
    let m = env.metrics().await.unwrap();
    assert!(
        m.contains(r#"served="escalated",to_pool="l40s-ondemand"} 6"#),
        "{m}"
    );
}
