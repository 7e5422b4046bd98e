//! The worker registry: leases, load, drain — and the immutable snapshots the request path
//! reads without locks.
//!
//! | file | owns |
//! | --- | --- |
//! | `mod.rs` | [`Registry`]: leases (register, heartbeat, drain, deregister, expiry) and publishing snapshots |
//! | [`worker`] | [`Worker`] as the request path sees it, [`Snapshot`] |
//! | [`health`] | outlier ejection with half-open probes, active health-check state |
//! | [`cost`] | [`ShareClock`]: each request's share of its worker's time |
//! | `handover.rs` | lease export/import for zero-downtime upgrades |
//! | `statics.rs` | static workers from the rules file |
//!
//! ## Concurrency
//!
//! Writers (gRPC handlers, the expiry task, rules reloads) serialise on the `leases` mutex
//! and publish a new [`Snapshot`] through `ArcSwap` after each change. The request path only
//! loads a snapshot. Load counters and health live in `Arc`s shared by every snapshot of a
//! worker, so heartbeats and outcomes update them without republishing.
//!
//! **Lock order:** `leases`, then `statics`. Every path that takes both takes them in this
//! order (`publish` reads `statics` under `leases`; `set_static` releases `statics` before
//! taking `leases`). Neither lock is held across an `.await`.

pub mod cost;
mod handover;
pub mod health;
mod statics;
pub mod worker;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

pub use cost::ShareClock;
pub use handover::ExportedLease;
pub use health::{EJECT_AFTER, EJECT_BASE, EJECT_MAX, Health};
pub use statics::StaticWorker;
pub use worker::{ServedModel, Snapshot, Worker, WorkerState};

use worker::clone_worker;

/// A heartbeat's load report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heartbeat {
    pub in_flight: u32,
    pub queued: u32,
    pub kv_cache_usage: f32,
    pub tokens_per_second: f32,
    /// Prompt tokens the worker served from its prefix cache, as a fraction, 0..1.
    pub prefix_cache_hit_rate: f32,
    /// Memory the worker's prefix cache holds, bytes.
    pub prefix_cache_bytes: u64,
}

impl Heartbeat {
    /// A report of `n` requests running and nothing else.
    pub fn running(n: u32) -> Self {
        Self {
            in_flight: n,
            ..Self::default()
        }
    }
}

struct Lease {
    worker: Arc<Worker>,
    last_heartbeat: Instant,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("unknown lease `{0}` (expired, or the router restarted): register again")]
    UnknownLease(String),
    /// Another live lease holds this worker id at another address: registering would take
    /// over its traffic. A restarted worker at a new address registers once the old
    /// lease expires (the lease TTL).
    #[error(
        "worker id `{id}` is held by a live lease at another address; use a unique id, or retry after the lease TTL"
    )]
    IdInUse { id: String },
}

/// The registry. Clone the `Arc` to share.
pub struct Registry {
    leases: Mutex<HashMap<String, Lease>>,
    statics: Mutex<Vec<Arc<Worker>>>,
    snapshot: ArcSwap<Snapshot>,
    pub heartbeat_interval: Duration,
    pub lease_ttl: Duration,
}

