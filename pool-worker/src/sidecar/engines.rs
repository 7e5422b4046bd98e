//! What a sidecar knows about each external engine: where its health and metrics are, how
//! its `/metrics` names load, and how it reports its models' context length.
//!
//! Metric names, checked against samples of each engine's real `/metrics` output in
//! `pool-worker/tests/data/engine-metrics/` (sources in its README):
//!
//! | engine | running | waiting | KV cache in use | generated tokens |
//! | --- | --- | --- | --- | --- |
//! | vLLM | `vllm:num_requests_running` | `vllm:num_requests_waiting` | `vllm:kv_cache_usage_perc` (V1), `vllm:gpu_cache_usage_perc` (V0) — fractions despite the name | `vllm:generation_tokens_total` |
//! | sglang | `sglang:num_running_reqs` | `sglang:num_queue_reqs` | `sglang:token_usage` | `sglang:gen_throughput` (tok/s) |
//! | TGI | `tgi_batch_current_size` | `tgi_queue_size` | — | — |
//! | llama.cpp server | `llamacpp:requests_processing` | `llamacpp:requests_deferred` | `llamacpp:kv_cache_usage_ratio` (older builds) | `llamacpp:tokens_predicted_total` |
//!
//! The prefix cache's hit rate, where the engine reports one: vLLM V1's
//! `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` (tokens, since start;
//! the `gpu_`-prefixed names of earlier V1 releases too), vLLM V0's
//! `vllm:gpu_prefix_cache_hit_rate` and sglang's `sglang:cache_hit_rate` (gauges).
//!
//! Every series of a name is summed (vLLM labels each model; a data-parallel engine may
//! export one series per rank), but the KV-cache fraction, where the fullest rank's counts.

use std::time::Instant;

/// An external engine the sidecar registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    Vllm,
    Sglang,
    Tgi,
    Llamacpp,
    /// Any OpenAI-compatible server: health is `/v1/models` answering, no load is known.
    Openai,
}

