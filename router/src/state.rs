//! State shared by the proxy, the registry service, the admin API and the rules watcher.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use routing_rules::{ReloadOutcome, RulesError, RulesStore};

use crate::budget::BodyBudget;
use crate::classify::{Counters, load_counters};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::upstream::RetryBudget;

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
}

/// The outcome of the most recent reload that saw a changed file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadStatus {
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
    /// `applied` or `rejected`.
    pub outcome: &'static str,
    /// The generation serving after this reload.
    pub generation: u64,
    /// Every problem found in a rejected file (empty when applied).
    pub problems: Vec<routing_rules::Problem>,
}

pub struct Shared {
    pub rules: Arc<RulesStore>,
    pub last_reload: std::sync::Mutex<Option<ReloadStatus>>,
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
        });
        s.apply_rules();
        s
    }

    /// Brings tokenizers, static workers and metrics in line with the live rule set.
    pub fn apply_rules(&self) {
        let loaded = self.rules.load();
        let (counters, errors) = load_counters(&loaded.rules, &self.counters.load());
        for e in errors {
            tracing::warn!("tokenizer unavailable, counting by estimate: {e}");
        }
        self.counters.store(Arc::new(counters));
        let statics = loaded
            .rules
            .pools()
            .iter()
            .flat_map(|p| {
                let models = static_models(&loaded.rules, p);
                p.workers
                    .iter()
                    .filter_map(move |w| resolve(w).map(|a| (p.name.clone(), a, models.clone())))
            })
            .collect();
        self.registry.set_static(statics);
        self.metrics.rules_generation.set(loaded.generation as i64);
    }

    /// Called after every reload attempt that saw a change.
    pub fn on_reload(&self, result: &Result<ReloadOutcome, RulesError>) {
        let status = match result {
            Ok(ReloadOutcome::Applied(generation)) => {
                self.apply_rules();
                self.metrics.reloads.with_label_values(&["applied"]).inc();
                tracing::info!(generation, "rules reloaded");
                ReloadStatus {
                    at_unix: unix_now(),
                    outcome: "applied",
                    generation: *generation,
                    problems: Vec::new(),
                }
            }
            Ok(ReloadOutcome::Unchanged) => return,
            Err(e) => {
                self.metrics.reloads.with_label_values(&["rejected"]).inc();
                tracing::error!("rules reload rejected, the previous rules keep serving: {e}");
                ReloadStatus {
                    at_unix: unix_now(),
                    outcome: "rejected",
                    generation: self.rules.generation(),
                    problems: e.problems(),
                }
            }
        };
        if let Ok(mut last) = self.last_reload.lock() {
            *last = Some(status);
        }
    }

    /// Re-reads the rules file now (SIGHUP, `POST /admin/reload`); blocking.
    pub fn reload_now(&self) -> Result<ReloadOutcome, RulesError> {
        let r = self.rules.reload();
        self.on_reload(&r);
        r
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a pool's static workers serve: the pool's `models`, else every model the file
/// declares; empty (any model) in a file that declares none.
fn static_models(
    rules: &routing_rules::CompiledRules,
    pool: &routing_rules::Pool,
) -> Vec<crate::registry::ServedModel> {
    let names: Vec<&String> = if pool.models.is_empty() {
        rules.models().keys().collect()
    } else {
        pool.models.iter().collect()
    };
    names
        .into_iter()
        .map(|name| crate::registry::ServedModel {
            name: name.clone(),
            max_context: rules.model(name).map_or(0, |m| m.context_window),
            modalities: Vec::new(),
        })
        .collect()
}

fn resolve(host_port: &str) -> Option<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    host_port.to_socket_addrs().ok()?.next()
}
