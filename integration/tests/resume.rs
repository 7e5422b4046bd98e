//! Mid-stream resume (#21): a stream whose worker dies after the first token continues on
//! another worker, in the same client stream, with no duplicate or missing text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use integration::{Running, TestEnv, WorkerSpec, eventually};
use serde_json::{Value, json};

const RULES: &str = r#"
version: 1
models:
  tiny:
    tokenizer: { gguf: "{TINY}" }
    context_window: 2048
pools:
  l40s-spot:     { class: l40s, capacity: spot,      cost_per_hour: 0.80 }
  l40s-ondemand: { class: l40s, capacity: on_demand, cost_per_hour: 1.86 }
rules:
  - name: all
    route: [l40s-spot, l40s-ondemand]
"#;

/// What a client read from a stream: each frame's data, in order.
struct Read {
    frames: Vec<String>,
}

impl Read {
    fn json(&self) -> Vec<Value> {
        self.frames
            .iter()
            .filter(|f| *f != "[DONE]")
            .map(|f| serde_json::from_str(f).unwrap_or_else(|e| panic!("{e}: {f}")))
            .collect()
    }
    fn text(&self) -> String {
        self.json()
            .iter()
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }
    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .json()
            .iter()
            .filter_map(|v| v["id"].as_str().map(str::to_string))
            .collect();
        ids.dedup();
        ids
    }
    fn errors(&self) -> Vec<Value> {
        self.json()
            .into_iter()
            .filter(|v| v.get("error").is_some())
            .collect()
    }
    fn finish_reason(&self) -> Option<String> {
        self.json().iter().find_map(|v| {
            v["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string)
        })
    }
    fn usage(&self) -> Option<Value> {
        self.json()
            .into_iter()
            .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
    }
    fn done(&self) -> bool {
        self.frames.last().map(String::as_str) == Some("[DONE]")
    }
}

/// Streams `body`, calling `at_frame` with the number of content frames read so far after
/// each one (to kill a worker mid-answer).
async fn stream(env: &Running, body: &Value, mut at_frame: impl FnMut(usize)) -> Read {
    let r = env.chat(body).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut bytes = r.bytes_stream();
    let mut buf = String::new();
    let mut frames = Vec::new();
    let mut content = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(chunk) = tokio::time::timeout_at(deadline, bytes.next())
        .await
        .expect("the stream does not hang")
    {
        buf.push_str(std::str::from_utf8(&chunk.expect("the stream is not cut")).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let data = frame.trim_end().strip_prefix("data: ").unwrap_or_else(|| {
                panic!("a frame with data only, whole: {frame:?}");
            });
            if data.contains("\"content\":\"") && !data.contains("\"content\":\"\"") {
                content += 1;
                at_frame(content);
            }
            frames.push(data.to_string());
        }
    }
    assert!(buf.is_empty(), "no half frame at the end: {buf:?}");
    Read { frames }
}

fn body(max_tokens: u32) -> Value {
    json!({
        "model": "tiny",
        // (the tiny random model's greedy answer to this is long; to others it may end at once)
        "messages": [{ "role": "user", "content": "Say hi." }],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": { "include_usage": true },
    })
}

