//! Tenants through the real router: keys (only their hashes in the rules), `auth: required`,
//! per-tenant limits with OpenAI's 429 and rate-limit headers, bounded labels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use integration::{FLEET_RULES, TestEnv, WorkerSpec, chat_body, header, sha256_hex};
use serde_json::Value;

fn rules() -> String {
    format!(
        "{FLEET_RULES}auth: required\ntenants:\n  team-a:\n    keys: [{{ sha256: \"{}\" }}]\n    limits: {{ requests_per_minute: 2 }}\n  team-b:\n    keys: [{{ sha256: \"{}\" }}, {{ sha256: \"{}\" }}]\n  team-c:\n    keys: [{{ sha256: \"{}\" }}]\n    limits: {{ tokens_per_minute: 50 }}\n  team-fast:\n    keys: [{{ sha256: \"{}\" }}]\n    limits: {{ requests_per_minute: 120 }}\n  team-d:\n    keys: [{{ sha256: \"{}\" }}]\n    limits: {{ budget_usd_per_day: 0.0000001 }}\n  team-e:\n    keys: [{{ sha256: \"{}\" }}]\n    models: [big]\n    pools: [l40s-ondemand]\n  team-f:\n    keys: [{{ sha256: \"{}\" }}]\n    limits: {{ tokens_per_minute: 400 }}\n",
        sha256_hex("secret-key-a"),
        sha256_hex("secret-key-b"),
        sha256_hex("secret-key-b2"),
        sha256_hex("secret-key-c"),
        sha256_hex("secret-key-fast"),
        sha256_hex("secret-key-d"),
        sha256_hex("secret-key-e"),
        sha256_hex("secret-key-f"),
    )
    // a second model, for team-e's allowlist
    .replace(
        "models:\n",
        "models:\n  big:\n    tokenizer: { gguf: \"{TINY}\" }\n    context_window: 2048\n",
    )
}

/// The router on [`rules`] with one `cpu` worker.
async fn start() -> integration::Running {
    TestEnv::new()
        .rules(&rules())
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap()
}