/// The metric names of one engine (see the module table).
struct Names {
    running: &'static [&'static str],
    waiting: &'static [&'static str],
    kv_cache: &'static [&'static str],
    /// A counter of generated tokens (a rate is taken between two scrapes).
    tokens_total: &'static [&'static str],
    /// A gauge of generated tokens per second.
    tokens_per_second: &'static [&'static str],
    /// Counters of prompt tokens found in the prefix cache, and of those looked up.
    prefix_hits: &'static [&'static str],
    prefix_queries: &'static [&'static str],
    /// A gauge of the prefix cache's hit rate, 0..1.
    prefix_hit_rate: &'static [&'static str],
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::Tgi => "tgi",
            Self::Llamacpp => "llamacpp",
            Self::Openai => "openai",
        }
    }

    /// The path that answers 200 once the engine serves (llama.cpp answers 503 while its
    /// model loads; vLLM, sglang and TGI answer 200 when ready).
    pub fn health_path(self) -> &'static str {
        match self {
            Self::Openai => "/v1/models",
            _ => "/health",
        }
    }

    /// Where the engine's Prometheus metrics are (llama.cpp needs `--metrics`, sglang
    /// `--enable-metrics`).
    pub fn metrics_path(self) -> Option<&'static str> {
        match self {
            Self::Openai => None,
            _ => Some("/metrics"),
        }
    }

    fn names(self) -> Names {
        match self {
            Self::Vllm => Names {
                running: &["vllm:num_requests_running"],
                waiting: &["vllm:num_requests_waiting"],
                kv_cache: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
                tokens_total: &["vllm:generation_tokens_total"],
                tokens_per_second: &[],
                prefix_hits: &[
                    "vllm:prefix_cache_hits_total",
                    "vllm:gpu_prefix_cache_hits_total",
                ],
                prefix_queries: &[
                    "vllm:prefix_cache_queries_total",
                    "vllm:gpu_prefix_cache_queries_total",
                ],
                prefix_hit_rate: &["vllm:gpu_prefix_cache_hit_rate"],
            },
            Self::Sglang => Names {
                running: &["sglang:num_running_reqs"],
                waiting: &["sglang:num_queue_reqs"],
                kv_cache: &["sglang:token_usage"],
                tokens_total: &[],
                tokens_per_second: &["sglang:gen_throughput"],
                prefix_hits: &[],
                prefix_queries: &[],
                prefix_hit_rate: &["sglang:cache_hit_rate"],
            },
            Self::Tgi => Names {
                running: &["tgi_batch_current_size"],
                waiting: &["tgi_queue_size"],
                kv_cache: &[],
                tokens_total: &[],
                tokens_per_second: &[],
                prefix_hits: &[],
                prefix_queries: &[],
                prefix_hit_rate: &[],
            },
            Self::Llamacpp => Names {
                running: &["llamacpp:requests_processing"],
                waiting: &["llamacpp:requests_deferred"],
                kv_cache: &["llamacpp:kv_cache_usage_ratio"],
                tokens_total: &["llamacpp:tokens_predicted_total"],
                tokens_per_second: &[],
                prefix_hits: &[],
                prefix_queries: &[],
                prefix_hit_rate: &[],
            },
            Self::Openai => Names {
                running: &[],
                waiting: &[],
                kv_cache: &[],
                tokens_total: &[],
                tokens_per_second: &[],
                prefix_hits: &[],
                prefix_queries: &[],
                prefix_hit_rate: &[],
            },
        }
    }

    /// Reads one scrape of the engine's `/metrics`. A scrape without the engine's
    /// running-requests metric is an error: the endpoint is not this engine's (or its
    /// metrics are off), and a load of 0 read from it would be a lie.
    pub fn parse_metrics(self, text: &str) -> Result<Scrape, String> {
        let samples: Vec<(&str, f64)> = text.lines().filter_map(sample).collect();
        let names = self.names();
        // the sum of every series of the first of `names` present
        let sum = |names: &[&str]| -> Option<f64> {
            names.iter().find_map(|n| {
                let mut found = false;
                let mut total = 0.0;
                for (_, v) in samples.iter().filter(|(m, _)| m == n) {
                    found = true;
                    total += v;
                }
                found.then_some(total)
            })
        };
        let running = sum(names.running).ok_or_else(|| {
            format!(
                "no {} in the scrape: is this a {} server with its metrics on?",
                names.running.join(" or "),
                self.name()
            )
        })?;
        // a fraction: the fullest of several ranks' caches, not their sum
        let max = |names: &[&str]| -> Option<f64> {
            names.iter().find_map(|n| {
                samples
                    .iter()
                    .filter(|(m, _)| m == n)
                    .map(|(_, v)| *v)
                    .reduce(f64::max)
            })
        };
        // hits over lookups where the engine counts both, else its own gauge (of several
        // ranks', the lowest: the rate that explains the slowest rank)
        let counted = match (sum(names.prefix_hits), sum(names.prefix_queries)) {
            (Some(hits), Some(queries)) if queries > 0.0 => Some(hits / queries),
            _ => None,
        };
        let prefix_hit_rate = counted
            .or_else(|| {
                names.prefix_hit_rate.iter().find_map(|n| {
                    samples
                        .iter()
                        .filter(|(m, _)| m == n)
                        .map(|(_, v)| *v)
                        .reduce(f64::min)
                })
            })
            .map(|r| r.clamp(0.0, 1.0));
        Ok(Scrape {
            running,
            waiting: sum(names.waiting).unwrap_or(0.0),
            kv_cache_usage: max(names.kv_cache),
            tokens_total: sum(names.tokens_total),
            tokens_per_second: sum(names.tokens_per_second),
            prefix_hit_rate,
        })
    }
}

/// One sample line of the Prometheus text format — `name{labels} value [timestamp]` —
/// as its metric name and value; `None` for comments, blank and malformed lines.
///
/// Hand-written because the crate made for this, `prometheus-parse` 0.2.5, reads metric
/// names as `\w+` and so skips every name with a colon: all of vLLM's, sglang's and
/// llama.cpp's (`vllm:num_requests_running`), which the format allows
/// (`[a-zA-Z_:][a-zA-Z0-9_:]*`). Labels are skipped, quoted values with `}` or escapes
/// included: every series of a name is summed.
fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if let Some(labels) = rest.strip_prefix('{') {
        // to the closing brace outside any quoted value
        let mut quoted = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in labels.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &labels[close? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    value.is_finite().then_some((name, value))
}

/// What one scrape of an engine's metrics says.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scrape {
    pub running: f64,
    pub waiting: f64,
    pub kv_cache_usage: Option<f64>,
    pub tokens_total: Option<f64>,
    pub tokens_per_second: Option<f64>,
    /// Prompt tokens found in the prefix cache, as a fraction of those looked up.
    pub prefix_hit_rate: Option<f64>,
}

/// Generated tokens per second from successive scrapes: the engine's own gauge where it
/// has one, else the rate of its token counter.
#[derive(Debug, Default)]
pub struct Rate {
    last: Option<(Instant, f64)>,
}

impl Rate {
    pub fn update(&mut self, now: Instant, s: &Scrape) -> f64 {
        if let Some(tps) = s.tokens_per_second {
            return tps.max(0.0);
        }
        let Some(total) = s.tokens_total else {
            return 0.0;
        };
        let rate = match self.last {
            Some((t, before)) if total >= before => {
                let dt = now.duration_since(t).as_secs_f64();
                if dt > 0.0 { (total - before) / dt } else { 0.0 }
            }
            _ => 0.0, // the first scrape, or the engine restarted (its counter reset)
        };
        self.last = Some((now, total));
        rate
    }
}