/// The real worker on SmolLM2, greedy, SIGKILLed mid-answer: the client's stream goes on
/// from the on-demand worker, and its whole text, finish and usage are the uninterrupted
/// answer's. (The tiny random model cannot show this: its answers are not valid UTF-8,
/// so no text of them can be handed to another worker intact.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_is_resumed_and_the_client_gets_the_uninterrupted_answer() {
    let Some(model) = model_meta::workspace_smollm2() else {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch-model.sh)");
        return;
    };
    let rules = RULES
        .replace(
            "tiny:\n    tokenizer: { gguf: \"{TINY}\" }",
            &format!(
                "smollm2:\n    tokenizer: {{ gguf: \"{}\" }}",
                model.display()
            ),
        )
        .replace("context_window: 2048", "context_window: 8192");
    let env = TestEnv::new()
        .rules(&rules)
        .worker(
            WorkerSpec::new("l40s-spot")
                .faulty()
                .model(model.clone(), "smollm2"),
        )
        .worker(WorkerSpec::new("l40s-ondemand").model(model, "smollm2"))
        .start()
        .await
        .unwrap();
    let mut ask = body(60);
    ask["model"] = json!("smollm2");
    ask["messages"][0]["content"] =
        json!("Explain in a few sentences how a router picks a GPU pool.");
    let reference = stream(&env, &ask, |_| {}).await;
    assert!(reference.done() && reference.errors().is_empty());
    let whole = reference.text();
    assert!(whole.len() > 100, "a long enough answer to cut: {whole:?}");

    // the spot worker slowed so that the kill lands mid-answer
    env.faults(0, json!({ "token_delay_ms": 60 }))
        .await
        .unwrap();
    let pid = env.workers[0].proc.child.id();
    let resumed = stream(&env, &ask, |n| {
        if n == 12 {
            // SIGKILL: a spot preemption without notice
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    })
    .await;
    assert!(
        resumed.errors().is_empty(),
        "no error event: {:?}",
        resumed.frames
    );
    assert!(
        resumed.done(),
        "the stream ends properly: {:?}",
        resumed.frames
    );
    assert_eq!(
        resumed.text(),
        whole,
        "the same text, none repeated or lost"
    );
    assert_eq!(resumed.finish_reason(), reference.finish_reason());
    assert_eq!(resumed.ids().len(), 1, "one stream id: {:?}", resumed.ids());
    let (u, r) = (resumed.usage().unwrap(), reference.usage().unwrap());
    assert_eq!(u["completion_tokens"], r["completion_tokens"], "{u} vs {r}");
    assert_eq!(u["prompt_tokens"], r["prompt_tokens"], "{u} vs {r}");
    let roles = resumed
        .json()
        .iter()
        .filter(|v| v["choices"][0]["delta"].get("role").is_some())
        .count();
    assert_eq!(roles, 1, "one role opener");

    let m = env
        .metrics_until(|m| m.contains("switchyard_router_stream_resumes_total"))
        .await
        .unwrap();
    assert!(
        m.contains(
            r#"switchyard_router_stream_resumes_total{outcome="resumed",pool="l40s-ondemand"} 1"#
        ),
        "{m}"
    );
    let log = env.log("router.log");
    let line = log
        .lines()
        .filter(|l| l.contains("\"message\":\"request\""))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["resumed"] == 1)
        .unwrap_or_else(|| panic!("an access line with resumed=1: {log}"));
    assert_eq!(line["pool"], "l40s-ondemand", "{line}");
    assert_eq!(line["status"], 200, "{line}");
}

/// `retry.resume: false` keeps the old contract (an error event), and a worker that cuts its
/// streams after a few tokens has every one of them resumed by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_can_be_turned_off_per_rule() {
    let env = TestEnv::new()
        .rules(&RULES.replace(
            "route: [l40s-spot, l40s-ondemand]",
            "route: [l40s-spot, l40s-ondemand]\n    retry: { resume: false }",
        ))
        .worker(WorkerSpec::new("l40s-spot").faulty())
        .worker(WorkerSpec::new("l40s-ondemand"))
        .start()
        .await
        .unwrap();
    env.faults(0, json!({ "drop_after_tokens": 3 }))
        .await
        .unwrap();
    let cut = stream(&env, &body(32), |_| {}).await;
    let errors = cut.errors();
    assert_eq!(errors.len(), 1, "{:?}", cut.frames);
    assert_eq!(errors[0]["error"]["code"], "upstream_disconnected");
    assert!(!cut.done());

    // the same fleet with resume on (the default): whole answers
    std::fs::write(
        &env.rules_path,
        RULES.replace("{TINY}", &env.tiny_model.display().to_string()),
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the rules to reload", || async {
        let m = env.metrics().await.ok()?;
        m.contains(r#"switchyard_router_rules_reloads_total{outcome="applied"} 1"#)
            .then_some(())
    })
    .await
    .unwrap();
    env.faults(0, json!({ "drop_after_tokens": 3 }))
        .await
        .unwrap();
    let whole = stream(&env, &body(32), |_| {}).await;
    assert!(
        whole.errors().is_empty() && whole.done(),
        "{:?}",
        whole.frames
    );
}

/// A stream resumed twice (both spot workers cut it after three frames; the on-demand one
/// finishes it): every continuation starts from the request as the client sent it, with
/// all the text it has, so nothing is repeated or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumed_twice_is_still_whole() {
    let env = TestEnv::new()
        .rules(RULES)
        .worker(sim("l40s-spot").faulty())
        .worker(sim("l40s-spot").faulty())
        .worker(sim("l40s-ondemand"))
        .start()
        .await
        .unwrap();
    for i in 0..2 {
        env.faults(i, json!({ "drop_after_tokens": 3 }))
            .await
            .unwrap();
    }
    let r = env.chat(&body(300)).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    check_sim_stream(&text).unwrap();
    let m = env.metrics().await.unwrap();
    assert!(
        m.contains(
            r#"switchyard_router_stream_resumes_total{outcome="resumed",pool="l40s-spot"} 1"#
        ) && m.contains(
            r#"switchyard_router_stream_resumes_total{outcome="resumed",pool="l40s-ondemand"} 1"#
        ),
        "{m}"
    );
}

