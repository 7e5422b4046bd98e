//! Prefix reuse, end to end: a worker's prefix cache serving a repeated system prompt, and
//! the router's `cache_aware` selection sending each tenant's requests to the worker that
//! holds its system prompt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use integration::{TestEnv, WorkerSpec};
use serde_json::{Value, json};

/// The real model: the second question under the same system prompt reuses the prompt's
/// keys and values (the worker's counters, and its heartbeat's hit rate in the router's
/// view) and answers as it would have without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_worker_reuses_a_repeated_system_prompt() {
    let Some(model) = model_meta::workspace_smollm2() else {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch-model.sh)");
        return;
    };
    let rules = format!(
        r#"
version: 1
models:
  smollm2: {{ tokenizer: {{ gguf: "{}" }}, context_window: 8192, default_max_tokens: 16 }}
pools:
  cached: {{ class: cpu, capacity: on_demand, cost_per_hour: 0.2 }}
  plain: {{ class: cpu, capacity: on_demand, cost_per_hour: 0.2 }}
rules:
  - name: plain
    when: {{ headers: {{ x-pool: [plain] }} }}
    route: [plain]
  - name: cached
    route: [cached]
"#,
        model.display()
    );
    let env = TestEnv::new()
        .rules(&rules)
        .worker(WorkerSpec::new("cached").model(model.clone(), "smollm2"))
        .worker(
            WorkerSpec::new("plain")
                .model(model, "smollm2")
                .arg("--prefix-cache-mib")
                .arg("0"),
        )
        .start()
        .await
        .unwrap();
    let system =
        "You are the travel desk of a large company. Answer in one short sentence. ".repeat(12);
    let ask = |country: &str, pool: &str| {
        let body = json!({
            "model": "smollm2",
            "messages": [
                { "role": "system", "content": system },
                { "role": "user", "content": format!("What is the capital of {country}?") },
            ],
            "max_tokens": 12,
            "temperature": 0,
        });
        let req = env
            .http
            .post(format!("{}/v1/chat/completions", env.proxy))
            .header("x-pool", pool)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            let cached = &v["usage"]["prompt_tokens_details"]["cached_tokens"];
            (
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                cached.as_u64().unwrap(),
            )
        }
    };
    let hits = |i| env.worker_metric(i, "switchyard_worker_prefix_cache_hit_tokens_total");
    let misses = |i| env.worker_metric(i, "switchyard_worker_prefix_cache_miss_tokens_total");
    let (first, cached) = ask("France", "cached").await;
    assert!(first.contains("Paris"), "{first}");
    assert_eq!(cached, 0);
    assert_eq!(hits(0).await.unwrap(), 0.0, "nothing to reuse yet");
    let prompt = misses(0).await.unwrap();
    assert!(prompt > 150.0, "a long system prompt: {prompt} tokens");
    let (japan, cached) = ask("Japan", "cached").await;
    assert!(japan.contains("Tokyo"), "{japan}");
    // the answer's usage says what was reused, as OpenAI's API does
    assert!(
        cached as f64 >= prompt - 64.0,
        "{cached} of {prompt} cached"
    );
    let (again, _) = ask("France", "cached").await;
    assert_eq!(again, first, "the same answer, with the prompt reused");
    // the system prompt's whole blocks were reused by the second and third questions
    let (cached, computed) = (hits(0).await.unwrap(), misses(0).await.unwrap());
    assert!(cached >= prompt, "reused {cached} of {}", cached + computed);
    assert!(
        env.worker_metric(0, "switchyard_worker_prefix_cache_bytes")
            .await
            .unwrap()
            > 0.0
    );
    // the worker without a prefix cache reuses nothing and answers the same
    assert_eq!(ask("France", "plain").await, (first.clone(), 0));
    assert_eq!(ask("France", "plain").await, (first, 0));
    assert_eq!(hits(1).await.unwrap(), 0.0);
    assert_eq!(
        env.worker_metric(1, "switchyard_worker_prefix_cache_bytes")
            .await
            .unwrap(),
        0.0
    );
    // the heartbeat carries the hit rate to the router
    let rate = integration::eventually(
        std::time::Duration::from_secs(5),
        "the hit rate in a heartbeat",
        || async {
            let workers = env.workers_json().await.ok()?;
            let w = workers.iter().find(|w| w["id"] == "cached-0")?;
            let rate = w["reported"]["prefix_cache_hit_rate"].as_f64()?;
            (rate > 0.0).then_some(rate)
        },
    )
    .await
    .unwrap();
    assert!(rate <= 1.0);
}

