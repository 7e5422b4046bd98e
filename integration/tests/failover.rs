//! Failover against the real worker's fault injection: before the first byte (invisible to
//! the client), after it (a well-formed SSE error event), with large bodies replayed whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use integration::{
    FLEET_RULES, Running, TestEnv, WorkerSpec, chat_body, eventually, faulty_cpu, header,
    spot_and_on_demand,
};
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
    // the workers' default body cap follows the tiny model's 2k window: lift it here
    let big = |pool: &str| {
        WorkerSpec::new(pool)
            .arg("--max-body-bytes")
            .arg("16000000")
    };
    // The rules give `tiny` a huge window, so the router forwards the prompt and the
    // worker's own count (its real window is 2k) proves every byte arrived. With the
    // rules' 2k window the router refuses such a prompt itself once it has counted it.
    let rules = FLEET_RULES.replace("context_window: 2048", "context_window: 100000000");
    let env = TestEnv::new()
        .rules(&rules)
        .worker(big("h100-spot").faulty())
        .worker(big("h100-ondemand"))
        .start()
        .await
        .unwrap();
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

// ---- Long answers, clients that leave, huge prompts (#17) ----

/// The value of worker `i`'s metric `name` (unlabelled).
async fn worker_metric(env: &Running, i: usize, name: &str) -> Option<f64> {
    let url = format!("{}/metrics", env.workers[i].url);
    let text = env.http.get(url).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

const GENERATED: &str = "switchyard_worker_generated_tokens_total";
const IN_FLIGHT: &str = "switchyard_worker_in_flight";

/// A non-streaming answer that takes longer than the router's first-byte timeout: the
/// worker commits (sends its header) at the first token, so the router waits for the body
/// and the answer is generated once. Before: the router timed the whole generation out as a
/// missing first byte, retried it, and answered 503 after both runs were thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_non_streaming_answer_outlasting_the_first_byte_timeout_runs_once() {
    let env = faulty_cpu(
        &["--first-byte-timeout-ms", "1500"],
        json!({ "token_delay_ms": 150 }),
    )
    .await
    .unwrap();
    let before = worker_metric(&env, 0, GENERATED).await.unwrap();
    let started = std::time::Instant::now();
    let r = env.chat(&chat_body("tiny", 30, 16, false)).await.unwrap();
    assert_eq!(r.status(), 200, "{}", env.log("router.log"));
    assert_eq!(header(&r, "x-switchyard-attempts"), "1");
    assert!(header(&r, "content-type").starts_with("application/json"));
    let v: Value = r.json().await.unwrap();
    let completion = v["usage"]["completion_tokens"].as_f64().unwrap();
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_millis(1500),
        "the answer must outlast the first-byte timeout to test anything ({waited:?}, {completion} tokens)"
    );
    let after = worker_metric(&env, 0, GENERATED).await.unwrap();
    assert_eq!(after - before, completion, "generated exactly once: {v}");
    let m = env.metrics().await.unwrap();
    assert!(!m.contains("switchyard_router_retries_total{"), "{m}");
}

/// A worker failing after it committed a non-streaming answer: the client sees the body
/// cut (an error), never a short answer that parses as a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_failing_after_the_header_cuts_the_json_answer() {
    let env = faulty_cpu(&[], json!({ "drop_after_tokens": 3 }))
        .await
        .unwrap();
    // straight to the worker: the header is committed, the body is cut, never a whole JSON
    let r = env
        .http
        .post(format!("{}/v1/chat/completions", env.workers[0].url))
        .json(&chat_body("tiny", 30, 40, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "headers were committed before the failure");
    let body = tokio::time::timeout(Duration::from_secs(10), r.bytes())
        .await
        .expect("no hang");
    if let Ok(body) = body {
        assert!(
            serde_json::from_slice::<Value>(&body).is_err(),
            "a cut answer parsed as JSON: {body:?}"
        );
    }
    // through the router: a JSON answer is held until its body comes, so the same failure
    // is one before the first byte — failed over (here no other worker: a clean 503)
    env.faults(0, json!({ "drop_after_tokens": 3 }))
        .await
        .unwrap();
    let r = env.chat(&chat_body("tiny", 30, 40, false)).await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "no_capacity", "{v}");
}

