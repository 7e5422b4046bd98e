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
}

pub struct Shared {
    pub rules: Arc<RulesStore>,
    pub last_reload: std::sync::Mutex<Option<crate::reload::ReloadStatus>>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub counters: ArcSwap<Counters>,
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
}

impl Shared {
    pub fn new(
        rules: Arc<RulesStore>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        config: Config,
    ) -> Arc<Self> {
        let s = Arc::new(Self {
            rules,
            registry,
            metrics,
            counters: ArcSwap::from_pointee(Counters::default()),
            last_reload: std::sync::Mutex::new(None),
            retry_budget: RetryBudget::default(),
            body_budget: BodyBudget::new(config.max_buffered_bytes),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            active_requests: Arc::default(),
            config,
            hop_id: format!("sy-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        });
        s.apply_rules();
        s
    }
}