async fn send(env: &integration::Running, key: Option<&str>) -> reqwest::Response {
    let mut req = env
        .http
        .post(format!("{}/v1/chat/completions", env.proxy))
        .json(&chat_body("tiny", 30, 4, false));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_auth_and_per_tenant_request_limits() {
    let env = start().await;

    // no key, and a key no tenant holds: 401 invalid_api_key, as OpenAI answers it
    for key in [None, Some("not-a-tenant")] {
        let r = send(&env, key).await;
        assert_eq!(r.status(), 401, "{key:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }

    // team-a: two requests a minute, the third is refused with what the SDKs back off on
    for left in ["1", "0"] {
        let r = send(&env, Some("secret-key-a")).await;
        assert_eq!(r.status(), 200, "{}", env.log("router.log"));
        // admitted answers say what is left too, so clients can pace themselves
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "2");
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), left);
        assert!(header(&r, "x-ratelimit-reset-requests").ends_with('s'));
    }
    let r = send(&env, Some("secret-key-a")).await;
    assert_eq!(r.status(), 429);
    let retry_after: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(
        (1..=30).contains(&retry_after),
        "one request refills in 30 s: {retry_after}"
    );
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    assert!(header(&r, "x-ratelimit-reset-requests").ends_with('s'));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    assert_eq!(v["error"]["type"], "requests", "{v}");

    // team-b, with either of its keys, is not touched by team-a's limit
    for key in [
        "secret-key-b",
        "secret-key-b2",
        "secret-key-b",
        "secret-key-b2",
    ] {
        let r = send(&env, Some(key)).await;
        assert_eq!(r.status(), 200);
    }

    // team-c: a prompt larger than a minute's tokens can never pass
    let r = env
        .http
        .post(format!("{}/v1/chat/completions", env.proxy))
        .bearer_auth("secret-key-c")
        .json(&chat_body("tiny", 1500, 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "50");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "tokens", "{v}");

    // team-d: a budget of $0.0000001 a day; the first request's cost spends it (charged
    // once the answer is sent), then 429 insufficient_quota until midnight UTC
    let r = send(&env, Some("secret-key-d")).await;
    assert_eq!(r.status(), 200);
    let refused = integration::eventually(
        std::time::Duration::from_secs(5),
        "the budget to run out",
        || async {
            let r = send(&env, Some("secret-key-d")).await;
            (r.status() == 429).then_some(r)
        },
    )
    .await
    .unwrap();
    let retry_after: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!((1..=86_400).contains(&retry_after), "{retry_after}");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");

    // what the operator sees: every tenant's limits and use now
    let t: Value = integration::eventually(
        std::time::Duration::from_secs(5),
        "nothing in flight",
        || async {
            let t: Value = env
                .admin_get("/admin/tenants")
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            t["tenants"]
                .as_array()?
                .iter()
                .all(|x| x["in_flight"] == 0)
                .then_some(t)
        },
    )
    .await
    .unwrap();
    assert_eq!(t["auth"], "required", "{t}");
    let by_name = |n: &str| {
        t["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_name("team-a")["limits"]["requests_per_minute"], 2, "{t}");
    assert!(
        by_name("team-d")["spent_today_usd"].as_f64().unwrap() > 1e-7,
        "{t}"
    );
    assert!(t.to_string().find("secret").is_none(), "no key in {t}");

    // labels are tenant names, refusals are counted by reason; no key appears anywhere
    let m = env.metrics().await.unwrap();
    assert!(
        m.contains(r#"switchyard_router_tenant_rejections_total{reason="requests_per_minute",tenant="team-a"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"switchyard_router_tenant_rejections_total{reason="invalid_api_key",tenant="other"} 2"#),
        "{m}"
    );
    assert!(
        m.contains(r#"switchyard_router_tenant_rejections_total{reason="tokens_per_minute",tenant="team-c"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"switchyard_router_cost_usd_total{model="tiny",pool="cpu",tenant="team-b"}"#),
        "{m}"
    );
    // (log lines are written by a background thread)
    let log = integration::eventually(
        std::time::Duration::from_secs(5),
        "an access line naming the tenant",
        || async {
            let log = env.log("router.log");
            (log.contains("\"tenant\":\"team-a\"") && log.contains("\"tenant\":\"team-b\""))
                .then_some(log)
        },
    )
    .await
    .unwrap();
    for secret in ["secret-key-a", "secret-key-b", "not-a-tenant"] {
        assert!(
            !log.contains(secret) && !m.contains(secret),
            "{secret} leaked"
        );
    }
}

/// The official OpenAI Python SDK against the router (`integration/sdk/tenants.py`, in the
/// venv `scripts/test.sh` makes): `AuthenticationError` for a key no tenant holds,
/// `RateLimitError` over a limit, and the SDK's own retries honour `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_sees_auth_and_rate_limit_errors_and_backs_off() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "no {}: run scripts/test.sh (it installs the openai package there)",
        python.display()
    );
    let env = start().await;
    let out = tokio::process::Command::new(python)
        .arg(root.join("sdk/tenants.py"))
        .arg(&env.proxy)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.log("router.log")
    );
    assert!(
        stdout.contains("AuthenticationError invalid_api_key"),
        "{stdout}"
    );
    assert!(stdout.contains("RateLimitError after"), "{stdout}");
    assert!(stdout.contains("retried by the SDK: succeeded"), "{stdout}");
    println!("{stdout}");
}

/// A tenant's models and pools: another model is `model_not_found` (as OpenAI answers a
/// model a key cannot use); a request whose rule routes only to pools the tenant may not
/// use is 403 `pool_not_allowed`, and explain shows the route cut to its pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_uses_only_its_models_and_pools() {
    let env = start().await;
    let ask = |model: &str, filler: usize| {
        env.http
            .post(format!("{}/v1/chat/completions", env.proxy))
            .bearer_auth("secret-key-e")
            .json(&chat_body(model, filler, 4, false))
            .send()
    };
    let r = ask("tiny", 30).await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    // `big` is its model; a short request's rule routes to cpu only, not its pool
    let r = ask("big", 30).await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "pool_not_allowed", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`light`"),
        "{v}"
    );
    // another tenant's same request is served on cpu
    assert_eq!(send(&env, Some("secret-key-b")).await.status(), 200);
    // `GET /v1/models` lists only what the caller's tenant may use; no key → 401
    let models = |key: Option<&'static str>| {
        let mut req = env.http.get(format!("{}/v1/models", env.proxy));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    let listed = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let b: Value = models(Some("secret-key-b"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed(&b), ["tiny"], "{b}");
    let e: Value = models(Some("secret-key-e"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(listed(&e).is_empty(), "team-e may not use tiny: {e}");
    let r = models(None).await.unwrap();
    assert_eq!(r.status(), 401);
    // explain: a longer request's route [l40s-spot, l40s-ondemand] cut to on-demand
    let explained: Value = env
        .http
        .post(format!("{}/admin/explain", env.admin))
        .bearer_auth("secret-key-e")
        .json(&chat_body("big", 1500, 4, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(explained["decision"]["rule"], "chat", "{explained}");
    assert_eq!(
        explained["decision"]["targets"],
        serde_json::json!(["l40s-ondemand"]),
        "{explained}"
    );
}

/// 3,000 random API keys (`auth: optional`, so each is a tenant of its own) add no tenant
/// series to `/metrics`: labels take configured tenant names only (`other` for the rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_random_keys_add_no_metric_series() {
    use futures::StreamExt;
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", env.proxy);
    let send = |key: String| {
        env.http
            .post(&url)
            .bearer_auth(key)
            .json(&chat_body("tiny", 30, 1, false))
            .send()
    };
    let series = |m: &str| -> std::collections::BTreeSet<String> {
        m.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()))
            .collect()
    };
    // one random key first: the series every such request records
    assert_eq!(send("warm-up-key".into()).await.unwrap().status(), 200);
    let before = series(
        &env.metrics_until(|m| m.contains("switchyard_router_cost_usd_total{"))
            .await
            .unwrap(),
    );
    let statuses: Vec<u16> = futures::stream::iter(0..3000)
        .map(|i| {
            let r = send(format!("random-{i}-{}", i * 7919));
            async move { r.await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "{:?}", {
        let mut bad: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
        bad.truncate(5);
        bad
    });
    let after = series(&env.metrics().await.unwrap());
    // (a retry or an overload answer may add series of their own: tenants' are checked)
    let new: Vec<_> = after
        .difference(&before)
        .filter(|s| s.contains("tenant=\""))
        .collect();
    assert!(new.is_empty(), "new tenant series: {new:#?}");
    assert!(
        !after.iter().any(|s| s.contains("random-")),
        "a key in a label"
    );
}

/// Completion tokens count against tokens per minute once the worker reports them: the
/// second request's remaining tokens are the first's, less the first answer's completion
/// tokens and the second prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_tokens_count_against_tokens_per_minute() {
    let env = start().await;
    let ask = || {
        env.http
            .post(format!("{}/v1/chat/completions", env.proxy))
            .bearer_auth("secret-key-f")
            .json(&chat_body("tiny", 30, 60, false))
            .send()
    };
    let left = |r: &reqwest::Response| -> i64 {
        header(r, "x-ratelimit-remaining-tokens").parse().unwrap()
    };
    let r = ask().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "400");
    let left1 = left(&r);
    let prompt = 400 - left1;
    let v: Value = r.json().await.unwrap();
    let completion = v["usage"]["completion_tokens"].as_i64().unwrap();
    assert!(completion >= 10, "too few tokens to tell: {v}");
    // the charge is made as the first request is logged, just after its answer
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let r = ask().await.unwrap();
    assert_eq!(r.status(), 200);
    let left2 = left(&r);
    let expected = left1 - completion - prompt;
    // the bucket refills 400 a minute (< 7 per second) meanwhile
    assert!(
        (expected..=expected + 10).contains(&left2),
        "left {left1} then {left2}; prompt {prompt}, completion {completion}"
    );
}