/// A client that leaves in the middle of a long non-streaming answer: the worker stops
/// generating it and frees its slot. Before: it generated all of it for no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_answer_stops_the_generation() {
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu").faulty())
        .start()
        .await
        .unwrap();
    env.faults(0, json!({ "token_delay_ms": 50 }))
        .await
        .unwrap();
    for (via, stream) in [
        ("direct", false),
        ("direct", true),
        ("router", true),
        ("router", false),
    ] {
        let base = if via == "router" {
            &env.proxy
        } else {
            &env.workers[0].url
        };
        let before = worker_metric(&env, 0, GENERATED).await.unwrap();
        let request = env
            .http
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat_body("tiny", 30, 900, stream))
            .send();
        let client = tokio::spawn(async move { request.await?.bytes().await });
        eventually(
            Duration::from_secs(20),
            "tokens to be generated",
            || async {
                let n = worker_metric(&env, 0, GENERATED).await?;
                (n >= before + 5.0).then_some(())
            },
        )
        .await
        .unwrap();
        assert!(
            !client.is_finished(),
            "the answer ended before the client left"
        );
        client.abort(); // the client leaves
        eventually(
            Duration::from_secs(3),
            &format!("the slot to be freed ({via}, stream: {stream})"),
            || async { (worker_metric(&env, 0, IN_FLIGHT).await? == 0.0).then_some(()) },
        )
        .await
        .unwrap();
        let stopped = worker_metric(&env, 0, GENERATED).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await; // ten token delays
        let later = worker_metric(&env, 0, GENERATED).await.unwrap();
        assert_eq!(
            later, stopped,
            "generation went on after the client left ({via}, stream: {stream})"
        );
        assert!(stopped - before < 1000.0, "{} tokens", stopped - before);
    }
}

/// A client that leaves while its request waits in the queue: the engine never runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_first_token_is_never_run() {
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu").faulty().arg("--max-batch").arg("1"))
        .start()
        .await
        .unwrap();
    env.faults(0, json!({ "token_delay_ms": 50 }))
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", env.workers[0].url);
    let send = |max_tokens| {
        let request = env
            .http
            .post(&url)
            .json(&chat_body("tiny", 30, max_tokens, false))
            .send();
        tokio::spawn(async move { request.await?.bytes().await })
    };
    let running = send(900);
    eventually(Duration::from_secs(20), "the first to run", || async {
        (worker_metric(&env, 0, GENERATED).await? >= 3.0).then_some(())
    })
    .await
    .unwrap();
    let queued = send(900);
    eventually(Duration::from_secs(10), "the second to queue", || async {
        let depth = worker_metric(&env, 0, "switchyard_worker_queue_depth").await?;
        (depth == 1.0).then_some(())
    })
    .await
    .unwrap();
    queued.abort(); // leaves before its first token
    tokio::time::sleep(Duration::from_millis(200)).await; // its connection closes
    running.abort();
    eventually(
        Duration::from_secs(3),
        "the queue and the slot to empty",
        || async {
            let depth = worker_metric(&env, 0, "switchyard_worker_queue_depth").await?;
            let busy = worker_metric(&env, 0, IN_FLIGHT).await?;
            (depth == 0.0 && busy == 0.0).then_some(())
        },
    )
    .await
    .unwrap();
    let stopped = worker_metric(&env, 0, GENERATED).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // ten token delays
    assert_eq!(worker_metric(&env, 0, GENERATED).await.unwrap(), stopped);
    assert_eq!(worker_metric(&env, 0, IN_FLIGHT).await.unwrap(), 0.0);
}

