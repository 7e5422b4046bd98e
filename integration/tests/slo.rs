//! SLO-aware tier choice (#21): under a load step that saturates the cheap CPU pool, a rule
//! with a latency objective spills to the next tier and returns when the CPU pool recovers;
//! compared side by side with the two static orders on the same workload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use integration::{Running, TestEnv, WorkerSpec, header};
use serde_json::json;

const OBJECTIVE_MS: u64 = 400;

fn rules(route: &str, slo: bool) -> String {
    let slo = if slo {
        format!("\n    slo: {{ ttft_p95_ms: {OBJECTIVE_MS} }}")
    } else {
        String::new()
    };
    format!(
        r#"
version: 1
models:
  tiny:
    tokenizer: {{ gguf: "{{TINY}}" }}
    context_window: 2048
pools:
  cpu:           {{ class: cpu,  capacity: on_demand, cost_per_hour: 0.20 }}
  l40s-ondemand: {{ class: l40s, capacity: on_demand, cost_per_hour: 1.86 }}
rules:
  - name: chat
    route: {route}{slo}
"#
    )
}

/// One answer: its time to first token and the pool that served it.
struct Answer {
    ttft: Duration,
    pool: String,
    /// Sent during the load step.
    in_step: bool,
    at: Duration,
}

/// `clients` streaming clients in a loop until `stop`.
fn clients(
    env: &Running,
    n: usize,
    in_step: bool,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Answer>>> {
    (0..n)
        .map(|_| {
            let (http, url, stop) = (
                env.http.clone(),
                format!("{}/v1/chat/completions", env.proxy),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({
                        "model": "tiny", "max_tokens": 12, "temperature": 0, "stream": true,
                        "messages": [{ "role": "user", "content": "Say hi." }],
                    });
                    let t0 = Instant::now();
                    let r = http.post(&url).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let pool = header(&r, "x-switchyard-pool");
                    let mut bytes = r.bytes_stream();
                    let mut ttft = None;
                    while let Some(chunk) = bytes.next().await {
                        let chunk = chunk.unwrap();
                        if ttft.is_none() && chunk.windows(11).any(|w| w == b"\"content\":\"") {
                            ttft = Some(t0.elapsed());
                        }
                    }
                    out.push(Answer {
                        ttft: ttft.unwrap_or_else(|| t0.elapsed()),
                        pool,
                        in_step,
                        at: t0.duration_since(started),
                    });
                }
                out
            })
        })
        .collect()
}

/// What one routing choice gave on the workload.
struct Outcome {
    answers: Vec<Answer>,
    cost_usd: f64,
}

impl Outcome {
    fn attainment(&self) -> f64 {
        let ok = self
            .answers
            .iter()
            .filter(|a| a.ttft <= Duration::from_millis(OBJECTIVE_MS))
            .count();
        ok as f64 / self.answers.len().max(1) as f64
    }
    fn share(&self, pool: &str, in_step: bool) -> f64 {
        let of: Vec<&Answer> = self
            .answers
            .iter()
            .filter(|a| a.in_step == in_step)
            .collect();
        of.iter().filter(|a| a.pool == pool).count() as f64 / of.len().max(1) as f64
    }
    fn cost_per_answer(&self) -> f64 {
        self.cost_usd / self.answers.len().max(1) as f64
    }
    /// The share of answers sent from second `from` to `to` that `pool` served.
    fn share_between(&self, pool: &str, from: u64, to: u64) -> f64 {
        let of: Vec<&Answer> = self
            .answers
            .iter()
            .filter(|a| (from..to).contains(&a.at.as_secs()))
            .collect();
        of.iter().filter(|a| a.pool == pool).count() as f64 / of.len().max(1) as f64
    }
}

/// The workload: one client for 2 s, six for 5 s (the step), one for 5 s again. The CPU
/// worker runs one sequence at a time, 30 ms a token: six clients queue on it.
async fn run(route: &str, slo: bool) -> (Running, Outcome) {
    let env = TestEnv::new()
        .rules(&rules(route, slo))
        .router_arg("--slo-window-s")
        .router_arg("2")
        .router_arg("--slo-cooldown-s")
        .router_arg("2")
        .worker(WorkerSpec::new("cpu").faulty().arg("--max-batch").arg("1"))
        .worker(WorkerSpec::new("l40s-ondemand"))
        .start()
        .await
        .unwrap();
    env.faults(0, json!({ "token_delay_ms": 30 }))
        .await
        .unwrap();
    let started = Instant::now();
    let mut answers = Vec::new();
    for (n, secs, in_step) in [(1, 2, false), (6, 5, true), (1, 5, false)] {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = clients(&env, n, in_step, started, Arc::clone(&stop));
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            answers.extend(t.await.unwrap());
        }
    }
    let m = env.metrics().await.unwrap();
    let cost_usd = m
        .lines()
        .filter(|l| l.starts_with("switchyard_router_cost_usd_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    (env, Outcome { answers, cost_usd })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_objective_spills_a_saturated_tier_and_returns_when_it_recovers() {
    let (_, cheap_first) = run("[cpu, l40s-ondemand]", false).await;
    let (_, fast_first) = run("[l40s-ondemand, cpu]", false).await;
    let (env, aware) = run("[cpu, l40s-ondemand]", true).await;
    let row = |name: &str, o: &Outcome| {
        format!(
            "{name:<22} {:>4} answers  TTFT ≤ {OBJECTIVE_MS} ms: {:>5.1} %  cost ${:.6} (${:.2e} per answer)  cpu share: {:.0} % of answers off-step, {:.0} % in the step",
            o.answers.len(),
            o.attainment() * 100.0,
            o.cost_usd,
            o.cost_per_answer(),
            o.share("cpu", false) * 100.0,
            o.share("cpu", true) * 100.0,
        )
    };
    eprintln!(
        "{}\n{}\n{}",
        row("static cpu → l40s", &cheap_first),
        row("static l40s → cpu", &fast_first),
        row("slo-aware", &aware)
    );
    assert!(
        aware.attainment() > cheap_first.attainment() + 0.2,
        "the objective is met far more often than with the cheap tier first"
    );
    // Clients here wait for each answer, so a faster choice serves more answers: cost is
    // compared per answer. (The CPU tier is slowed by fault injection, which makes each of
    // its answers dear in worker time: this compares routing choices on this workload, not
    // hardware.)
    assert!(
        aware.cost_per_answer() <= cheap_first.cost_per_answer(),
        "at no more cost per answer than the static order"
    );
    // the cheap tier serves before the step and again once it has recovered (the step
    // ends at 7 s; the window and the cooldown are 2 s each), and spills in the step
    assert!(aware.share_between("cpu", 0, 2) > 0.9, "before the step");
    assert!(aware.share_between("cpu", 3, 7) < 0.1, "in the step");
    assert!(aware.share_between("cpu", 10, 12) > 0.9, "back after it");
    let log = env.log("router.log");
    assert!(
        log.contains("\"spilled\":\"cpu\""),
        "the access line says which pool spilled"
    );
}
