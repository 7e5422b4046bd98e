//! Observability against a real Prometheus (Debian's `prometheus`, installed by
//! `scripts/test.sh`): it scrapes a running router and its workers while traffic flows
//! (failovers, streams, tenants, refusals); the key series must be there with the right
//! labels and the router's own values; every query of the Grafana dashboard in
//! `deploy/grafana` must return data; every alert rule in `deploy/prometheus` must load and
//! evaluate; and `promtool` must pass the rules and their unit tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use integration::{FLEET_RULES, Running, TestEnv, WorkerSpec, chat_body, eventually, sha256_hex};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A program the test needs from the machine: its absence fails the test, with the fix.
fn program(name: &str) -> &str {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{name}` is not installed: scripts/test.sh installs it (apt-get install prometheus)"
    );
    name
}

/// A Prometheus server of its own, scraping every second; killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(env: &Running) -> Prometheus {
        let dir = env.dir.path();
        let host = |url: &str| {
            url.trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string()
        };
        let workers: Vec<String> = env
            .workers
            .iter()
            .map(|w| {
                format!(
                    "      - {{ targets: [\"{}\"], labels: {{ pool: \"{}\" }} }}\n",
                    host(&w.url),
                    w.pool
                )
            })
            .collect();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             rule_files: [\"{alerts}\"]\n\
             scrape_configs:\n\
             \x20 - job_name: switchyard-router\n\
             \x20   static_configs: [{{ targets: [\"{router}\"] }}]\n\
             \x20 - job_name: switchyard-worker\n\
             \x20   static_configs:\n{workers}",
            alerts = repo()
                .join("deploy/prometheus/alerts.yaml")
                .canonicalize()
                .unwrap()
                .display(),
            router = host(&env.admin),
            workers = workers.concat(),
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(program("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
        eventually(Duration::from_secs(30), "prometheus ready", || async {
            let r = p.http.get(format!("{}/-/ready", p.url)).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", log()));
        p
    }

    /// A GET of Prometheus's HTTP API (`/api/v1/...`), as JSON.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        self.http
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// An instant query's result vector (panics on an API error, with the query).
    async fn query(&self, q: &str) -> Vec<Value> {
        let r = self.api("query", &[("query", q)]).await;
        assert_eq!(r["status"], "success", "{q}: {r}");
        r["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of a query, when it has exactly one series.
    async fn value(&self, q: &str) -> Option<f64> {
        match self.query(q).await.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

/// Requests of every kind until stopped: short chats (cpu) and streams for two tenants,
/// long ones (l40s) whose spot worker is preempted every third time (the on-demand
/// worker answers), and a tenant over its one request a minute (429s).
fn traffic(env: &Arc<Running>, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let (env, stop) = (Arc::clone(env), Arc::clone(stop));
    tokio::spawn(async move {
        let url = format!("{}/v1/chat/completions", env.proxy);
        let mut ok = 0;
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            if i.is_multiple_of(3) {
                env.faults(0, json!({ "fail_next": 1 })).await.unwrap();
            }
            // now and then the spot worker cuts a long stream after two tokens (resumed on
            // on-demand), or is slow to its first token (escalated to on-demand)
            let (cut, slow) = (i % 4 == 1, i % 4 == 2);
            if cut || slow {
                let f = if cut {
                    json!({ "drop_after_tokens": 2 })
                } else {
                    json!({ "delay_first_token_ms": 1000 })
                };
                env.faults(0, f).await.unwrap();
                let r = env
                    .http
                    .post(&url)
                    .bearer_auth("secret-b")
                    .json(&chat_body("tiny", 1500, 8, true))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    ok += 1;
                }
                let _ = r.bytes().await;
                env.faults(
                    0,
                    json!({ "drop_after_tokens": 0, "delay_first_token_ms": 0 }),
                )
                .await
                .unwrap();
            }
            let sends = [
                ("secret-a", chat_body("tiny", 30, 4, false)),
                ("secret-b", chat_body("tiny", 30, 4, true)),
                ("secret-a", chat_body("tiny", 1500, 4, false)),
                ("secret-limited", chat_body("tiny", 30, 2, false)),
            ];
            for (key, body) in sends {
                let r = env
                    .http
                    .post(&url)
                    .bearer_auth(key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    ok += 1;
                }
                let _ = r.bytes().await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ok
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_fleet_and_runs_every_dashboard_query_and_alert() {
    // the chat rule (l40s, spot first) with deadline escalation, the light one (cpu) with a
    // latency objective it meets
    let fleet = FLEET_RULES
        .replace(
            "route: [l40s-spot, l40s-ondemand]\n",
            "route: [l40s-spot, l40s-ondemand]\n    retry: { escalate_after_ms: 400 }\n",
        )
        .replace(
            "route: [cpu]\n",
            "route: [cpu]\n    slo: { ttft_p95_ms: 30000 }\n",
        );
    let rules = format!(
        "{fleet}tenants:\n  team-a:\n    keys: [{{ sha256: \"{}\" }}]\n  team-b:\n    keys: [{{ sha256: \"{}\" }}]\n  team-limited:\n    keys: [{{ sha256: \"{}\" }}]\n    limits: {{ requests_per_minute: 1 }}\n",
        sha256_hex("secret-a"),
        sha256_hex("secret-b"),
        sha256_hex("secret-limited"),
    );
    let env = TestEnv::new()
        .rules(&rules)
        .router_arg("--drift-window-s")
        .router_arg("2")
        // The traffic repeats one filler prompt per size. With prefix caches the reference
        // pool's measured worker-seconds per token would be mostly cache hits, and the
        // cost report's token-based baseline would price the cheaper pools' traffic below
        // its cost (the baseline does not tell cached prompt tokens from computed ones).
        .worker(
            WorkerSpec::new("l40s-spot")
                .faulty()
                .arg("--prefix-cache-mib")
                .arg("0"),
        )
        .worker(
            WorkerSpec::new("l40s-ondemand")
                .arg("--prefix-cache-mib")
                .arg("0"),
        )
        .worker(WorkerSpec::new("cpu").arg("--prefix-cache-mib").arg("0"))
        .start()
        .await
        .unwrap();
    let env = Arc::new(env);
    let prom = Prometheus::start(&env).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&env, &stop);

    // every target up, and the traffic's failovers scraped
    eventually(Duration::from_secs(30), "4 targets up", || async {
        (prom.value("sum(up)").await? == 4.0).then_some(())
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "a preemption scraped", || async {
        let q = r#"switchyard_router_retries_total{from_pool="l40s-spot",to_pool="l40s-ondemand",reason="preempted"}"#;
        (prom.value(q).await? >= 1.0).then_some(())
    })
    .await
    .unwrap();
    // rates need a few scrapes of traffic
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every query of every dashboard panel returns data, with Grafana's variables as
    // "All" and its intervals at 1 m / 5 m.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/switchyard.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    let mut empty = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$pool", ".*")
                .replace("$model", ".*")
                .replace("$tenant", ".*");
            let result = prom.query(&q).await;
            let finite = result.iter().any(|s| {
                s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            });
            if !finite {
                empty.push(format!("{}: {q} → {result:?}", panel["title"]));
            }
            checked += 1;
        }
    }
    assert!(checked >= 34, "{checked} queries");
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    // the dashboard's variables list values
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(q) = var["query"]["query"].as_str() else {
            continue;
        };
        let (metric, label) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.split_once(", "))
            .unwrap();
        let r = prom
            .api(&format!("label/{label}/values"), &[("match[]", metric)])
            .await;
        assert!(
            !r["data"].as_array().unwrap().is_empty(),
            "variable {q}: {r}"
        );
    }

    // Every alert rule loaded and evaluates without error on the real series.
    let rules = eventually(Duration::from_secs(15), "every rule evaluated", || async {
        let r = prom.api("rules", &[]).await;
        let all: Vec<Value> = r["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        all.iter().all(|r| r["health"] == "ok").then_some(all)
    })
    .await
    .unwrap();
    assert!(rules.len() >= 21, "{rules:?}");
    let firing: Vec<&Value> = rules
        .iter()
        .filter(|r| r["state"] == "firing" || r["state"] == "pending")
        .collect();
    // a healthy fleet whose spot worker fails one request in three: the retries hide it
    // from clients, so no SLO or capacity alert fires
    assert!(firing.is_empty(), "{firing:#?}");

    // Stop the traffic; once scraped again, Prometheus holds the router's own values, with
    // the labels operators filter on (configured models and tenants, no keys).
    stop.store(true, Ordering::Relaxed);
    let served = load.await.unwrap();
    assert!(served >= 9, "{served}");
    let router = env.metrics().await.unwrap();
    let series = [
        r#"switchyard_router_requests_total{model="tiny",pool="cpu",rule="light",status="200"}"#,
        r#"switchyard_router_requests_total{model="tiny",pool="l40s-ondemand",rule="chat",status="200"}"#,
        r#"switchyard_router_retries_total{from_pool="l40s-spot",reason="preempted",to_pool="l40s-ondemand"}"#,
        r#"switchyard_router_completion_tokens_total{model="tiny",pool="cpu"}"#,
        r#"switchyard_router_tenant_rejections_total{reason="requests_per_minute",tenant="team-limited"}"#,
    ];
    for s in series {
        let line = router
            .lines()
            .find(|l| l.starts_with(s))
            .unwrap_or_else(|| panic!("{s} not in\n{router}"));
        let want: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        eventually(Duration::from_secs(10), s, || async {
            (prom.value(s).await? == want).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: router says {want}"));
    }
    for tenant in ["team-a", "team-b"] {
        let q = format!(r#"sum(switchyard_router_cost_usd_total{{tenant="{tenant}"}})"#);
        assert!(prom.value(&q).await.unwrap() > 0.0, "{q}");
    }
    // The cost report (`GET /admin/cost`, `switchyard cost`) agrees with the cost counter,
    // tenant by tenant, and prices the same traffic all on H100 on-demand, the dearest
    // on-demand pool: dearer than what the cheap pools cost.
    let report: Value = env
        .admin_get("/admin/cost?window=60&by=tenant")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["baseline_pool"], "h100-ondemand", "{report}");
    for tenant in ["team-a", "team-b"] {
        let row = report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["tenant"] == tenant)
            .unwrap_or_else(|| panic!("no {tenant} in {report}"));
        let counted: f64 = router
            .lines()
            .filter(|l| {
                l.starts_with("switchyard_router_cost_usd_total{")
                    && l.contains(&format!("tenant=\"{tenant}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let cost = row["cost_usd"].as_f64().unwrap();
        assert!(
            cost > 0.0 && (cost - counted).abs() < 1e-9,
            "{row} vs {counted}"
        );
        assert!(row["baseline_usd"].as_f64().unwrap() > cost, "{row}");
        assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
    }
    assert!(report["savings_usd"].as_f64().unwrap() > 0.0, "{report}");
    let admin = env
        .admin
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let out = Command::new(integration::bin("switchyard").unwrap())
        .args(["cost", "--admin", admin, "--by", "tenant,pool"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("h100-ondemand") && table.contains("team-a"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("team-b") && l.contains("cpu")),
        "{table}"
    );
    let bad = Command::new(integration::bin("switchyard").unwrap())
        .args(["cost", "--admin", admin, "--by", "colour"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot group by `colour`"));

    // workers' series carry the pool their scrape job names
    let generated = prom
        .value(r#"sum(switchyard_worker_generated_tokens_total{pool="cpu"})"#)
        .await
        .unwrap();
    assert!(generated > 0.0);
    // no label anywhere holds an API key
    let keys = prom.query(r#"{__name__=~"switchyard_.*"}"#).await;
    let text = serde_json::to_string(&keys).unwrap();
    assert!(!text.contains("secret-"), "a key in a label");
}

/// The alert rules pass `promtool check rules` and their unit tests
/// (`deploy/prometheus/alerts.test.yaml`: each alert fires on the series it is for, at the
/// time it should, with the annotations it renders, and stays quiet on a healthy fleet).
#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    let promtool = program("promtool");
    for args in [
        ["check", "rules", "alerts.yaml"],
        ["test", "rules", "alerts.test.yaml"],
    ] {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