/// Huge prompts are tokenized off the runtime that answers `/health` and heartbeats: while
/// three multi-megabyte prompts are tokenized, `/health` answers and the worker keeps its
/// lease (the harness's lease is 1 s). Before: `/health` took 32 s and the lease expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_prompts_do_not_stall_health_or_heartbeats() {
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(
            WorkerSpec::new("cpu")
                .arg("--max-body-bytes")
                .arg("8000000"),
        )
        .start()
        .await
        .unwrap();
    let url = format!("{}/v1/completions", env.workers[0].url);
    let body = json!({ "model": "tiny", "prompt": "x ".repeat(2_000_000), "max_tokens": 4 });
    let huge: Vec<_> = (0..3)
        .map(|_| tokio::spawn(env.http.post(&url).json(&body).send()))
        .collect();
    let health = format!("{}/health", env.workers[0].url);
    let mut answered_meanwhile = 0;
    while huge.iter().any(|h| !h.is_finished()) {
        let ok = tokio::time::timeout(Duration::from_secs(2), env.http.get(&health).send())
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.status() == 200));
        assert!(
            ok,
            "/health did not answer within 2 s while prompts were tokenized"
        );
        if huge.iter().any(|h| !h.is_finished()) {
            answered_meanwhile += 1;
            assert_eq!(
                env.live_workers().await.unwrap(),
                1,
                "the worker lost its lease"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        answered_meanwhile > 0,
        "the prompts were tokenized too fast to test anything"
    );
    for h in huge {
        let r = h.await.unwrap().unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded");
    }
    // the default cap follows the context window (2k tokens → 1 MiB)
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap();
    let url = format!("{}/v1/completions", env.workers[0].url);
    // 413 — or, when the worker answers before the client finished writing 4 MB, the
    // client's write fails: refused either way, never served
    match env.http.post(&url).json(&body).send().await {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
}

/// `max_tokens` beyond what the context window leaves is clamped to it, on the real and the
/// simulated backend; `u64::MAX` answers (it hung the sim backend before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_is_clamped_to_the_context_window() {
    let sim = WorkerSpec::new("l40s-spot")
        .arg("--backend")
        .arg("sim")
        .arg("--sim-ttft-ms")
        .arg("0")
        .arg("--sim-tokens-per-s")
        .arg("100000");
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu"))
        .worker(sim)
        .start()
        .await
        .unwrap();
    for (i, w) in env.workers.iter().enumerate() {
        let body = json!({
            "model": "tiny",
            "prompt": "Say hi.",
            "max_tokens": u64::MAX,
            "temperature": 0,
            "seed": 1,
        });
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            env.http
                .post(format!("{}/v1/completions", w.url))
                .json(&body)
                .send(),
        )
        .await
        .expect("no hang")
        .unwrap();
        assert_eq!(r.status(), 200, "worker {i}");
        let v: Value = r.json().await.unwrap();
        let u = &v["usage"];
        let total = u["total_tokens"].as_u64().unwrap();
        assert!(total <= 2048, "worker {i}: {v}");
        if v["choices"][0]["finish_reason"] == "length" {
            assert_eq!(total, 2048, "worker {i}: {v}");
        }
        if i == 1 {
            assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        }
    }
}

/// The total timeout bounds failover too: a worker that never answers within it gets the
/// client a 504 `timeout` at the total timeout, not after the (longer) first-byte timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_timeout_bounds_failover() {
    let env = spot_and_on_demand(
        "l40s",
        &[
            "--first-byte-timeout-ms",
            "20000",
            "--total-timeout-ms",
            "1500",
        ],
    )
    .await
    .unwrap();
    for w in 0..2 {
        env.faults(w, json!({ "delay_first_token_ms": 8000 }))
            .await
            .unwrap_or_default();
    }
    let started = std::time::Instant::now();
    let r = env.chat(&chat_body("tiny", 1500, 4, false)).await.unwrap();
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "timeout", "{v}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A worker that dies in the middle of a non-streaming answer (after its header, before
/// its body) costs latency, not an error: the router holds JSON answers until their body
/// comes and fails over to the next worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_mid_json_answer_fails_over_invisibly() {
    let env = spot_and_on_demand("l40s", &[]).await.unwrap();
    env.faults(0, json!({ "drop_after_tokens": 3 }))
        .await
        .unwrap();
    let r = env.chat(&chat_body("tiny", 1500, 12, false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
    let v: Value = r.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}

/// A worker that goes silent after a JSON answer's header (frozen, or its host cut off)
/// is failed over as soon as its lease expires (TTL 1 s here), not at the total timeout
/// (600 s): its connection does not fail by itself, but the worker has left routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_mid_json_answer_is_failed_over_when_its_lease_expires() {
    let env = spot_and_on_demand("l40s", &[]).await.unwrap();
    // slow tokens: the worker sends its header at the first token, the body at the end
    env.faults(0, json!({ "token_delay_ms": 400 }))
        .await
        .unwrap();
    let freeze = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        env.workers[0].proc.signal("STOP");
    };
    let body = chat_body("tiny", 1500, 12, false);
    let t0 = std::time::Instant::now();
    let (r, ()) = tokio::join!(env.chat(&body), freeze);
    let waited = t0.elapsed();
    env.workers[0].proc.signal("CONT");
    let r = r.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
    let v: Value = r.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(
        waited < Duration::from_secs(20),
        "failed over after {waited:?}"
    );
    assert!(
        env.log("router.log").contains("lease expired"),
        "the lease expiry ended the wait"
    );
}

