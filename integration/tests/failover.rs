//! Failover against the real worker's fault injection: before the first byte (invisible to
//! the client), after it (a well-formed SSE error event), with large bodies replayed whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt;
use integration::{chat_body, faulty_cpu, header, spot_and_on_demand};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_dying_mid_stream_ends_the_sse_stream_with_an_error_event() {
    let env = faulty_cpu(&[], json!({ "drop_after_tokens": 3 }))
        .await
        .unwrap();
    let r = env.chat(&chat_body("tiny", 30, 40, true)).await.unwrap();
    assert_eq!(r.status(), 200, "headers were committed before the failure");
    let text = tokio::time::timeout(std::time::Duration::from_secs(10), r.text())
        .await
        .expect("no hang")
        .unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let last: Value =
        serde_json::from_str(events.last().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_disconnected", "{text}");
    assert_eq!(last["error"]["type"], "server_error");
    // the role chunk and three content chunks came through before the error
    assert_eq!(events.len(), 1 + 3 + 1, "{text}");
    assert!(!text.contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_first_token_times_out_and_fails_over() {
    let env = spot_and_on_demand("l40s", &["--first-byte-timeout-ms", "1500"])
        .await
        .unwrap();
    env.faults(0, json!({ "delay_first_token_ms": 8000 }))
        .await
        .unwrap();
    let r = env.chat(&chat_body("tiny", 1500, 4, false)).await.unwrap();
    assert_eq!(r.status(), 200, "{}", env.log("router.log"));
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
    let m = env.metrics().await.unwrap();
    assert!(m.contains(r#"switchyard_router_retries_total{from_pool="l40s-spot",reason="timeout",to_pool="l40s-ondemand"} 1"#), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exiting_before_the_first_byte_is_invisible_to_the_client() {
    let env = spot_and_on_demand("l40s", &[]).await.unwrap();
    env.faults(0, json!({ "exit_next": true })).await.unwrap();
    let r = env.chat(&chat_body("tiny", 1500, 4, false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
}

/// 1 MB and 10 MB bodies: classified whole and replayed whole on failover. The spot worker
/// refuses the first attempt; the on-demand worker receives the full body, counts its tokens
/// and refuses it for exceeding the context window — which proves every byte arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_replayed_whole_on_failover() {
    let env = spot_and_on_demand("h100", &[]).await.unwrap();
    for size in [1_000_000usize, 10_000_000] {
        env.faults(0, json!({ "fail_next": 1 })).await.unwrap();
        let content = "x".repeat(size);
        let body = json!({ "model": "tiny", "messages": [{ "role": "user", "content": content }], "max_tokens": 4 });
        let r = env.chat(&body).await.unwrap();
        assert_eq!(header(&r, "x-switchyard-rule"), "long-context");
        assert_eq!(header(&r, "x-switchyard-pool"), "h100-ondemand");
        assert_eq!(header(&r, "x-switchyard-attempts"), "2");
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        let msg = v["error"]["message"].as_str().unwrap();
        let tokens: usize = msg.split_whitespace().find_map(|w| w.parse().ok()).unwrap();
        assert!(
            tokens > size,
            "the worker saw {tokens} tokens of a {size}-byte prompt: {msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_the_total_timeout_ends_with_a_timeout_event() {
    // 200 ms per token: 40 tokens would take 8 s
    let env = faulty_cpu(
        &["--total-timeout-ms", "1500"],
        json!({ "token_delay_ms": 200 }),
    )
    .await
    .unwrap();
    let t0 = std::time::Instant::now();
    let r = env.chat(&chat_body("tiny", 30, 40, true)).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = tokio::time::timeout(std::time::Duration::from_secs(10), r.text())
        .await
        .expect("no hang")
        .unwrap();
    let elapsed = t0.elapsed();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let last: Value =
        serde_json::from_str(events.last().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "timeout", "{text}");
    assert!(events.len() > 2, "some tokens came through first: {text}");
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "ended by the total timeout, not the worker ({elapsed:?})"
    );
}

/// A sustained spot outage (#17): the only spot worker fails every request while on-demand
/// is idle. Every request succeeds: after the spot worker is ejected its pool is skipped up
/// front (no retry budget spent), and when the budget would refuse a retry within the spot
/// tier, failover to on-demand goes ahead anyway. Before, 86 of 120 requests got 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sustained_spot_outage_costs_no_errors() {
    let env = spot_and_on_demand("l40s", &[]).await.unwrap();
    env.faults(0, json!({ "fail_next": 1_000_000 }))
        .await
        .unwrap();
    let body = chat_body("tiny", 1500, 2, false);
    let results: Vec<(u16, String, String)> = futures::stream::iter(0..120)
        .map(|_| {
            let (env, body) = (&env, &body);
            async move {
                let r = env.chat(body).await.unwrap();
                (
                    r.status().as_u16(),
                    header(&r, "x-switchyard-pool"),
                    header(&r, "x-switchyard-attempts"),
                )
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let failed = results.iter().filter(|(s, ..)| *s != 200).count();
    assert_eq!(failed, 0, "{results:?}");
    assert!(results.iter().all(|(_, pool, _)| pool == "l40s-ondemand"));
    // ejected after a few failures: the rest went straight to on-demand
    let retried = results.iter().filter(|(.., a)| a != "1").count();
    assert!(
        retried <= 16,
        "{retried} of 120 met the dead spot worker first"
    );
    let m = env.metrics().await.unwrap();
    assert!(
        m.contains(r#"switchyard_router_ejections_total{pool="l40s-spot"}"#),
        "{m}"
    );
}