/// Eight tenants, each with its own 2 KB system prompt, over four simulated workers whose
/// prefix caches hold two such prompts each: with `cache_aware` each tenant keeps to its
/// worker and most prompt tokens come from the caches; with `power_of_two` few do. The
/// requests run four at a time, so load shapes the choices too. (Six runs: hit rate
/// 0.80-0.85 against 0.25-0.35, 2.4-3.4×; prompt tokens per worker within 1.3-1.6× of each
/// other.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aware_selection_keeps_each_tenant_where_its_prompt_is_cached() {
    let aware = tenants_replay("cache_aware").await;
    let p2c = tenants_replay("power_of_two").await;
    eprintln!(
        "prefix hit rate: cache_aware {:.3} (requests per worker {:?}), power_of_two {:.3} ({:?})",
        aware.0, aware.1, p2c.0, p2c.1
    );
    assert!(aware.0 > 0.7, "cache_aware hit rate {:.3}", aware.0);
    assert!(
        aware.0 >= 2.0 * p2c.0,
        "cache_aware {:.3} against power_of_two {:.3}",
        aware.0,
        p2c.0
    );
    let max = *aware.1.iter().max().unwrap() as f64;
    let min = *aware.1.iter().min().unwrap() as f64;
    assert!(min > 0.0 && max / min <= 1.75, "spread {:?}", aware.1);
}

/// Runs the tenants' requests through a pool selecting by `select`: (the workers' prefix
/// hit rate over all prompt tokens, prompt tokens each worker took — every prompt is
/// about as long, so these stand for its share of the requests).
async fn tenants_replay(select: &str) -> (f64, Vec<u64>) {
    let rules = format!(
        r#"
version: 1
models:
  tiny: {{ tokenizer: {{ gguf: "{{TINY}}" }}, context_window: 2048, default_max_tokens: 4 }}
pools:
  sim: {{ class: l40s, capacity: on_demand, cost_per_hour: 1.0, select: {select} }}
rules:
  - name: all
    route: [sim]
"#
    );
    // the tiny model's tokenizer is byte-level: a 2 KB system prompt is ~2k tokens;
    // 4 MiB at 1 KiB a token holds two of them
    let worker = || {
        let mut w = WorkerSpec::new("sim");
        for a in [
            "--backend",
            "sim",
            "--sim-ttft-ms",
            "5",
            "--sim-tokens-per-s",
            "500",
            "--sim-prefill-tokens-per-s",
            "200000",
            "--sim-kv-bytes-per-token",
            "1024",
            "--prefix-cache-mib",
            "4",
        ] {
            w = w.arg(a);
        }
        w
    };
    let env = TestEnv::new()
        .rules(&rules)
        .worker(worker())
        .worker(worker())
        .worker(worker())
        .worker(worker())
        .start()
        .await
        .unwrap();
    let body = |tenant: usize, i: usize| {
        let system = format!("Tenant {tenant} policy, section {{}}: be brief and exact. ");
        let system: String = (0..36)
            .map(|s| system.replace("{}", &s.to_string()))
            .collect();
        json!({
            "model": "tiny",
            "messages": [
                { "role": "system", "content": system },
                { "role": "user", "content": format!("question {i}") },
            ],
            "max_tokens": 4,
        })
    };
    let mut state = 11u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let tenants: Vec<usize> = (0..240).map(|_| next() % 8).collect();
    for chunk in tenants.chunks(4).enumerate() {
        let (c, ts) = chunk;
        let sends = ts.iter().enumerate().map(|(j, &t)| {
            let b = body(t, c * 4 + j);
            let env = &env;
            async move { env.chat(&b).await.unwrap().status() }
        });
        for status in futures::future::join_all(sends).await {
            assert_eq!(status, 200);
        }
    }
    let (mut hit, mut miss, mut served) = (0.0, 0.0, Vec::new());
    for i in 0..4 {
        let h = env
            .worker_metric(i, "switchyard_worker_prefix_cache_hit_tokens_total")
            .await
            .unwrap();
        let m = env
            .worker_metric(i, "switchyard_worker_prefix_cache_miss_tokens_total")
            .await
            .unwrap();
        (hit, miss) = (hit + h, miss + m);
        served.push((h + m) as u64);
    }
    let m = env.metrics().await.unwrap();
    for l in m.lines().filter(|l| l.contains("prefix_placements_total{")) {
        eprintln!("{select}: {l}");
    }
    (hit / (hit + miss), served)
}