/// One id follows a request: the client's `x-request-id` is echoed, reaches the worker
/// (its answer is named after it) and keys the router's JSON access line, which tells the
/// whole story of a failover: the failed spot attempt and why, the worker that answered.
/// A client that sends no id gets one made up, the same in all three places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_ties_answer_worker_and_json_access_line() {
    let env = spot_and_on_demand("l40s", &[]).await.unwrap();
    env.faults(0, json!({ "fail_next": 1 })).await.unwrap();
    let r = env
        .http
        .post(format!("{}/v1/chat/completions", env.proxy))
        .header("x-request-id", "client-id-42")
        .json(&chat_body("tiny", 1500, 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", env.log("router.log"));
    assert_eq!(header(&r, "x-request-id"), "client-id-42");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], "chatcmpl-client-id-42", "the worker got the id");

    // no id sent, and an unusable one: made up, 32 hex digits
    for sent in [None, Some("has space")] {
        let mut req = env
            .http
            .post(format!("{}/v1/chat/completions", env.proxy))
            .json(&chat_body("tiny", 1500, 4, false));
        if let Some(s) = sent {
            req = req.header("x-request-id", s);
        }
        let r = req.send().await.unwrap();
        let id = header(&r, "x-request-id");
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id:?}"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["id"], format!("chatcmpl-{id}"));
    }
    // the router's own answers carry it too
    let r = env
        .http
        .post(format!("{}/v1/chat/completions", env.proxy))
        .header("x-request-id", "bad-json-1")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-request-id"), "bad-json-1");

    // the access line: JSON (stderr is not a terminal), found by the id
    let line = integration::eventually(Duration::from_secs(5), "the access line", || async {
        env.log("router.log")
            .lines()
            .find(|l| l.contains("\"client-id-42\""))
            .map(str::to_string)
    })
    .await
    .unwrap();
    let a: Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(a["message"], "request", "{a}");
    assert_eq!(a["request_id"], "client-id-42");
    assert_eq!(a["status"], 200);
    assert_eq!(a["model"], "tiny");
    assert_eq!(a["pool"], "l40s-ondemand");
    assert!(
        a["worker"].as_str().unwrap().starts_with("l40s-ondemand"),
        "{a}"
    );
    assert_eq!(a["attempts"], 2);
    let failures = a["failures"].as_str().unwrap();
    assert!(
        failures.starts_with("l40s-spot/") && failures.ends_with(":preempted"),
        "{a}"
    );
    assert!(a["prompt_tokens"].as_u64().unwrap() > 1024, "{a}");
    assert!(a["completion_tokens"].as_u64().unwrap() > 0, "{a}");
    assert!(
        a["ttft_ms"].as_f64().unwrap() <= a["ms"].as_f64().unwrap(),
        "{a}"
    );
    assert!(a["cost_usd"].as_f64().unwrap() > 0.0, "{a}");
    let bad = integration::eventually(Duration::from_secs(5), "the 400's access line", || async {
        env.log("router.log")
            .lines()
            .find(|l| l.contains("\"bad-json-1\""))
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(bad["status"], 400, "{bad}");
}