/// A model an engine serves, as found in its API.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub id: String,
    pub max_context: Option<u32>,
}

/// The models in an OpenAI `/v1/models` answer, with the context length where the engine
/// says it: vLLM and sglang `max_model_len`; llama.cpp `meta.n_ctx` (a slot's context, what
/// one request may use), else `meta.n_ctx_train`.
pub fn models_from_list(v: &serde_json::Value) -> Result<Vec<Found>, String> {
    let data = v
        .get("data")
        .and_then(|d| d.as_array())
        .ok_or("no `data` list in /v1/models")?;
    let mut out = Vec::new();
    for m in data {
        let Some(id) = m.get("id").and_then(|i| i.as_str()) else {
            continue;
        };
        let ctx = ["max_model_len", "context_length", "max_context_length"]
            .iter()
            .find_map(|k| m.get(*k).and_then(serde_json::Value::as_u64))
            .or_else(|| m.pointer("/meta/n_ctx").and_then(|v| v.as_u64()))
            .or_else(|| m.pointer("/meta/n_ctx_train").and_then(|v| v.as_u64()));
        out.push(Found {
            id: id.to_string(),
            max_context: ctx.and_then(|c| u32::try_from(c).ok()),
        });
    }
    if out.is_empty() {
        return Err("/v1/models lists no model".into());
    }
    Ok(out)
}

/// The context window an engine runs with, from its own info endpoint where that is more
/// exact than `/v1/models`: llama.cpp `/props` (`default_generation_settings.n_ctx`, one
/// slot's context: the server splits `--ctx-size` between `--parallel` slots), TGI `/info`
/// (`max_total_tokens`).
pub fn info_path(kind: EngineKind) -> Option<&'static str> {
    match kind {
        EngineKind::Llamacpp => Some("/props"),
        EngineKind::Tgi => Some("/info"),
        _ => None,
    }
}

