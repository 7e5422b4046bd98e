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
    /// Brings tokenizers, static workers, upstream connection settings and metrics in
    /// line with the live rule set.
    pub fn apply_rules(&self) {
        let loaded = self.rules.load();
        let (counters, errors) = load_counters(&loaded.rules, &self.counters.load());
        for e in errors {
            tracing::warn!("tokenizer unavailable, counting by estimate: {e}");
        }
        self.counters.store(Arc::new(counters));
        self.upstreams
            .store(Arc::new(crate::upstream::for_pools(loaded.rules.pools())));
        self.refresh_statics();
        self.metrics.rules_generation.set(loaded.generation as i64);
    }

    /// Resolves every pool's static `workers` entries again, each to every address its name
    /// has now (a name behind several addresses is several workers; one whose addresses
    /// changed moves with them), and hands them to the registry. Run at each reload and
    /// every `--resolve-every-s`; blocking (DNS).
    pub fn refresh_statics(&self) {
        let loaded = self.rules.load();
        let statics = static_workers(&loaded.rules, resolve);
        self.registry.set_static(statics);
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

/// Every static worker of the rules: each `workers` entry of each pool, once per address
/// `resolve` gives it, with the host name when the entry names one.
fn static_workers(
    rules: &routing_rules::CompiledRules,
    resolve: impl Fn(&str) -> Vec<std::net::SocketAddr>,
) -> Vec<crate::registry::StaticWorker> {
    let mut out = Vec::new();
    for p in rules.pools() {
        let models = static_models(rules, p);
        for entry in &p.workers {
            let host = entry
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                .filter(|h| h.parse::<std::net::IpAddr>().is_err())
                .map(Arc::<str>::from);
            let mut addrs = resolve(entry);
            addrs.sort_unstable();
            addrs.dedup();
            if addrs.is_empty() {
                tracing::warn!(pool = %p.name, entry, "static worker does not resolve; left out until it does");
            }
            for a in addrs {
                out.push((p.name.clone(), a, models.clone(), host.clone()));
            }
        }
    }
    out
}

fn resolve(host_port: &str) -> Vec<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_with_several_addresses_is_several_workers_and_keeps_its_name() {
        let rules = routing_rules::compile(
            "version: 1\npools:\n  a: { class: cpu, capacity: on_demand, cost_per_hour: 1, workers: [\"vllm.internal:8000\", \"10.0.0.9:8000\"] }\nrules:\n  - name: all\n    route: [a]\n",
            std::path::Path::new("."),
        )
        .expect("rules");
        let fake = |entry: &str| -> Vec<std::net::SocketAddr> {
            match entry {
                "vllm.internal:8000" => vec![
                    "10.0.0.2:8000".parse().unwrap_or_else(|_| unreachable!()),
                    "10.0.0.1:8000".parse().unwrap_or_else(|_| unreachable!()),
                    "10.0.0.2:8000".parse().unwrap_or_else(|_| unreachable!()),
                ],
                other => other.parse().into_iter().collect(),
            }
        };
        let w = static_workers(&rules, fake);
        let seen: Vec<(String, Option<&str>)> = w
            .iter()
            .map(|(_, a, _, h)| (a.to_string(), h.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                ("10.0.0.1:8000".to_string(), Some("vllm.internal")),
                ("10.0.0.2:8000".to_string(), Some("vllm.internal")),
                ("10.0.0.9:8000".to_string(), None),
            ]
        );
        // a name that resolves to nothing is left out, not an error
        assert!(static_workers(&rules, |_| Vec::new()).is_empty());
    }
}
