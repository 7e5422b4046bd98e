//! `switchyard rules check | explain | schema` as an operator runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use integration::bin;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn check_accepts_the_example_and_lists_every_problem_of_a_bad_file() {
    let ok = Command::new(bin("switchyard").unwrap())
        .args(["rules", "check"])
        .arg(repo().join("examples/rules.yaml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok (5 pools, 1 models, 4 rules)"));

    let bad = Command::new(bin("switchyard").unwrap())
        .args(["rules", "check"])
        .arg(repo().join("routing-rules/tests/fixtures/invalid/impossible-range.yaml"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains("rules[0].when.context_tokens (line 7"),
        "{err}"
    );
    assert!(err.contains("rules[0].when.prompt_tokens (line 8"), "{err}");
}

#[test]
fn explain_prints_the_features_and_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("req.json");
    std::fs::write(&req, r#"{"model":"smollm2","max_tokens":100,"messages":[{"role":"user","content":[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"data:,"}}]}]}"#).unwrap();
    let out = Command::new(bin("switchyard").unwrap())
        .args(["rules", "explain"])
        .arg(repo().join("examples/rules.yaml"))
        .arg(&req)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["rule"], "multimodal");
    assert_eq!(
        v["decision"]["targets"],
        serde_json::json!(["h100-spot", "h100-ondemand"])
    );
    assert_eq!(
        v["features"]["modalities"],
        serde_json::json!(["text", "image"])
    );
    assert!(
        v["features"]["prompt_tokens"].as_u64().unwrap() >= 765,
        "the image's token cost counts"
    );
}

#[test]
fn schema_is_json() {
    let out = Command::new(bin("switchyard").unwrap())
        .args(["rules", "schema"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["properties"]["version"]["const"], 1);
}

/// Sentence used to fill a golden case's prompt (`"fill": N` repeats it N times).
const FOX: &str = "The quick brown fox jumps over the lazy dog. ";

/// A golden case's request body.
fn golden_body(case: &serde_json::Value) -> serde_json::Value {
    let mut body = case["body"].clone();
    if let Some(n) = case["fill"].as_u64() {
        body["messages"][0]["content"] = FOX.repeat(n as usize).into();
    }
    body
}

/// Every golden fixture (`integration/tests/golden/NAME.yaml` with the decisions of
/// `NAME.cases.json`) gives the same decision through all three ways the router
/// classifies: live traffic (the 503 of a fleet with no workers names the rule),
/// `POST /admin/explain` and `switchyard rules explain` — tenant and header rules included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_decisions_are_the_same_live_in_admin_explain_and_in_the_cli() {
    use integration::{TestEnv, header};
    let dir = repo().join("integration/tests/golden");
    let mut fixtures: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    fixtures.sort();
    assert!(!fixtures.is_empty());
    let mut checked = 0;
    for rules in fixtures {
        let cases_path = rules.with_extension("cases.json");
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&cases_path).unwrap()).unwrap();
        let env = TestEnv::new()
            .rules(&std::fs::read_to_string(&rules).unwrap())
            .expect_registered(0)
            .start()
            .await
            .unwrap();
        for case in &cases {
            let name = format!("{}: {}", rules.display(), case["name"]);
            let body = golden_body(case);
            let endpoint = case["endpoint"].as_str().unwrap_or("/v1/chat/completions");
            let want_rule = case["rule"].as_str().unwrap();
            let want_targets = &case["targets"];
            let headers: Vec<(String, String)> = case["headers"]
                .as_object()
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let key = case["api_key"].as_str();

            // 1. live traffic
            let mut req = env
                .http
                .post(format!("{}{endpoint}", env.proxy))
                .json(&body);
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 503, "{name}: no worker anywhere");
            assert_eq!(header(&r, "x-switchyard-rule"), want_rule, "live: {name}");

            // 2. POST /admin/explain
            let mut req = env
                .http
                .post(format!("{}/admin/explain?endpoint={endpoint}", env.admin))
                .json(&body);
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            if let Some(k) = key {
                req = req.header("x-switchyard-explain-authorization", format!("Bearer {k}"));
            }
            let v: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
            assert_eq!(
                v["decision"]["rule"], want_rule,
                "admin explain: {name}: {v}"
            );
            assert_eq!(&v["decision"]["targets"], want_targets, "admin: {name}");

            // 3. switchyard rules explain
            let req_path = env.dir.path().join("request.json");
            std::fs::write(&req_path, body.to_string()).unwrap();
            let mut cmd = Command::new(bin("switchyard").unwrap());
            cmd.args(["rules", "explain"])
                .arg(&env.rules_path)
                .arg(&req_path)
                .args(["--endpoint", endpoint]);
            for (k, v) in &headers {
                cmd.args(["--header", &format!("{k}: {v}")]);
            }
            if let Some(k) = key {
                cmd.args(["--api-key", k]);
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["decision"]["rule"], want_rule, "cli explain: {name}: {v}");
            assert_eq!(&v["decision"]["targets"], want_targets, "cli: {name}");
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked} cases");
}

/// `switchyard preempt` (a worker pod's preStop hook): the worker drains, leaves every
/// router and exits, and the command returns once it has gone. Before it, the router's
/// autoscaling gauges show the worker's capacity (its batch size) and one desired worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_drains_a_worker_and_returns_once_it_has_gone() {
    use integration::{FLEET_RULES, TestEnv, WorkerSpec};
    let mut env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu").arg("--max-batch").arg("4"))
        .start()
        .await
        .unwrap();
    let text = env.metrics().await.unwrap();
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{pool=\"cpu\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(
        value("switchyard_router_pool_capacity"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(value("switchyard_router_pool_demand"), Some(0.0), "{text}");
    assert_eq!(
        value("switchyard_router_pool_desired_workers"),
        Some(1.0),
        "{text}"
    );

    let url = env.workers[0].url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin("switchyard").unwrap())
            .args(["preempt", "--worker", &url, "--deadline-s", "5"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("gone"), "{stdout}");
    let mut exited = None;
    for _ in 0..30 {
        exited = env.workers[0].proc.child.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(exited.is_some(), "the worker is still running");
    // gone from the router: deregistered as it left (or, if a loaded machine delayed a
    // heartbeat so that its lease was being renewed just then, when that lease runs out)
    integration::eventually(
        std::time::Duration::from_secs(3),
        "the worker to be gone",
        || async { env.workers_json().await.ok()?.is_empty().then_some(()) },
    )
    .await
    .unwrap();

    // nothing listening: a clear failure, not a hang
    let url = env.workers[0].url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin("switchyard").unwrap())
            .args(["preempt", "--worker", &url, "--deadline-s", "1"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