/// The context window and the requests run at once, from an [`info_path`] answer.
pub fn context_from_info(kind: EngineKind, v: &serde_json::Value) -> (Option<u32>, Option<u32>) {
    let u = |p: &str| v.pointer(p).and_then(serde_json::Value::as_u64);
    let to32 = |x: u64| u32::try_from(x).ok();
    match kind {
        EngineKind::Llamacpp => (
            u("/default_generation_settings/n_ctx").and_then(to32),
            u("/total_slots").and_then(to32),
        ),
        EngineKind::Tgi => (
            u("/max_total_tokens").and_then(to32),
            u("/max_concurrent_requests").and_then(to32),
        ),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_lists_give_ids_and_windows() {
        let v = serde_json::json!({"object":"list","data":[
            {"id":"meta-llama/Llama-3.1-8B-Instruct","object":"model","max_model_len":131072},
            {"id":"smollm2","object":"model","meta":{"n_ctx":2048,"n_ctx_train":8192}},
            {"id":"other","object":"model","meta":{"n_ctx_train":8192}},
            {"id":"plain","object":"model"},
            {"object":"model"}
        ]});
        let found = models_from_list(&v).unwrap();
        assert_eq!(
            found,
            [
                Found {
                    id: "meta-llama/Llama-3.1-8B-Instruct".into(),
                    max_context: Some(131072)
                },
                Found {
                    id: "smollm2".into(),
                    max_context: Some(2048)
                },
                Found {
                    id: "other".into(),
                    max_context: Some(8192)
                },
                Found {
                    id: "plain".into(),
                    max_context: None
                },
            ]
        );
        assert!(models_from_list(&serde_json::json!({"data": []})).is_err());
        assert!(models_from_list(&serde_json::json!({"error": "x"})).is_err());
    }

    #[test]
    fn a_token_counter_becomes_a_rate_and_a_reset_is_not_negative() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + std::time::Duration::from_secs_f64(s);
        let s = |total: f64| Scrape {
            tokens_total: Some(total),
            ..Default::default()
        };
        let mut r = Rate::default();
        assert_eq!(r.update(at(0.0), &s(1000.0)), 0.0);
        assert_eq!(r.update(at(2.0), &s(1500.0)), 250.0);
        assert_eq!(r.update(at(3.0), &s(10.0)), 0.0); // restarted engine
        assert_eq!(r.update(at(4.0), &s(60.0)), 50.0);
        let gauge = Scrape {
            tokens_per_second: Some(42.0),
            tokens_total: Some(1.0),
            ..Default::default()
        };
        assert_eq!(r.update(at(5.0), &gauge), 42.0);
    }

    /// Real `/metrics` output of each engine (sources and chosen values in
    /// `pool-worker/tests/data/engine-metrics/README.md`): every sample is read as the
    /// engine's load, with the lines around it (histograms, `_created` series, process
    /// metrics, another exporter's number formats) skipped.
    #[test]
    fn each_engines_real_metrics_read_as_its_load() {
        let sample = |f: &str| {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/engine-metrics")
                .join(f);
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        let read = |kind: EngineKind, f: &str| {
            kind.parse_metrics(&sample(f))
                .unwrap_or_else(|e| panic!("{f}: {e}"))
        };
        let expect = |s: Scrape, running: f64, waiting: f64, kv: Option<f64>| {
            assert_eq!(
                (s.running, s.waiting, s.kv_cache_usage),
                (running, waiting, kv),
                "{s:?}"
            );
        };
        // vLLM V1 (both KV gauges present: the V1 name is read) and V0
        let v1 = read(EngineKind::Vllm, "vllm.prom");
        expect(v1, 3.0, 5.0, Some(0.42));
        assert_eq!(v1.tokens_total, Some(27453.0));
        // 40960 of 81920 prompt tokens found in the prefix cache
        assert_eq!(v1.prefix_hit_rate, Some(0.5));
        let v0 = read(EngineKind::Vllm, "vllm-v0.prom");
        expect(v0, 3.0, 5.0, Some(0.42));
        assert_eq!(v0.tokens_total, Some(27453.0));
        assert_eq!(
            v0.prefix_hit_rate, None,
            "V0's sample has no prefix cache gauge"
        );
        // sglang's documented example
        let sg = read(EngineKind::Sglang, "sglang.prom");
        expect(sg, 162.0, 2826.0, Some(0.28));
        assert!(
            (sg.prefix_hit_rate.unwrap() - 0.0075).abs() < 1e-4,
            "{sg:?}"
        );
        assert!(
            (sg.tokens_per_second.unwrap() - 86.508).abs() < 0.001,
            "{sg:?}"
        );
        // TGI: no KV gauge, no token counter
        let tgi = read(EngineKind::Tgi, "tgi.prom");
        expect(tgi, 3.0, 5.0, None);
        assert_eq!(tgi.prefix_hit_rate, None);
        assert_eq!((tgi.tokens_total, tgi.tokens_per_second), (None, None));
        // llama.cpp before and after its KV gauge was removed
        let l = read(EngineKind::Llamacpp, "llamacpp.prom");
        expect(l, 3.0, 5.0, Some(0.420044));
        assert_eq!(l.tokens_total, Some(98765.0));
        expect(
            read(EngineKind::Llamacpp, "llamacpp-no-kv.prom"),
            3.0,
            5.0,
            None,
        );
        // one engine's metrics are not another's
        assert!(EngineKind::Tgi.parse_metrics(&sample("vllm.prom")).is_err());
        assert!(
            EngineKind::Vllm
                .parse_metrics(&sample("llamacpp.prom"))
                .is_err()
        );
    }

    #[test]
    fn sample_lines_are_read_with_any_labels() {
        assert_eq!(
            sample("llamacpp:requests_processing 3"),
            Some(("llamacpp:requests_processing", 3.0))
        );
        assert_eq!(
            sample(r#"vllm:x{engine="0",model_name="a}b \"c\""} 4.5 1700000000000"#),
            Some(("vllm:x", 4.5))
        );
        assert_eq!(sample("tgi_queue_size 5"), Some(("tgi_queue_size", 5.0)));
        assert_eq!(
            sample("counter_total 1.23457e+06"),
            Some(("counter_total", 1234570.0))
        );
        assert_eq!(sample("# TYPE x gauge"), None);
        assert_eq!(sample("x{a=\"unclosed} 1"), None);
        assert_eq!(sample("x NaN"), None);
        assert_eq!(sample("x"), None);
        assert_eq!(sample("9x 1"), None);
    }

    #[test]
    fn series_of_one_name_are_summed() {
        // a data-parallel sglang exports one series per rank
        let text = "# TYPE sglang:num_running_reqs gauge\n\
                    sglang:num_running_reqs{dp_rank=\"0\",model_name=\"m\"} 2.0\n\
                    sglang:num_running_reqs{dp_rank=\"1\",model_name=\"m\"} 3.0\n";
        assert_eq!(EngineKind::Sglang.parse_metrics(text).unwrap().running, 5.0);
        let kv = "sglang:num_running_reqs 1\nsglang:token_usage{dp_rank=\"0\"} 0.3\nsglang:token_usage{dp_rank=\"1\"} 0.5\n";
        assert_eq!(
            EngineKind::Sglang.parse_metrics(kv).unwrap().kv_cache_usage,
            Some(0.5)
        );
    }

    #[test]
    fn a_scrape_without_the_engines_metrics_is_an_error() {
        let text = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n";
        let e = EngineKind::Vllm.parse_metrics(text).unwrap_err();
        assert!(e.contains("vllm:num_requests_running"), "{e}");
    }
}
