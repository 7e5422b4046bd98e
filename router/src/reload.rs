//! What a new rule set changes beyond the rules themselves: tokenizers for its models,
//! static workers (resolved and handed to the registry), metrics. And the reload status
//! `/admin/rules` reports.

use std::sync::Arc;

use routing_rules::{ReloadOutcome, RulesError};

use crate::classify::load_counters;
use crate::state::Shared;

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

impl Shared {
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
