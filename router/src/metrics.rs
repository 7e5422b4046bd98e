//! Every router metric, defined in one place. Names: `switchyard_router_*`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The share of a pool's capacity the autoscaling signal aims for: room for a burst while
/// new workers start.
pub const TARGET_UTILIZATION: f64 = 0.8;

/// Workers that would run `demand` requests at [`TARGET_UTILIZATION`], given `live` workers
/// running `capacity` at once between them; at least 1 (a pool is kept warm).
pub fn desired_workers(demand: u64, capacity: u64, live: u64) -> i64 {
    let per_worker = if live == 0 {
        1.0
    } else {
        (capacity as f64 / live as f64).max(1.0)
    };
    let n = (demand as f64 / (per_worker * TARGET_UTILIZATION)).ceil();
    (n as i64).max(1)
}

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by pool, rule, model and status code.
    pub requests: IntCounterVec,
    /// Retries, by the pool that failed, the pool retried on, and the reason.
    pub retries: IntCounterVec,
    /// Time to the first response byte from a worker, by pool.
    pub ttfb: HistogramVec,
    /// Whole request time, by pool, model and context bucket ([`context_bucket`]).
    pub duration: HistogramVec,
    /// Classification time (parse + token count).
    pub classify: HistogramVec,
    /// `classify`'s two series, resolved once: `[exact="false", exact="true"]`.
    pub classify_by_exactness: [prometheus::Histogram; 2],
    /// Cost attributed to requests, by pool, tenant and model (USD; price per hour × the request's
    /// share of its worker's time, see `registry::ShareClock`).
    pub cost: prometheus::CounterVec,
    /// Rules reloads by outcome (applied, rejected).
    pub reloads: IntCounterVec,
    pub rules_generation: IntGauge,
    /// Registrations accepted, by pool.
    pub registrations: IntCounterVec,
    /// Workers ejected after consecutive failures, by pool.
    pub ejections: IntCounterVec,
    /// Prompt tokens of requests a pool answered (exact or the classifier's lower bound), by
    /// pool and model.
    pub prompt_tokens: IntCounterVec,
    /// Workers by pool and state (`live`, `draining`, `unhealthy`, `ejected`), set at
    /// scrape time.
    pub workers: prometheus::IntGaugeVec,
    /// Time from a request's arrival to its first response byte relayed to the client, by
    /// pool, model and context bucket: the first token of a stream, as the client sees it.
    pub ttft: HistogramVec,
    /// Completion tokens the workers reported in `usage`, by pool and model.
    pub completion_tokens: IntCounterVec,
    /// Request-body bytes held right now against the global budget (set at scrape time).
    pub body_bytes: IntGauge,
    /// Active health checks of static workers that failed, by pool.
    pub health_check_failures: IntCounterVec,
    /// Log lines dropped because the log writer fell behind (brought up to date at scrape
    /// time from [`crate::logging::dropped_lines`]).
    pub log_lines_dropped: prometheus::IntCounter,
    /// Requests refused for their tenant, by tenant (configured names, `other`) and
    /// reason (`invalid_api_key`, `requests_per_minute`, `tokens_per_minute`,
    /// `max_concurrent`).
    pub tenant_rejected: IntCounterVec,
    /// Retries into a pool that the retry budget refused (the request moved on to the next
    /// pool, or failed), by pool.
    pub retry_budget_exhausted: IntCounterVec,
    /// Cache-aware selections, by pool and what decided them: `owner` (the worker last
    /// sent the prompt's start), `owner_busy` (it was over the load bound), `unknown` (no
    /// worker known to hold any of it), `short` (a prompt shorter than a block).
    pub prefix_placements: IntCounterVec,
    /// Streams whose worker failed mid-answer, by pool (the continuation's, when resumed)
    /// and outcome: `resumed`, `complete` (the answer was whole), `limit_reached`, `failed`.
    pub resumes: IntCounterVec,
    /// Attempts raced by a hedge on a later pool after `retry.escalate_after_ms` without a
    /// first token, by the two pools and which one was served (`first`, `escalated`).
    pub escalations: IntCounterVec,
    /// Each tenant's drift: the population stability index of its last window's traffic
    /// against the windows before it, by feature ([`crate::drift`]).
    pub drift_psi: prometheus::GaugeVec,
    /// 1 while a pool is spilled (behind dearer tiers) for a rule's latency objective.
    pub pool_spilling: prometheus::IntGaugeVec,
    /// 1 while the limits store every replica shares (`--limits-redis`) answers, else 0.
    pub limits_store_up: IntGauge,
    /// Limit checks decided by this router's own buckets because the shared store could
    /// not answer.
    pub limits_local_decisions: prometheus::IntCounter,
    /// Per pool, set at scrape time: requests at its workers now (each worker's reported
    /// in-flight + queued, or this router's in-flight to it if more), what its live workers
    /// run at once, and the workers that would keep it at [`TARGET_UTILIZATION`] — the
    /// autoscaling signal (`deploy/k8s`).
    pub pool_demand: prometheus::IntGaugeVec,
    pub pool_capacity: prometheus::IntGaugeVec,
    pub pool_desired_workers: prometheus::IntGaugeVec,
    /// Client connections open now (see [`crate::conn`]).
    pub connections_open: IntGauge,
    /// Client connections refused or cut off by [`crate::conn`], by reason
    /// (`max_connections`, `header_timeout`).
    pub connections_refused: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ];
        let requests = IntCounterVec::new(
            Opts::new(
                "switchyard_router_requests_total",
                "Requests answered, by pool, rule, model and status.",
            ),
            &["pool", "rule", "model", "status"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "switchyard_router_retries_total",
                "Retries, by failed pool, next pool and reason.",
            ),
            &["from_pool", "to_pool", "reason"],
        )?;
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_router_upstream_ttfb_seconds",
                "Time to the worker's response header, by pool.",
            )
            .buckets(latency.clone()),
            &["pool"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_router_request_duration_seconds",
                "Whole request time, by pool, model and context (prompt tokens: 0-1k, 1k-4k, 4k-16k, 16k-64k, 64k+).",
            )
            .buckets(latency),
            &["pool", "model", "context"],
        )?;
        let classify = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_router_classify_seconds",
                "Parse and token-count time, by whether the count was exact.",
            )
            .buckets(vec![
                0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5,
            ]),
            &["exact"],
        )?;
        let cost = prometheus::CounterVec::new(
            Opts::new(
                "switchyard_router_cost_usd_total",
                "Pool cost attributed to requests (price per hour × the request's share of its worker's time), by pool, tenant and model.",
            ),
            &["pool", "tenant", "model"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "switchyard_router_rules_reloads_total",
                "Rules reloads, by outcome.",
            ),
            &["outcome"],
        )?;
        let rules_generation = IntGauge::new(
            "switchyard_router_rules_generation",
            "Generation of the live rule set.",
        )?;
        let registrations = IntCounterVec::new(
            Opts::new(
                "switchyard_router_registrations_total",
                "Worker registrations accepted, by pool.",
            ),
            &["pool"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "switchyard_router_ejections_total",
                "Workers ejected from selection after consecutive failures, by pool.",
            ),
            &["pool"],
        )?;
        let prompt_tokens = IntCounterVec::new(
            Opts::new(
                "switchyard_router_prompt_tokens_total",
                "Prompt tokens of answered requests (exact, or the classifier's lower bound), by pool and model.",
            ),
            &["pool", "model"],
        )?;
        let workers = prometheus::IntGaugeVec::new(
            Opts::new(
                "switchyard_router_workers",
                "Workers known to the router, by pool and state (live, draining, ejected).",
            ),
            &["pool", "state"],
        )?;
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_router_ttft_seconds",
                "Time from arrival to the first response byte sent to the client (a stream's first token), by pool, model and context (prompt tokens).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0,
            ]),
            &["pool", "model", "context"],
        )?;
        let completion_tokens = IntCounterVec::new(
            Opts::new(
                "switchyard_router_completion_tokens_total",
                "Completion tokens the workers reported in the answers' usage (streams included: the router asks for usage), by pool and model.",
            ),
            &["pool", "model"],
        )?;
        let body_bytes = IntGauge::new(
            "switchyard_router_buffered_body_bytes",
            "Request-body bytes held now against --max-buffered-bytes.",
        )?;
        let health_check_failures = IntCounterVec::new(
            Opts::new(
                "switchyard_router_health_check_failures_total",
                "Failed active health checks of static workers, by pool.",
            ),
            &["pool"],
        )?;
        let log_lines_dropped = prometheus::IntCounter::new(
            "switchyard_router_log_lines_dropped_total",
            "Log lines (access lines included) dropped because the log writer fell behind.",
        )?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        let tenant_rejected = IntCounterVec::new(
            Opts::new(
                "switchyard_router_tenant_rejections_total",
                "Requests refused for their tenant: a bad key, or over a limit.",
            ),
            &["tenant", "reason"],
        )?;
        registry.register(Box::new(tenant_rejected.clone()))?;
        let retry_budget_exhausted = IntCounterVec::new(
            Opts::new(
                "switchyard_router_retry_budget_exhausted_total",
                "Retries the retry budget refused, by the pool they would have gone to.",
            ),
            &["pool"],
        )?;
        registry.register(Box::new(retry_budget_exhausted.clone()))?;
        let prefix_placements = IntCounterVec::new(
            Opts::new(
                "switchyard_router_prefix_placements_total",
                "Cache-aware selections, by pool and outcome: owner (the worker last sent the prompt's start), owner_busy (it was over the load bound), unknown, short.",
            ),
            &["pool", "outcome"],
        )?;
        registry.register(Box::new(prefix_placements.clone()))?;
        let resumes = IntCounterVec::new(
            Opts::new(
                "switchyard_router_stream_resumes_total",
                "Streams whose worker failed mid-answer, by pool (the continuation's when resumed) and outcome (resumed, complete, limit_reached, failed).",
            ),
            &["pool", "outcome"],
        )?;
        registry.register(Box::new(resumes.clone()))?;
        let escalations = IntCounterVec::new(
            Opts::new(
                "switchyard_router_escalations_total",
                "Attempts with no first token by the rule's escalate_after_ms, raced by a hedge on a later pool of the route, by the two pools and which was served (first, escalated).",
            ),
            &["from_pool", "to_pool", "served"],
        )?;
        registry.register(Box::new(escalations.clone()))?;
        let drift_psi = prometheus::GaugeVec::new(
            Opts::new(
                "switchyard_router_drift_psi",
                "Population stability index of each tenant's last drift window against the windows before it, by feature (prompt_tokens, max_tokens, modality, model); above 0.25 is a significant shift, 0 when too few requests to say.",
            ),
            &["tenant", "feature"],
        )?;
        registry.register(Box::new(drift_psi.clone()))?;
        let pool_spilling = prometheus::IntGaugeVec::new(
            Opts::new(
                "switchyard_router_pool_spilling",
                "1 while a pool is spilled behind dearer tiers because it misses a rule's latency objective (slo.ttft_p95_ms), else 0.",
            ),
            &["pool"],
        )?;
        registry.register(Box::new(pool_spilling.clone()))?;
        let limits_store_up = IntGauge::new(
            "switchyard_router_limits_store_up",
            "1 while the shared limits store (--limits-redis) answers, else 0 (limits are then this router's own).",
        )?;
        let limits_local_decisions = prometheus::IntCounter::new(
            "switchyard_router_limits_local_decisions_total",
            "Tenant limit checks decided by this router's own buckets because the shared store could not answer.",
        )?;
        let pool_gauge =
            |name: &str, help: &str| prometheus::IntGaugeVec::new(Opts::new(name, help), &["pool"]);
        let pool_demand = pool_gauge(
            "switchyard_router_pool_demand",
            "Requests at the pool's workers now (in flight + queued).",
        )?;
        let pool_capacity = pool_gauge(
            "switchyard_router_pool_capacity",
            "Requests the pool's live workers run at once.",
        )?;
        let pool_desired_workers = pool_gauge(
            "switchyard_router_pool_desired_workers",
            "Workers that would run the pool's demand at the target utilization (0.8); at least 1.",
        )?;
        registry.register(Box::new(pool_demand.clone()))?;
        registry.register(Box::new(pool_capacity.clone()))?;
        registry.register(Box::new(pool_desired_workers.clone()))?;
        let connections_open = IntGauge::new(
            "switchyard_router_connections_open",
            "Client connections open now.",
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "switchyard_router_connections_refused_total",
                "Client connections refused (max_connections) or cut off (header_timeout).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(limits_store_up.clone()))?;
        registry.register(Box::new(limits_local_decisions.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(completion_tokens.clone()))?;
        registry.register(Box::new(body_bytes.clone()))?;
        registry.register(Box::new(health_check_failures.clone()))?;
        registry.register(Box::new(workers.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(ttfb.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(classify.clone()))?;
        registry.register(Box::new(cost.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(rules_generation.clone()))?;
        registry.register(Box::new(registrations.clone()))?;
        Ok(Self {
            registry,
            requests,
            retries,
            ttfb,
            duration,
            classify_by_exactness: [
                classify.with_label_values(&["false"]),
                classify.with_label_values(&["true"]),
            ],
            classify,
            cost,
            reloads,
            rules_generation,
            registrations,
            ejections,
            prompt_tokens,
            workers,
            ttft,
            completion_tokens,
            body_bytes,
            health_check_failures,
            log_lines_dropped,
            tenant_rejected,
            retry_budget_exhausted,
            prefix_placements,
            resumes,
            escalations,
            drift_psi,
            pool_spilling,
            limits_store_up,
            limits_local_decisions,
            pool_demand,
            pool_capacity,
            pool_desired_workers,
            connections_open,
            connections_refused,
        })
    }

    /// Counts a refusal for `tenant` (a configured tenant's name, or `other`).
    pub fn tenant_rejections(&self, tenant: &str, reason: &str) {
        self.tenant_rejected
            .with_label_values(&[tenant, reason])
            .inc();
    }

    /// Sets the per-pool autoscaling gauges from the registry's workers.
    pub fn set_pool_demand<'a>(
        &self,
        pools: impl Iterator<Item = &'a str>,
        workers: impl Iterator<Item = &'a crate::registry::Worker>,
    ) {
        use std::collections::HashMap;
        use std::sync::atomic::Ordering::Relaxed;
        // pool → (demand, capacity, live workers)
        let mut by_pool: HashMap<&str, (u64, u64, u64)> = pools.map(|p| (p, (0, 0, 0))).collect();
        for w in workers {
            let Some(e) = by_pool.get_mut(&*w.pool) else {
                continue;
            };
            // what the worker runs for others, and this router's requests now
            e.0 += u64::from(w.load());
            if w.routing_state() == "live" {
                e.1 += u64::from(w.max_concurrency.load(Relaxed).max(1));
                e.2 += 1;
            }
        }
        for (pool, (demand, capacity, live)) in by_pool {
            self.pool_demand
                .with_label_values(&[pool])
                .set(i64::try_from(demand).unwrap_or(i64::MAX));
            self.pool_capacity
                .with_label_values(&[pool])
                .set(i64::try_from(capacity).unwrap_or(i64::MAX));
            self.pool_desired_workers
                .with_label_values(&[pool])
                .set(desired_workers(demand, capacity, live));
        }
    }

    /// The `context` label for a prompt of `tokens`: five buckets, so latency can be read by
    /// context length (a 50k-token prompt's prefill is not a 500-token one's).
    pub fn context_bucket(tokens: u64) -> &'static str {
        match tokens {
            0..1024 => "0-1k",
            1024..4096 => "1k-4k",
            4096..16384 => "4k-16k",
            16384..65536 => "16k-64k",
            _ => "64k+",
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod demand_tests {
    use super::desired_workers;

    #[test]
    fn desired_workers_keep_the_pool_at_the_target_utilization() {
        // 2 workers of 8: 12 requests fit 8 × 0.8 = 6.4 per worker → 2
        assert_eq!(desired_workers(12, 16, 2), 2);
        // 20 requests → ceil(20 / 6.4) = 4
        assert_eq!(desired_workers(20, 16, 2), 4);
        // idle: one stays
        assert_eq!(desired_workers(0, 16, 2), 1);
        // no live worker: each request wants a worker of unknown size (1)
        assert_eq!(desired_workers(3, 0, 0), 4);
    }
}
