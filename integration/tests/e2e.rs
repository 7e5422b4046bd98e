//! The promises Switchyard makes, asserted through the real router and real workers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use integration::{
    FLEET_RULES, TestEnv, WorkerSpec, chat_body, eventually, header, spot_and_on_demand,
};
use serde_json::{Value, json};

const RULES: &str = FLEET_RULES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_goes_to_cpu_and_medium_to_l40s() {
    let env = TestEnv::new()
        .rules(RULES)
        .worker(WorkerSpec::new("cpu"))
        .worker(WorkerSpec::new("l40s-spot"))
        .start()
        .await
        .unwrap();

    let r = env.chat(&chat_body("tiny", 30, 8, false)).await.unwrap();
    assert_eq!(r.status(), 200, "{}", env.log("router.log"));
    assert_eq!(header(&r, "x-switchyard-pool"), "cpu");
    assert_eq!(header(&r, "x-switchyard-rule"), "light");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");

    // ~1500 prompt tokens with the byte-level tiny tokenizer: context > 1024 → chat rule
    let r = env.chat(&chat_body("tiny", 1500, 8, false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-spot");
    assert_eq!(header(&r, "x-switchyard-rule"), "chat");
    assert_eq!(header(&r, "x-switchyard-attempts"), "1");
    let v: Value = r.json().await.unwrap();
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 1024, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");

    // what registered workers serve
    let models: Value = env
        .http
        .get(format!("{}/v1/models", env.proxy))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    let workers = env.workers_json().await.unwrap();
    let pools: Vec<&str> = workers
        .iter()
        .map(|w| w["pool"].as_str().unwrap())
        .collect();
    assert_eq!(pools, vec!["cpu", "l40s-spot"]);
    assert!(
        workers
            .iter()
            .all(|w| w["state"] == "live"
                && w["address"].as_str().unwrap().starts_with("127.0.0.1:"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_as_sse() {
    let env = TestEnv::new()
        .rules(RULES)
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap();
    let r = env.chat(&chat_body("tiny", 30, 12, true)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "cpu");
    assert!(header(&r, "content-type").starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]", "{text}");
    let mut content = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        content.push_str(
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default(),
        );
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert!(finish.is_some(), "{text}");

    // the same request straight to the worker gives the same tokens (greedy decoding)
    let direct = env
        .http
        .post(format!("{}/v1/chat/completions", env.workers[0].url))
        .json(&chat_body("tiny", 30, 12, false))
        .send()
        .await
        .unwrap();
    let v: Value = direct.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        content
    );

    // The client set no stream_options: the router asked the worker for usage, counted the
    // completion tokens, and the client's stream has no usage frame (every event above had
    // a choice).
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| !e.contains(r#""choices":[]"#) && !e.contains("\"usage\"")),
        "{text}"
    );
    let series = r#"switchyard_router_completion_tokens_total{model="tiny",pool="cpu"}"#;
    let m = env.metrics_until(|m| m.contains(series)).await.unwrap();
    assert!(m.contains(&format!("{series} {completion}")), "{m}");

    // a client that asks for usage gets it, as the worker sends it
    let mut body = chat_body("tiny", 30, 12, true);
    body["stream_options"] = serde_json::json!({ "include_usage": true });
    let text = env.chat(&body).await.unwrap().text().await.unwrap();
    let usage: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| serde_json::from_str::<Value>(e.strip_prefix("data: ")?).ok())
        .filter(|v| v["choices"] == serde_json::json!([]))
        .collect();
    assert_eq!(usage.len(), 1, "{text}");
    assert_eq!(usage[0]["usage"]["completion_tokens"], completion, "{text}");
}

/// Blanks the per-response `"id":"…"` and `"created":N` values; everything else is compared
/// byte for byte.
fn normalize(sse: &str) -> String {
    let mut out = String::with_capacity(sse.len());
    let mut rest = sse;
    loop {
        let id = rest.find("\"id\":\"");
        let created = rest.find("\"created\":");
        let (at, key_len, quoted) = match (id, created) {
            (Some(i), Some(c)) if c < i => (c, "\"created\":".len(), false),
            (Some(i), _) => (i, "\"id\":\"".len(), true),
            (None, Some(c)) => (c, "\"created\":".len(), false),
            (None, None) => break,
        };
        out.push_str(&rest[..at + key_len]);
        rest = &rest[at + key_len..];
        let end = if quoted {
            rest.find('"').unwrap()
        } else {
            rest.find(|c: char| !c.is_ascii_digit()).unwrap()
        };
        out.push('_');
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_through_the_router_is_byte_for_byte_what_the_worker_sent() {
    let env = TestEnv::new()
        .rules(RULES)
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap();
    let body = chat_body("tiny", 30, 24, true);
    let via_router = env.chat(&body).await.unwrap().text().await.unwrap();
    let direct = env
        .http
        .post(format!("{}/v1/chat/completions", env.workers[0].url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(via_router.ends_with("data: [DONE]\n\n"), "{via_router}");
    assert_eq!(normalize(&via_router), normalize(&direct));
    assert_ne!(
        normalize(&via_router),
        via_router,
        "ids and timestamps were blanked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_spot_worker_fails_over_to_on_demand() {
    let env = spot_and_on_demand("l40s", &[]).await.unwrap();
    let spot = &env.workers[0].url;
    let r = env
        .http
        .post(format!("{spot}/admin/faults"))
        .json(&json!({ "fail_next": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let r = env.chat(&chat_body("tiny", 1500, 4, false)).await.unwrap();
    assert_eq!(r.status(), 200, "{}", env.log("router.log"));
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
    assert_eq!(header(&r, "x-switchyard-attempts"), "2");
    let v: Value = r.json().await.unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let m = env.metrics().await.unwrap();
    assert!(
        m.contains(r#"switchyard_router_retries_total{from_pool="l40s-spot",reason="preempted",to_pool="l40s-ondemand"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_spot_worker_fails_over_and_expires() {
    let mut env = spot_and_on_demand("l40s", &[]).await.unwrap();
    let spot = env.workers.remove(0);
    drop(spot); // SIGKILL: no drain, no deregister
    let r = env.chat(&chat_body("tiny", 1500, 4, false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
    // the lease expires (TTL 1 s in tests) and the worker leaves /admin/workers
    eventually(
        Duration::from_secs(5),
        "the dead worker's lease to expire",
        || async { (env.workers_json().await.ok()?.len() == 1).then_some(()) },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_openai_errors() {
    let env = TestEnv::new()
        .rules(RULES)
        .router_arg("--max-body-bytes")
        .router_arg("65536")
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", env.proxy);
    let r = env
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "invalid_json");

    let r = env
        .chat(&chat_body("no-such-model", 10, 4, false))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");

    let r = env
        .chat(&chat_body("tiny", 100_000, 4, false))
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");

    let r = env
        .chat(&json!({ "model": "tiny", "messages": [] }))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // a route whose pools have no live worker: 503 with Retry-After
    let r = env.chat(&chat_body("tiny", 1500, 4, false)).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "retry-after"), "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "no_capacity");

    // an option the worker does not support is refused, not ignored
    let mut body = chat_body("tiny", 10, 4, false);
    body["tools"] = json!([]);
    let r = env.chat(&body).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unsupported_parameter");

    // a continuation (what a resumed stream sends) needs its assistant message last, and
    // `add_generation_prompt: false` means nothing without it
    for (extra, last_role, param) in [
        (
            json!({ "continue_final_message": true }),
            "user",
            "messages",
        ),
        (
            json!({ "continue_final_message": true, "add_generation_prompt": true }),
            "assistant",
            "add_generation_prompt",
        ),
        (
            json!({ "add_generation_prompt": false }),
            "user",
            "add_generation_prompt",
        ),
        (
            json!({ "continue_final_message": "yes" }),
            "assistant",
            "continue_final_message",
        ),
    ] {
        let mut body = chat_body("tiny", 10, 4, false);
        body["messages"] = json!([
            { "role": "user", "content": "hi" },
            { "role": last_role, "content": "Hel" },
        ]);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = env.chat(&body).await.unwrap();
        assert_eq!(r.status(), 400, "{extra}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    // and a well-formed one is answered
    let mut body = chat_body("tiny", 10, 4, false);
    body["messages"] = json!([
        { "role": "user", "content": "hi" },
        { "role": "assistant", "content": "Hel" },
    ]);
    body["continue_final_message"] = json!(true);
    body["add_generation_prompt"] = json!(false);
    let r = env.chat(&body).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_edit_changes_routing_and_a_broken_edit_is_rejected() {
    let env = TestEnv::new()
        .rules(RULES)
        .worker(WorkerSpec::new("cpu"))
        .worker(WorkerSpec::new("l40s-ondemand"))
        .start()
        .await
        .unwrap();
    let r = env.chat(&chat_body("tiny", 30, 4, false)).await.unwrap();
    assert_eq!(header(&r, "x-switchyard-pool"), "cpu");

    let current = std::fs::read_to_string(&env.rules_path).unwrap();
    let broken = current.replace("route: [cpu]", "route: [gpu-that-does-not-exist]");
    std::fs::write(&env.rules_path, broken).unwrap();
    eventually(
        Duration::from_secs(5),
        "the rejected reload to be counted",
        || async {
            env.metrics()
                .await
                .ok()?
                .contains(r#"switchyard_router_rules_reloads_total{outcome="rejected"} 1"#)
                .then_some(())
        },
    )
    .await
    .unwrap();
    let r = env.chat(&chat_body("tiny", 30, 4, false)).await.unwrap();
    assert_eq!(
        header(&r, "x-switchyard-pool"),
        "cpu",
        "the old rules keep serving"
    );

    // From here on, clients keep sending while the file is edited: no request may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loaders: Vec<_> = (0..3)
        .map(|_| {
            let http = env.http.clone();
            let url = format!("{}/v1/chat/completions", env.proxy);
            let stop = std::sync::Arc::clone(&stop);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http
                        .post(&url)
                        .json(&chat_body("tiny", 30, 4, false))
                        .send()
                        .await
                        .expect("request sent");
                    let status = r.status().as_u16();
                    let pool = header(&r, "x-switchyard-pool");
                    let body = r.text().await.expect("body read");
                    seen.push((status, pool, body));
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let edited = current.replace("route: [cpu]", "route: [l40s-ondemand]");
    let t0 = std::time::Instant::now();
    std::fs::write(&env.rules_path, edited).unwrap();
    eventually(
        Duration::from_secs(2),
        "routing to follow the edited rules",
        || async {
            let r = env.chat(&chat_body("tiny", 30, 4, false)).await.ok()?;
            assert_eq!(r.status(), 200, "no request fails during a reload");
            (header(&r, "x-switchyard-pool") == "l40s-ondemand").then_some(())
        },
    )
    .await
    .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut pools = std::collections::BTreeSet::new();
    let mut total = 0;
    for l in loaders {
        for (status, pool, body) in l.await.unwrap() {
            assert_eq!(status, 200, "a request failed during the reload: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["object"], "chat.completion", "{body}");
            pools.insert(pool);
            total += 1;
        }
    }
    assert!(total >= 6, "the clients kept sending ({total} requests)");
    assert_eq!(
        pools.into_iter().collect::<Vec<_>>(),
        ["cpu", "l40s-ondemand"],
        "the concurrent clients saw the old rules, then the new"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_503_with_retry_after_and_loses_no_accepted_request() {
    // One worker, one running sequence and one queue slot: the third concurrent request
    // finds the worker full (429 from the worker); with no other worker for the route, the
    // router answers 503 with Retry-After in OpenAI's error shape. The two accepted
    // requests complete.
    let env = TestEnv::new()
        .rules(RULES)
        .worker(WorkerSpec::new("cpu").faulty().arg("--queue").arg("1"))
        .start()
        .await
        .unwrap();
    env.faults(0, json!({ "token_delay_ms": 1500 }))
        .await
        .unwrap();
    let worker_metrics = format!("{}/metrics", env.workers[0].url);
    let metrics_text = || {
        let http = env.http.clone();
        let url = worker_metrics.clone();
        async move { http.get(&url).send().await.ok()?.text().await.ok() }
    };
    let gauge = |name: &'static str| {
        let text = metrics_text();
        async move {
            text.await?
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        }
    };
    let send = |env: &integration::Running| {
        let http = env.http.clone();
        let url = format!("{}/v1/chat/completions", env.proxy);
        tokio::spawn(async move {
            let r = http
                .post(&url)
                .json(&chat_body("tiny", 20, 1, false))
                .send()
                .await
                .expect("sent");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        })
    };
    // the worker's warm-up request is already in its histograms
    let base = gauge("switchyard_worker_ttft_seconds_count ")
        .await
        .unwrap();
    let running = send(&env);
    eventually(Duration::from_secs(10), "one request running", || async {
        (gauge("switchyard_worker_in_flight ").await? == 1).then_some(())
    })
    .await
    .unwrap();
    let queued = send(&env);
    eventually(Duration::from_secs(10), "one request queued", || async {
        (gauge("switchyard_worker_queue_depth ").await? == 1).then_some(())
    })
    .await
    .unwrap();

    let r = env.chat(&chat_body("tiny", 20, 1, false)).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "retry-after"), "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["code"], "no_capacity");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at capacity"),
        "{v}"
    );

    for job in [running, queued] {
        let (status, body) = job.await.unwrap();
        assert_eq!(status, 200, "an accepted request was lost: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{body}");
    }
    // both accepted requests are in the worker's TTFT and queue-wait histograms; the
    // queued one waited ~1.5 s for its slot, the others (running, warm-up) did not wait
    assert_eq!(
        gauge("switchyard_worker_ttft_seconds_count ").await,
        Some(base + 2)
    );
    assert_eq!(
        gauge("switchyard_worker_queue_wait_seconds_count ").await,
        Some(base + 2)
    );
    let text = metrics_text().await.unwrap();
    let within_1s = format!(
        "switchyard_worker_queue_wait_seconds_bucket{{le=\"1\"}} {}",
        base + 1
    );
    assert!(text.contains(&within_1s), "{within_1s} in {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_parts_go_to_h100_served_by_the_labelled_sim_backend() {
    let env = TestEnv::new()
        .rules(RULES)
        .worker(WorkerSpec::new("cpu"))
        .worker(
            WorkerSpec::new("h100-spot")
                .arg("--backend")
                .arg("sim")
                .arg("--sim-ttft-ms")
                .arg("20"),
        )
        .start()
        .await
        .unwrap();
    let body = json!({
        "model": "tiny", "max_tokens": 5,
        "messages": [{ "role": "user", "content": [
            { "type": "text", "text": "What is in this picture?" },
            { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0KGgo=" } }
        ]}]
    });
    let r = env.chat(&body).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-rule"), "multimodal");
    assert_eq!(header(&r, "x-switchyard-pool"), "h100-spot");
    assert_eq!(
        header(&r, "x-switchyard-backend"),
        "sim",
        "simulated answers are labelled"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // the real CPU worker refuses image parts rather than ignoring them
    let r = env
        .http
        .post(format!("{}/v1/chat/completions", env.workers[0].url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let workers = env.workers_json().await.unwrap();
    let h100 = workers.iter().find(|w| w["pool"] == "h100-spot").unwrap();
    assert_eq!(h100["device"], "sim");
    assert_eq!(
        h100["models"][0]["modalities"],
        json!(["text", "image", "audio"])
    );
    // its heartbeats report the decode speed it simulates, as a real worker's do
    let tps = integration::eventually(Duration::from_secs(5), "a decode speed", || async {
        let ws = env.workers_json().await.ok()?;
        let w = ws.iter().find(|w| w["pool"] == "h100-spot")?;
        let tps = w["reported"]["tokens_per_second"].as_f64()?;
        (tps > 0.0).then_some(tps)
    })
    .await
    .unwrap();
    assert!(tps <= 60.0, "at most the profile's 50 tokens/s: {tps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_explains_lists_pools_reports_readiness_and_reloads() {
    let env = TestEnv::new()
        .rules(RULES)
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap();
    let get = |path: &str| {
        let url = format!("{}{path}", env.admin);
        let http = env.http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    // ready: the cpu pool has a live worker
    let (status, ready) = get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["pools_with_capacity"], json!(["cpu"]));

    // pools: every pool of the rules, with price and workers by state
    let (_, pools) = get("/admin/pools").await;
    let pools = pools.as_array().unwrap();
    assert_eq!(pools.len(), 5);
    let cpu = pools.iter().find(|p| p["name"] == "cpu").unwrap();
    assert_eq!(cpu["workers"]["live"], 1);
    assert_eq!(cpu["cost_per_hour"], 0.2);
    let spot = pools.iter().find(|p| p["name"] == "l40s-spot").unwrap();
    assert_eq!(spot["capacity"], "spot");
    assert_eq!(spot["workers"]["live"], 0);

    // explain: what the router reads and where the request would go now, forwarding nothing
    let explain = |body: Value| {
        let url = format!("{}/admin/explain", env.admin);
        let http = env.http.clone();
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, short) = explain(chat_body("tiny", 30, 4, false)).await;
    assert_eq!(status, 200, "{short}");
    assert_eq!(short["decision"]["rule"], "light");
    assert_eq!(short["would_serve"], "cpu");
    assert!(
        short["features"]["prompt_tokens"].as_u64().unwrap() > 10,
        "{short}"
    );
    let (_, medium) = explain(chat_body("tiny", 1500, 4, false)).await;
    assert_eq!(medium["decision"]["rule"], "chat");
    assert_eq!(
        medium["targets_now"],
        json!([{ "pool": "l40s-spot", "routable_workers": 0 }, { "pool": "l40s-ondemand", "routable_workers": 0 }])
    );
    assert_eq!(medium["would_serve"], Value::Null, "no l40s worker is up");
    let r = env
        .http
        .post(format!("{}/admin/explain", env.admin))
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_json");

    // a broken edit, then SIGHUP: the router survives the signal, the reload is rejected
    // with every problem listed in /admin/rules, and the old rules keep serving
    let (_, before) = get("/admin/rules").await;
    assert_eq!(before["last_reload"], Value::Null);
    let current = std::fs::read_to_string(&env.rules_path).unwrap();
    std::fs::write(
        &env.rules_path,
        current.replace("route: [cpu]", "route: [nowhere]"),
    )
    .unwrap();
    env.router.signal("HUP");
    let rejected = eventually(Duration::from_secs(5), "the rejected reload", || async {
        let (_, rules) = get("/admin/rules").await;
        (rules["last_reload"]["outcome"] == "rejected").then_some(rules)
    })
    .await
    .unwrap();
    let problems = rejected["last_reload"]["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["message"].as_str().unwrap().contains("nowhere")),
        "{rejected}"
    );
    assert_eq!(
        rejected["generation"], before["generation"],
        "the old rules keep serving"
    );
    let r = env.chat(&chat_body("tiny", 30, 4, false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "cpu");
    // (log lines are written by a background thread: give it a moment)
    eventually(Duration::from_secs(5), "the SIGHUP log line", || async {
        env.log("router.log")
            .contains("SIGHUP: reloading rules")
            .then_some(())
    })
    .await
    .expect("the router handled SIGHUP");
    // a request's metrics are recorded once its answer is sent: poll for them
    let metrics = eventually(Duration::from_secs(5), "the request's metrics", || async {
        let m = env.metrics().await.ok()?;
        m.contains(r#"switchyard_router_prompt_tokens_total{model="tiny",pool="cpu"}"#)
            .then_some(m)
    })
    .await
    .unwrap();
    assert!(
        metrics.contains(r#"switchyard_router_workers{pool="cpu",state="live"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"switchyard_router_workers{pool="l40s-spot",state="live"} 0"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_a_pool_has_a_worker() {
    let env = TestEnv::new().rules(RULES).start().await.unwrap();
    let r = env
        .http
        .get(format!("{}/readyz", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ready"], false);
    assert_eq!(v["pools_with_capacity"], json!([]));
}

/// Workers load Hugging Face directories (config.json, bf16 safetensors, tokenizer.json,
/// tokenizer_config.json) as well as GGUF: a Qwen2 and a Llama 3 model, each with its own
/// tokenizer, ChatML template and context window, answer through the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safetensors_models_answer_through_the_router() {
    use model_meta::tiny::{HfArch, HfOptions, LlamaShape, write_random_hf};
    let models = tempfile::tempdir().unwrap();
    let mut rules = String::from("version: 1\nmodels:\n");
    let mut env = TestEnv::new();
    for (name, arch) in [("qwen", HfArch::Qwen2), ("llama3", HfArch::Llama)] {
        let dir = models.path().join(name);
        let opts = HfOptions {
            arch,
            tie_embeddings: arch == HfArch::Qwen2,
            llama3_rope: arch == HfArch::Llama,
            context_length: 512,
            rope_theta: 500_000.0,
        };
        write_random_hf(&dir, &LlamaShape::TINY, &opts).unwrap();
        rules.push_str(&format!(
            "  {name}: {{ tokenizer: {{ json: \"{}\" }}, context_window: 512 }}\n",
            dir.join("tokenizer.json").display()
        ));
        env = env.worker(WorkerSpec::new("cpu").model(dir, name));
    }
    rules.push_str(
        "pools:\n  cpu: { class: cpu, capacity: on_demand, cost_per_hour: 0.2 }\n\
         rules:\n  - name: all\n    route: [cpu]\n",
    );
    let env = env.rules(&rules).start().await.unwrap();
    for name in ["qwen", "llama3"] {
        let body = json!({
            "model": name,
            "messages": [{ "role": "user", "content": "Hi" }],
            "max_tokens": 6,
        });
        let r = env.chat(&body).await.unwrap();
        assert_eq!(r.status(), 200, "{name}: {}", env.log("router.log"));
        assert_eq!(header(&r, "x-switchyard-pool"), "cpu");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["model"], name);
        // ChatML from tokenizer_config.json, its markers single special tokens of
        // tokenizer.json: <|im_start|> "user\nHi" <|im_end|> "\n" <|im_start|> "assistant\n"
        assert_eq!(v["usage"]["prompt_tokens"], 1 + 7 + 1 + 1 + 1 + 10, "{v}");
        // random weights may sample an end-of-turn id (any of generation_config.json's)
        // at any point: fewer than max_tokens ends with "stop", exactly max_tokens "length"
        let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
        let finish = if completion == 6 { "length" } else { "stop" };
        assert!(completion <= 6, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], finish, "{v}");
    }
    // the worker's context window is config.json's max_position_embeddings (512)
    let long = json!({
        "model": "qwen",
        "messages": [{ "role": "user", "content": "x".repeat(600) }],
        "max_tokens": 4,
    });
    let r = env
        .http
        .post(format!("{}/v1/chat/completions", env.workers[0].url))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("512"),
        "{v}"
    );
}

/// A prompt whose tokens' lower bound alone passes the model's context window (2,048 for
/// `tiny` in the rules) is refused by the router with OpenAI's 400
/// `context_length_exceeded`, before any worker sees it (#17).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_context_window_is_refused_before_forwarding() {
    let env = integration::faulty_cpu(&[], json!({})).await.unwrap();
    let body = json!({
        "model": "tiny", "max_tokens": 4,
        "messages": [{ "role": "user", "content": "word ".repeat(5000) }]
    });
    let r = env.chat(&body).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        header(&r, "x-switchyard-attempts"),
        "",
        "nothing was forwarded"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert_eq!(v["error"]["param"], "messages");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("2048"),
        "{v}"
    );
    // on /v1/completions the field at fault is the prompt
    let r = env
        .http
        .post(format!("{}/v1/completions", env.proxy))
        .json(&json!({ "model": "tiny", "max_tokens": 4, "prompt": "word ".repeat(5000) }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert_eq!(v["error"]["param"], "prompt", "{v}");
    // a prompt that fits is served
    let r = env.chat(&chat_body("tiny", 30, 2, false)).await.unwrap();
    assert_eq!(r.status(), 200);
}
