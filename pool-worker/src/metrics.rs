//! Every metric the worker exports on `/metrics`: names, help texts, types and buckets, all
//! registered here in one prometheus [`Registry`] per engine (not the process-wide default
//! registry, so several engines can live in one test process). The engine updates the
//! fields; `/metrics` answers [`WorkerMetrics::encode`].
//!
//! Names that tests and dashboards read (`integration/tests/e2e.rs` scrapes the gauges and
//! the histograms' `_count` and `_bucket` lines) must not change without them.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};

/// Latency buckets for queueing, prefill and time to first token, seconds.
const LATENCY_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets for the time per generated token, seconds (from a GPU's ~1 ms to a slow CPU's
/// or an injected delay's seconds).
const TOKEN_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The worker's metrics.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    /// `switchyard_worker_queue_depth`: requests waiting for the engine.
    pub queue_depth: IntGauge,
    /// `switchyard_worker_in_flight`: requests being generated.
    pub in_flight: IntGauge,
    /// `switchyard_worker_generated_tokens_total`.
    pub generated_tokens: IntCounter,
    /// `switchyard_worker_batch_size`: sequences in the engine's last batched step.
    pub batch_size: IntGauge,
    /// `switchyard_worker_kv_cache_tokens`: tokens held in the running sequences' caches.
    pub kv_cache_tokens: IntGauge,
    /// `switchyard_worker_ttft_seconds`: queueing to first token (queue wait and prefill).
    pub ttft: Histogram,
    /// `switchyard_worker_queue_wait_seconds`: time waiting for a batch slot.
    pub queue_wait: Histogram,
    /// `switchyard_worker_prefill_seconds`: the engine taking a request to its first token.
    pub prefill: Histogram,
    /// `switchyard_worker_time_per_output_token_seconds`: per finished request, decode
    /// time per token after the first.
    pub time_per_output_token: Histogram,
    /// `switchyard_worker_prefix_cache_hit_tokens_total`: prompt tokens whose keys and
    /// values came from the prefix cache instead of being computed.
    pub prefix_hit_tokens: IntCounter,
    /// `switchyard_worker_prefix_cache_miss_tokens_total`: prompt tokens computed (prefilled).
    pub prefix_miss_tokens: IntCounter,
    /// `switchyard_worker_prefix_cache_bytes`: memory the prefix cache holds.
    pub prefix_cache_bytes: IntGauge,
    /// `switchyard_worker_prefix_cache_blocks`: token blocks the prefix cache holds.
    pub prefix_cache_blocks: IntGauge,
}

impl WorkerMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram =
            |name: &str, help: &str, buckets: &[f64]| -> prometheus::Result<Histogram> {
                let h =
                    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let generated_tokens = IntCounter::new(
            "switchyard_worker_generated_tokens_total",
            "Tokens generated, counted as each is sampled (abandoned answers included).",
        )?;
        registry.register(Box::new(generated_tokens.clone()))?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            prefix_hit_tokens: counter(
                "switchyard_worker_prefix_cache_hit_tokens_total",
                "Prompt tokens whose keys and values were reused from the prefix cache.",
            )?,
            prefix_miss_tokens: counter(
                "switchyard_worker_prefix_cache_miss_tokens_total",
                "Prompt tokens computed (prefilled): not in the prefix cache.",
            )?,
            prefix_cache_bytes: gauge(
                "switchyard_worker_prefix_cache_bytes",
                "Memory held by the prefix cache's keys and values.",
            )?,
            prefix_cache_blocks: gauge(
                "switchyard_worker_prefix_cache_blocks",
                "Token blocks held by the prefix cache.",
            )?,
            queue_depth: gauge(
                "switchyard_worker_queue_depth",
                "Requests waiting for the engine.",
            )?,
            in_flight: gauge("switchyard_worker_in_flight", "Requests being generated.")?,
            generated_tokens,
            batch_size: gauge(
                "switchyard_worker_batch_size",
                "Sequences in the engine's last batched step.",
            )?,
            kv_cache_tokens: gauge(
                "switchyard_worker_kv_cache_tokens",
                "Tokens held in the running sequences' KV caches.",
            )?,
            ttft: histogram(
                "switchyard_worker_ttft_seconds",
                "Time from queueing a request to its first token (queue wait and prefill).",
                &LATENCY_BUCKETS,
            )?,
            queue_wait: histogram(
                "switchyard_worker_queue_wait_seconds",
                "Time a request waited for a batch slot.",
                &LATENCY_BUCKETS,
            )?,
            prefill: histogram(
                "switchyard_worker_prefill_seconds",
                "Time from the engine taking a request to its first token (prefill).",
                &LATENCY_BUCKETS,
            )?,
            time_per_output_token: histogram(
                "switchyard_worker_time_per_output_token_seconds",
                "Per finished request: decode time per generated token after the first.",
                &TOKEN_BUCKETS,
            )?,
            registry,
        })
    }

    /// Every metric in Prometheus' text format (version 0.0.4).
    pub fn encode(&self) -> prometheus::Result<Vec<u8>> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::WorkerMetrics;

    /// The text has every metric with its HELP and TYPE lines, in the shapes scrapers and
    /// the end-to-end tests read.
    #[test]
    fn every_metric_is_exported_as_prometheus_text() {
        let m = WorkerMetrics::new().unwrap();
        m.in_flight.inc();
        m.generated_tokens.inc_by(7);
        m.queue_wait.observe(0.2);
        let text = String::from_utf8(m.encode().unwrap()).unwrap();
        for (name, kind) in [
            ("switchyard_worker_queue_depth", "gauge"),
            ("switchyard_worker_in_flight", "gauge"),
            ("switchyard_worker_generated_tokens_total", "counter"),
            ("switchyard_worker_batch_size", "gauge"),
            ("switchyard_worker_kv_cache_tokens", "gauge"),
            ("switchyard_worker_prefix_cache_hit_tokens_total", "counter"),
            (
                "switchyard_worker_prefix_cache_miss_tokens_total",
                "counter",
            ),
            ("switchyard_worker_prefix_cache_bytes", "gauge"),
            ("switchyard_worker_prefix_cache_blocks", "gauge"),
            ("switchyard_worker_ttft_seconds", "histogram"),
            ("switchyard_worker_queue_wait_seconds", "histogram"),
            ("switchyard_worker_prefill_seconds", "histogram"),
            (
                "switchyard_worker_time_per_output_token_seconds",
                "histogram",
            ),
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} in {text}"
            );
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} in {text}"
            );
        }
        assert!(text.contains("\nswitchyard_worker_in_flight 1\n"), "{text}");
        assert!(text.contains("\nswitchyard_worker_generated_tokens_total 7\n"));
        assert!(text.contains("\nswitchyard_worker_queue_wait_seconds_bucket{le=\"0.25\"} 1\n"));
        assert!(text.contains("\nswitchyard_worker_queue_wait_seconds_count 1\n"));
    }
}
