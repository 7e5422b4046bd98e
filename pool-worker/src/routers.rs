//! The routers a worker registers with: the fixed URLs of `--router`, and the routers a DNS
//! name stands for (`--router-dns`, e.g. a Kubernetes headless Service, which names every
//! router pod). Each router gets a [`Registration`] of its own (lease, backoff). A DNS name
//! is resolved again every interval: a router whose address appears is joined, one whose
//! address is gone is left (its lease on that router, if the router still runs, expires by
//! TTL). A lookup that fails or finds nothing changes nothing: a DNS hiccup must not make a
//! worker leave every router.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::registration::{LoadSource, Registration, RegistrationConfig};

/// Every registration this worker runs, by router URL.
pub struct Routers {
    base: RegistrationConfig,
    load: Arc<dyn LoadSource>,
    /// Registered (true) or out of routing (false) with every router at once, and how
    /// many times it was switched on.
    enabled: tokio::sync::watch::Sender<(bool, u64)>,
    live: Mutex<BTreeMap<String, (Arc<Registration>, tokio::task::AbortHandle)>>,
    /// Shutting down: no router is joined any more (one found by DNS mid-drain would get a
    /// live registration of a worker about to leave).
    closed: std::sync::atomic::AtomicBool,
}

impl Routers {
    /// `base` is every registration's settings but the router URL (and its TLS name);
    /// `load` what heartbeats report. Registrations start enabled.
    pub fn new(base: RegistrationConfig, load: Arc<dyn LoadSource>) -> Arc<Self> {
        Arc::new(Self {
            base,
            load,
            enabled: tokio::sync::watch::Sender::new((true, 0)),
            live: Mutex::new(BTreeMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Takes this worker out of routing on every router (deregistering), or puts it back
    /// (registering anew): a sidecar does so as its engine goes down and comes back.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.send_if_modified(|e| {
            if e.0 == on {
                return false;
            }
            *e = (on, e.1 + u64::from(on));
            true
        });
    }

    fn live(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, (Arc<Registration>, tokio::task::AbortHandle)>>
    {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers with the router at `url` (run on the current runtime) unless it already
    /// does. `tls_name`: the name the router's certificate carries, when `url` holds an
    /// address found for that name.
    pub fn join(&self, url: &str, tls_name: Option<&str>) {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut live = self.live();
        if live.contains_key(url) {
            return;
        }
        let mut cfg = self.base.clone();
        cfg.router = url.to_string();
        if let (Some(tls), Some(name)) = (cfg.tls.take(), tls_name) {
            cfg.tls = Some(tls.domain_name(name));
        } else {
            cfg.tls = self.base.tls.clone();
        }
        let r = Registration::new(cfg, Arc::clone(&self.load), self.enabled.subscribe());
        let task = tokio::spawn(Arc::clone(&r).run());
        live.insert(url.to_string(), (r, task.abort_handle()));
    }

    /// Stops registering with the router at `url`.
    pub fn leave(&self, url: &str) {
        if let Some((_, task)) = self.live().remove(url) {
            task.abort();
        }
    }

    /// Joins no router from now on (the worker is shutting down).
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every registration now (to drain and deregister at shutdown).
    pub fn all(&self) -> Vec<Arc<Registration>> {
        self.live().values().map(|(r, _)| Arc::clone(r)).collect()
    }

    /// Follows the routers `url`'s host name stands for, every `every`, until the process
    /// ends: one registration per address, with the URL's scheme and port.
    pub async fn follow_dns(self: Arc<Self>, url: String, every: Duration) {
        let Some((scheme, host, port)) = split_url(&url) else {
            tracing::error!("--router-dns {url}: not scheme://host:port");
            return;
        };
        let mut joined: BTreeSet<String> = BTreeSet::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await
            {
                Ok(a) => a.collect(),
                Err(e) => {
                    tracing::warn!(
                        "--router-dns {host}: lookup failed ({e}); keeping {} router(s)",
                        joined.len()
                    );
                    continue;
                }
            };
            let resolved: BTreeSet<String> =
                addrs.iter().map(|a| format!("{scheme}://{a}")).collect();
            if resolved.is_empty() {
                tracing::warn!(
                    "--router-dns {host}: no address; keeping {} router(s)",
                    joined.len()
                );
                continue;
            }
            let (add, remove) = diff(&joined, &resolved);
            for u in &add {
                tracing::info!("--router-dns {host}: joining router {u}");
                self.join(u, Some(&host));
            }
            for u in &remove {
                tracing::info!("--router-dns {host}: router {u} is gone; leaving it");
                self.leave(u);
            }
            joined = resolved;
        }
    }
}

/// `scheme://host:port` → its parts (`host` without IPv6 brackets).
pub fn split_url(url: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((scheme.to_string(), host.to_string(), port.parse().ok()?))
}

/// The routers to join and to leave, going from `current` to `resolved`.
pub fn diff(current: &BTreeSet<String>, resolved: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (
        resolved.difference(current).cloned().collect(),
        current.difference(resolved).cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_and_sets_diff() {
        assert_eq!(
            split_url("http://switchyard-router-registry.switchyard:50051"),
            Some((
                "http".into(),
                "switchyard-router-registry.switchyard".into(),
                50051
            ))
        );
        assert_eq!(
            split_url("https://[::1]:50051/"),
            Some(("https".into(), "::1".into(), 50051))
        );
        assert_eq!(split_url("switchyard:50051"), None);
        assert_eq!(split_url("http://router"), None);
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let (add, remove) = diff(
            &set(&["http://10.0.0.1:1", "http://10.0.0.2:1"]),
            &set(&["http://10.0.0.2:1", "http://10.0.0.3:1"]),
        );
        assert_eq!(add, ["http://10.0.0.3:1"]);
        assert_eq!(remove, ["http://10.0.0.1:1"]);
    }
}
