//! The chaos drill (#17): sustained load while the spot worker is SIGKILLed and restarted
//! again and again (a preemption wave without notice), the rules file is rewritten every
//! 100 ms, and the router is upgraded in place halfway through.
//!
//! What must hold: no client sees an error for a failure before the first byte, no stream
//! is cut silently (a stream broken after its first byte ends with an SSE error event), and
//! the router's memory stays flat. Bounded for CI by `SWITCHYARD_CHAOS_SECS` (default 20);
//! `scripts/chaos-drill.sh` runs the full drill (5 minutes, ≥ 100 kills, ≥ 600 reloads) in
//! release mode and prints the figures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use integration::{FLEET_RULES, TestEnv, WorkerSpec, chat_body};

/// What one request ended as.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// An error status or a failed connection: a failure the router did not hide.
    visible: AtomicU64,
    /// A stream broken after its first byte, and said so (an SSE error event).
    broken_after_commit: AtomicU64,
    /// A JSON answer cut after its header. The router holds JSON answers until their body
    /// comes, so a worker dying mid-generation is failed over: this must stay 0.
    broken_json: AtomicU64,
    /// A stream that ended without `[DONE]` and without an error event.
    silent_cut: AtomicU64,
    /// The first visible errors, for the report.
    samples: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn visible(&self, what: String) -> &AtomicU64 {
        let mut s = self.samples.lock().unwrap();
        if s.len() < 5 {
            s.push(what);
        }
        &self.visible
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn sim(pool: &str) -> WorkerSpec {
    WorkerSpec::new(pool)
        .arg("--backend")
        .arg("sim")
        .arg("--sim-ttft-ms")
        .arg("30")
        .arg("--sim-tokens-per-s")
        .arg("200")
        .arg("--max-batch")
        .arg("64")
        .arg("--queue")
        .arg("64")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_drill_kills_reloads_and_an_upgrade_cost_no_hidden_failures() {
    let secs = env_u64("SWITCHYARD_CHAOS_SECS", 20);
    let kill_every = Duration::from_millis(env_u64("SWITCHYARD_CHAOS_KILL_MS", 1500));
    let clients = env_u64("SWITCHYARD_CHAOS_CLIENTS", 6);
    let mut env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(sim("l40s-spot"))
        .worker(sim("l40s-ondemand"))
        .start()
        .await
        .unwrap();
    let rules = FLEET_RULES.replace("{TINY}", &env.tiny_model.display().to_string());
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(secs);

    let load: Vec<_> = (0..clients)
        .map(|c| {
            let (http, url, tally) = (
                env.http.clone(),
                format!("{}/v1/chat/completions", env.proxy),
                Arc::clone(&tally),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let stream = (n + c).is_multiple_of(2);
                    let body = chat_body("tiny", 1500, 8, stream);
                    let outcome = match http.post(&url).json(&body).send().await {
                        Err(e) => tally.visible(format!("{e:?}")),
                        Ok(r) if r.status() != 200 => {
                            let status = r.status();
                            tally
                                .visible(format!("{status} {}", r.text().await.unwrap_or_default()))
                        }
                        Ok(r) => match r.text().await {
                            Err(_) if stream => &tally.broken_after_commit,
                            Err(_) => &tally.broken_json,
                            Ok(t) if stream && t.contains("data: [DONE]") => &tally.ok,
                            Ok(t) if stream && t.contains("\"error\"") => {
                                &tally.broken_after_commit
                            }
                            Ok(_) if stream => &tally.silent_cut,
                            Ok(t) => match serde_json::from_str::<serde_json::Value>(&t) {
                                Ok(v) if v["choices"].is_array() => &tally.ok,
                                _ => &tally.broken_json,
                            },
                        },
                    };
                    outcome.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut kills = 0u64;
    let mut reloads = 0u64;
    let mut next_kill = started + kill_every;
    let mut old_router = None;
    let mut rss = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < deadline {
        tick.tick().await;
        // the rules change every 100 ms (the light threshold moves by one token)
        reloads += 1;
        let edited = rules.replace("at_most: 1024", &format!("at_most: {}", 1000 + reloads % 2));
        // written aside and renamed into place, as editors and ConfigMap updates do (a
        // file read half-written is rejected and the old rules keep serving)
        let tmp = env.rules_path.with_extension("yaml.tmp");
        std::fs::write(&tmp, edited).unwrap();
        std::fs::rename(&tmp, &env.rules_path).unwrap();
        if Instant::now() >= next_kill {
            env.restart_worker(0).unwrap();
            kills += 1;
            next_kill += kill_every;
        }
        let elapsed = started.elapsed().as_secs();
        if old_router.is_none() && elapsed * 2 >= secs {
            old_router = Some(env.upgrade_router().unwrap());
        }
        if old_router.is_some()
            && rss.len() < 2
            && elapsed * 10 >= secs * (6 + 4 * rss.len() as u64)
        {
            rss.push(rss_kib(env.router.child.id()));
        }
    }
    for l in load {
        l.await.unwrap();
    }
    rss.push(rss_kib(env.router.child.id()));
    if let Some(mut old) = old_router {
        assert!(
            old.exited_within(Duration::from_secs(15)).await.is_some(),
            "the upgraded-away router exits once idle"
        );
    }
    let m = env.metrics().await.unwrap();
    let rejected = m.contains(r#"switchyard_router_rules_reloads_total{outcome="rejected"}"#);

    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (ok, visible, broken, broken_json, silent) = (
        get(&tally.ok),
        get(&tally.visible),
        get(&tally.broken_after_commit),
        get(&tally.broken_json),
        get(&tally.silent_cut),
    );
    eprintln!(
        "chaos drill: {secs} s, {clients} clients: {ok} answered, {visible} visible errors, \
         {broken} streams broken after the first byte (and said so), {broken_json} JSON \
         answers cut, {silent} cut silently; \
         {kills} spot kills, {reloads} rules rewrites, 1 upgrade; router RSS KiB {rss:?}"
    );
    assert_eq!(
        visible,
        0,
        "failures before the first byte must be hidden: {:?}",
        tally.samples.lock().unwrap()
    );
    assert_eq!(silent, 0, "no stream may be cut silently");
    assert_eq!(
        broken_json, 0,
        "a JSON answer is failed over until its body comes"
    );
    assert!(!rejected, "every rewrite was a valid file:\n{m}");
    assert!(ok > secs * 10, "{ok} answers in {secs} s");
    assert!(kills + 1 >= secs * 1000 / kill_every.as_millis() as u64);
    // RSS flat over the second half (the new process): no growth with the churn
    let (first, last) = (rss[0], rss[rss.len() - 1]);
    assert!(
        last <= first * 3 / 2 + 20 * 1024,
        "router RSS grew from {first} to {last} KiB"
    );
}
