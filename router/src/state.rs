//! State shared by the proxy, the registry service, the admin API and the rules watcher:
//! [`Shared`] and the router's [`Config`]. What a reload changes beyond the rules lives in
//! [`crate::reload`].

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use routing_rules::RulesStore;

use crate::budget::BodyBudget;
use crate::classify::Counters;
use crate::failover::RetryBudget;
use crate::metrics::Metrics;
use crate::registry::Registry;

#[derive(Debug, Clone)]
pub struct Config {
    /// Drift windows ([`crate::drift`]): each window's traffic is compared with this many
    /// windows before it.
    pub drift_window: Duration,
    pub drift_baseline_windows: usize,
    /// Latency objectives ([`crate::slo`]): how far back pools' answers count, and the
    /// least time a pool stays spilled.
    pub slo_window: Duration,
    pub slo_cooldown: Duration,
    pub max_body_bytes: usize,
    /// Request headers beyond this many bytes get 431.
    pub max_header_bytes: usize,
    pub classify_budget: Duration,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    /// From arrival to the last byte.
    pub total_timeout: Duration,
    /// Add `x-switchyard-pool`, `-rule`, `-attempts` to answers.
    pub debug_headers: bool,
    /// All request bodies held at once (see [`crate::budget`]).
    pub max_buffered_bytes: usize,
    /// The whole request body must arrive within this (408 beyond).
    pub body_timeout: Duration,
    /// How long an idle keep-alive connection waits for its next request (nginx's
    /// `keepalive_timeout`); also the longest wait for each read of a request header.
    pub keepalive_timeout: Duration,
    /// Longest wait for one write to the client to go out (nginx's `send_timeout`): a
    /// client that stops reading is cut off after it.
    pub send_timeout: Duration,
    /// A request header must arrive whole within this (see [`crate::conn`]).
    pub header_timeout: Duration,
    /// Open client connections at most (see [`crate::conn`]).
    pub max_connections: usize,
}

impl Config {
    /// The settings, if they hold together; else every problem, by flag. Nothing is fixed
    /// up silently (a body budget smaller than one body would refuse every large request).
    pub fn validated(self) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut positive = |flag: &str, zero: bool| {
            if zero {
                problems.push(format!("{flag} must be greater than zero"));
            }
        };
        positive("--max-body-bytes", self.max_body_bytes == 0);
        positive("--max-header-bytes", self.max_header_bytes == 0);
        positive("--connect-timeout-ms", self.connect_timeout.is_zero());
        positive("--first-byte-timeout-ms", self.first_byte_timeout.is_zero());
        positive("--total-timeout-ms", self.total_timeout.is_zero());
        positive("--body-timeout-ms", self.body_timeout.is_zero());
        positive("--keepalive-timeout-s", self.keepalive_timeout.is_zero());
        positive("--send-timeout-ms", self.send_timeout.is_zero());
        positive("--header-timeout-ms", self.header_timeout.is_zero());
        positive("--max-connections", self.max_connections == 0);
        positive("--drift-window-s", self.drift_window.is_zero());
        positive("--drift-baseline-windows", self.drift_baseline_windows == 0);
        positive("--slo-window-s", self.slo_window.is_zero());
        if self.max_buffered_bytes < self.max_body_bytes {
            problems.push(format!(
                "--max-buffered-bytes ({}) must hold at least one body of --max-body-bytes ({})",
                self.max_buffered_bytes, self.max_body_bytes
            ));
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(problems)
        }
    }
}

pub struct Shared {
    pub rules: Arc<RulesStore>,
    pub last_reload: std::sync::Mutex<Option<crate::reload::ReloadStatus>>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub counters: ArcSwap<Counters>,
    /// Each pool's connection settings (HTTPS, credentials), rebuilt at each reload.
    pub upstreams: ArcSwap<std::collections::HashMap<Arc<str>, Arc<crate::upstream::PoolConn>>>,
    pub retry_budget: RetryBudget,
    pub body_budget: Arc<BodyBudget>,
    /// Set on SIGTERM: `/readyz` answers 503 so load balancers stop sending while
    /// in-flight requests finish.
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// Requests being handled now (a shut-down router exits when this reaches zero).
    pub active_requests: Arc<std::sync::atomic::AtomicUsize>,
    pub config: Config,
    /// This process's name in the hop header ([`crate::admit::HOP_HEADER`]).
    pub hop_id: String,
    /// Tenants' limiters (kept across rule reloads).
    pub limiters: crate::tenants::Limiters,
    /// The tracer, when tracing is on ([`crate::trace`]).
    pub otel: Option<proto::otel::Otel>,
    /// What each tenant, model and pool cost, by minute, over the last day.
    pub ledger: crate::cost::Ledger,
    /// Each tenant's traffic against its recent past ([`crate::drift`]).
    pub drift: crate::drift::Drift,
    /// Pools' recent answers and spill state, for rules with a latency objective
    /// ([`crate::slo`]).
    pub slo: crate::slo::SloTracker,
    /// Which workers were sent which prompt starts, for pools that select `cache_aware`.
    pub prefixes: crate::select::PrefixIndex,
}

impl Shared {
    pub fn new(
        rules: Arc<RulesStore>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        config: Config,
        otel: Option<proto::otel::Otel>,
    ) -> Arc<Self> {
        let drift = crate::drift::Drift::new(
            config.drift_window,
            config.drift_baseline_windows,
            metrics.drift_psi.clone(),
        );
        let s = Arc::new(Self {
            drift,
            slo: crate::slo::SloTracker::new(config.slo_window, config.slo_cooldown),
            rules,
            registry,
            metrics,
            counters: ArcSwap::from_pointee(Counters::default()),
            upstreams: ArcSwap::from_pointee(std::collections::HashMap::new()),
            last_reload: std::sync::Mutex::new(None),
            retry_budget: RetryBudget::default(),
            body_budget: BodyBudget::new(config.max_buffered_bytes),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            active_requests: Arc::default(),
            config,
            hop_id: format!("sy-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            limiters: crate::tenants::Limiters::default(),
            otel,
            ledger: crate::cost::Ledger::default(),
            prefixes: crate::select::PrefixIndex::default(),
        });
        s.apply_rules();
        s
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Config;

    fn good() -> Config {
        let s = Duration::from_secs(1);
        Config {
            drift_window: s,
            drift_baseline_windows: 1,
            slo_window: s,
            slo_cooldown: s,
            max_body_bytes: 10,
            max_header_bytes: 10,
            classify_budget: s,
            connect_timeout: s,
            first_byte_timeout: s,
            total_timeout: s,
            debug_headers: true,
            max_buffered_bytes: 10,
            body_timeout: s,
            keepalive_timeout: s,
            send_timeout: s,
            header_timeout: s,
            max_connections: 1,
        }
    }

    #[test]
    fn settings_are_checked_and_every_problem_named() {
        assert!(good().validated().is_ok());
        let bad = Config {
            max_buffered_bytes: 5,
            send_timeout: Duration::ZERO,
            ..good()
        };
        let problems = bad.validated().unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("--max-buffered-bytes (5)"))
        );
        assert!(problems.iter().any(|p| p.contains("--send-timeout-ms")));
    }
}