/// The sim backend's filler, word after word.
const WORDS: [&str; 8] = [
    "simulated ",
    "tokens ",
    "from ",
    "the ",
    "sim ",
    "backend ",
    "of ",
    "switchyard. ",
];

fn is_filler_from_the_start(text: &str) -> bool {
    let mut rest = text;
    let mut i = 0;
    while !rest.is_empty() {
        match rest.strip_prefix(WORDS[i % WORDS.len()]) {
            Some(r) => rest = r,
            None => return false,
        }
        i += 1;
    }
    true
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sim(pool: &str) -> WorkerSpec {
    [
        "--backend",
        "sim",
        "--sim-ttft-ms",
        "20",
        "--sim-tokens-per-s",
        "1000",
    ]
    .iter()
    .fold(WorkerSpec::new(pool), |w, a| w.arg(a))
}

/// Load on the spot pool while its worker is SIGKILLed again and again (each time replaced
/// by a new one, as a spot pool does): every stream ends whole, its text the filler's words
/// in order from the first, one id, no error event. `SWITCHYARD_RESUME_KILLS` (default 20;
/// `scripts/resume-drill.sh` runs 100) kills, every `SWITCHYARD_RESUME_KILL_MS` (700).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_survive_a_preemption_wave_whole() {
    let kills = env_u64("SWITCHYARD_RESUME_KILLS", 20);
    let every = Duration::from_millis(env_u64("SWITCHYARD_RESUME_KILL_MS", 700));
    let clients = env_u64("SWITCHYARD_RESUME_CLIENTS", 8);
    let mut env = TestEnv::new()
        .rules(RULES)
        .worker(sim("l40s-spot"))
        .worker(sim("l40s-ondemand"))
        .start()
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (whole, broken) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url) = (
                env.http.clone(),
                format!("{}/v1/chat/completions", env.proxy),
            );
            let (stop, whole, broken, samples) = (
                Arc::clone(&stop),
                Arc::clone(&whole),
                Arc::clone(&broken),
                Arc::clone(&samples),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let verdict = match http.post(&url).json(&body(1000)).send().await {
                        Ok(r) if r.status() == 200 => match r.text().await {
                            Ok(t) => check_sim_stream(&t),
                            Err(e) => Err(format!("cut: {e}")),
                        },
                        Ok(r) => Err(format!("status {}", r.status())),
                        Err(e) => Err(format!("{e}")),
                    };
                    match verdict {
                        Ok(()) => whole.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            samples.lock().unwrap().push(e);
                            broken.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    let started = Instant::now();
    for n in 1..=kills {
        tokio::time::sleep(every).await;
        env.replace_worker(0, n as usize).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let m = env.metrics().await.unwrap();
    let resumed: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("switchyard_router_stream_resumes_total")
                && l.contains(r#"outcome="resumed""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let (whole, broken) = (
        whole.load(Ordering::Relaxed),
        broken.load(Ordering::Relaxed),
    );
    eprintln!(
        "resume drill: {kills} kills in {:.1} s, {clients} clients: {whole} streams whole, \
         {broken} broken, {resumed} resumed mid-answer",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(broken, 0, "{:?}", samples.lock().unwrap());
    // each kill lands in the middle of the streams the spot worker was serving
    assert!(
        resumed >= kills as f64,
        "streams resumed mid-answer: {resumed} after {kills} kills"
    );
}

fn check_sim_stream(t: &str) -> Result<(), String> {
    let frames: Vec<&str> = t
        .split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| f.strip_prefix("data: ").unwrap_or(f))
        .collect();
    if frames.last() != Some(&"[DONE]") {
        return Err(format!("no [DONE]: {t}"));
    }
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut finished = false;
    for f in &frames[..frames.len() - 1] {
        let v: Value = serde_json::from_str(f).map_err(|e| format!("{e}: {f}"))?;
        if v.get("error").is_some() {
            return Err(format!("an error event: {f}"));
        }
        if let Some(id) = v["id"].as_str()
            && ids.last().map(String::as_str) != Some(id)
        {
            ids.push(id.to_string());
        }
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        finished |= v["choices"][0]["finish_reason"].is_string();
    }
    if ids.len() != 1 || !finished {
        return Err(format!("ids {ids:?}, finished {finished}: {t}"));
    }
    if !is_filler_from_the_start(&text) {
        return Err(format!("text repeated or lost: {text:?}"));
    }
    Ok(())
}