impl Registry {
    pub fn new(heartbeat_interval: Duration, lease_ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            leases: Mutex::new(HashMap::new()),
            statics: Mutex::new(Vec::new()),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            heartbeat_interval,
            lease_ttl,
        })
    }

    /// Lock-free read for the request path.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn statics_guard(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Worker>>> {
        self.statics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a snapshot of `leases` and the static workers. Called with `leases` held.
    fn publish(&self, leases: &HashMap<String, Lease>) {
        let mut by_pool: HashMap<Arc<str>, Vec<Arc<Worker>>> = HashMap::new();
        for l in leases.values() {
            by_pool
                .entry(l.worker.pool.clone())
                .or_default()
                .push(Arc::clone(&l.worker));
        }
        for w in self.statics_guard().iter() {
            by_pool
                .entry(w.pool.clone())
                .or_default()
                .push(Arc::clone(w));
        }
        for v in by_pool.values_mut() {
            v.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let generation = self.snapshot.load().generation + 1;
        self.snapshot.store(Arc::new(Snapshot {
            by_pool,
            generation,
        }));
    }

    /// Adds a worker. A worker re-registering with the same id at the same address (a
    /// restart) replaces its old lease; the same id at another address is refused while
    /// the old lease lives ([`RegistryError::IdInUse`]): no one takes over a worker's
    /// traffic by naming it.
    pub fn register(
        &self,
        id: String,
        pool: Arc<str>,
        address: SocketAddr,
        models: Vec<ServedModel>,
        device: String,
        engine: String,
    ) -> Result<String, RegistryError> {
        let mut leases = self.leases();
        let now = Instant::now();
        let held_elsewhere = leases.values().any(|l| {
            l.worker.id == id
                && l.worker.address != address
                && now.duration_since(l.last_heartbeat) <= self.lease_ttl
        });
        if held_elsewhere {
            return Err(RegistryError::IdInUse { id });
        }
        leases.retain(|_, l| l.worker.id != id);
        let lease_id = uuid::Uuid::new_v4().simple().to_string();
        let registered_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let worker = Arc::new(Worker::registered(
            id,
            pool,
            address,
            models,
            device,
            engine,
            registered_unix,
        ));
        leases.insert(
            lease_id.clone(),
            Lease {
                worker,
                last_heartbeat: now,
            },
        );
        self.publish(&leases);
        Ok(lease_id)
    }

    /// Renews a lease and records load. Returns whether the worker should drain.
    pub fn heartbeat(&self, lease_id: &str, report: &Heartbeat) -> Result<bool, RegistryError> {
        let mut leases = self.leases();
        let lease = leases
            .get_mut(lease_id)
            .ok_or_else(|| RegistryError::UnknownLease(lease_id.into()))?;
        lease.last_heartbeat = Instant::now();
        let draining = lease.worker.state == WorkerState::Draining;
        lease.worker.record_report(
            report.in_flight,
            report.queued,
            report.kv_cache_usage,
            report.tokens_per_second,
        );
        let r = &lease.worker.report;
        let hit = f64::from(report.prefix_cache_hit_rate).clamp(0.0, 1.0);
        r.prefix_hit_milli
            .store((hit * 1000.0) as u32, std::sync::atomic::Ordering::Relaxed);
        r.prefix_cache_bytes.store(
            report.prefix_cache_bytes,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(draining)
    }

    /// Records how many requests the lease's worker runs at once (from its registration).
    pub fn set_max_concurrency(&self, lease_id: &str, n: u32) {
        if let Some(l) = self.leases().get(lease_id) {
            l.worker
                .max_concurrency
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Stops new routing to the worker at once.
    pub fn drain(&self, lease_id: &str) -> Result<(), RegistryError> {
        let mut leases = self.leases();
        let lease = leases
            .get_mut(lease_id)
            .ok_or_else(|| RegistryError::UnknownLease(lease_id.into()))?;
        lease.worker = Arc::new(Worker {
            state: WorkerState::Draining,
            ..clone_worker(&lease.worker)
        });
        self.publish(&leases);
        Ok(())
    }

    pub fn deregister(&self, lease_id: &str) -> Result<(), RegistryError> {
        let mut leases = self.leases();
        let gone = leases
            .remove(lease_id)
            .ok_or_else(|| RegistryError::UnknownLease(lease_id.into()))?;
        gone.worker.gone.cancel();
        self.publish(&leases);
        Ok(())
    }

    /// Drops leases that missed heartbeats for the TTL. Returns the expired worker ids.
    pub fn expire(&self, now: Instant) -> Vec<String> {
        let mut leases = self.leases();
        let ttl = self.lease_ttl;
        let expired: Vec<String> = leases
            .iter()
            .filter(|(_, l)| now.duration_since(l.last_heartbeat) > ttl)
            .map(|(k, _)| k.clone())
            .collect();
        let ids = expired
            .iter()
            .filter_map(|k| leases.remove(k))
            .map(|l| {
                l.worker.gone.cancel();
                l.worker.id.clone()
            })
            .collect::<Vec<_>>();
        if !ids.is_empty() {
            self.publish(&leases);
        }
        ids
    }

    /// Runs the expiry loop forever.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            for id in self.expire(Instant::now()) {
                tracing::warn!(worker = %id, "lease expired: worker left routing");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Model `m`, text only.
    pub(super) fn served_m() -> Vec<ServedModel> {
        vec![ServedModel {
            name: "m".into(),
            max_context: 10,
            modalities: vec![],
        }]
    }

    pub(super) fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn lease_lifecycle_is_visible_in_snapshots() {
        let r = Registry::new(Duration::from_millis(100), Duration::from_millis(300));
        let lease = r
            .register(
                "w1".into(),
                Arc::from("cpu"),
                addr(),
                served_m(),
                "cpu".into(),
                "switchyard".into(),
            )
            .unwrap();
        assert_eq!(r.snapshot().routable("cpu", "m").count(), 1);
        assert_eq!(r.snapshot().routable("cpu", "other").count(), 0);
        r.heartbeat(&lease, &crate::registry::Heartbeat::running(3))
            .unwrap();
        assert_eq!(r.snapshot().routable("cpu", "m").next().unwrap().load(), 3);
        r.drain(&lease).unwrap();
        assert_eq!(r.snapshot().routable("cpu", "m").count(), 0);
        assert!(
            r.heartbeat(&lease, &crate::registry::Heartbeat::running(0))
                .unwrap(),
            "a draining worker is told to drain"
        );
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(r.expire(later), vec!["w1".to_string()]);
        assert_eq!(
            r.heartbeat(&lease, &crate::registry::Heartbeat::running(0)),
            Err(RegistryError::UnknownLease(lease.clone()))
        );
    }

    /// A second registration naming a live worker's id from another address is refused
    /// (it would take the worker's traffic); from the same address it is a restart.
    #[test]
    fn a_live_worker_id_cannot_be_taken_over() {
        let r = Registry::new(Duration::from_millis(100), Duration::from_secs(60));
        let first = r
            .register(
                "w1".into(),
                Arc::from("cpu"),
                addr(),
                served_m(),
                "cpu".into(),
                "switchyard".into(),
            )
            .unwrap();
        let thief: SocketAddr = "127.0.0.1:6666".parse().unwrap();
        assert_eq!(
            r.register(
                "w1".into(),
                Arc::from("cpu"),
                thief,
                served_m(),
                "cpu".into(),
                "switchyard".into(),
            ),
            Err(RegistryError::IdInUse { id: "w1".into() })
        );
        let snap = r.snapshot();
        let ws: Vec<_> = snap.routable("cpu", "m").collect();
        assert_eq!(ws.len(), 1);
        assert_eq!(
            ws[0].address,
            addr(),
            "traffic still goes to the real worker"
        );
        assert!(
            r.heartbeat(&first, &crate::registry::Heartbeat::running(0))
                .is_ok()
        );
        // the real worker restarting at its own address replaces its lease
        let again = r
            .register(
                "w1".into(),
                Arc::from("cpu"),
                addr(),
                served_m(),
                "cpu".into(),
                "switchyard".into(),
            )
            .unwrap();
        assert!(
            r.heartbeat(&first, &crate::registry::Heartbeat::running(0))
                .is_err()
        );
        assert!(
            r.heartbeat(&again, &crate::registry::Heartbeat::running(0))
                .is_ok()
        );
    }

    #[test]
    fn a_heartbeat_claiming_huge_load_makes_a_worker_full_not_idle() {
        let r = Registry::new(Duration::from_millis(100), Duration::from_secs(60));
        let l = r
            .register(
                "w1".into(),
                Arc::from("cpu"),
                addr(),
                served_m(),
                "cpu".into(),
                "switchyard".into(),
            )
            .unwrap();
        r.heartbeat(&l, &crate::registry::Heartbeat::running(u32::MAX))
            .unwrap();
        let snap = r.snapshot();
        let w = snap.routable("cpu", "m").next().unwrap();
        w.router_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(w.load(), u32::MAX);
    }
}
