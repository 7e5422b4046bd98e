//! The worker registry: leases, load, drain — and the immutable snapshots the request path
//! reads without locks.
//!
//! Writers (gRPC handlers and the expiry task) serialise on one mutex and publish a new
//! `Snapshot` through `ArcSwap` after each change. The request path only loads a snapshot.
//! Router-side in-flight counters live in `Arc<AtomicU32>`s shared by every snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Live,
    Draining,
}

/// A served model as the worker advertised it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServedModel {
    pub name: String,
    pub max_context: u32,
    pub modalities: Vec<String>,
}

/// One worker as the request path sees it. Immutable except the shared load counters.
#[derive(Debug, Serialize)]
pub struct Worker {
    pub id: String,
    pub pool: Arc<str>,
    pub address: SocketAddr,
    pub state: WorkerState,
    pub models: Vec<ServedModel>,
    pub device: String,
    /// Load the worker last reported (in-flight + queued). Shared by every snapshot of
    /// this worker, so a heartbeat updates it without republishing the registry.
    #[serde(serialize_with = "ser_atomic")]
    pub reported_load: Arc<AtomicU32>,
    /// Requests this router has in flight to the worker right now.
    #[serde(serialize_with = "ser_atomic")]
    pub router_in_flight: Arc<AtomicU32>,
    /// Outlier detection and active health-check state, shared by every snapshot of this
    /// worker.
    #[serde(skip)]
    pub health: Arc<Health>,
    /// Each request's share of this worker's time (for cost attribution).
    #[serde(skip)]
    pub share: Arc<ShareClock>,
    #[serde(skip)]
    pub registered_at: Instant,
    #[serde(skip)]
    pub registered_unix: u64,
    /// Static workers come from the rules file, not from registration.
    pub is_static: bool,
}

fn ser_atomic<S: serde::Serializer>(a: &Arc<AtomicU32>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u32(a.load(Ordering::Relaxed))
}

/// Consecutive failures eject a worker for a while (Envoy-style outlier detection).
#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    times_ejected: AtomicU32,
    /// Milliseconds since `EPOCH` until which the worker is ejected.
    ejected_until_ms: std::sync::atomic::AtomicU64,
    /// The last active health check failed (static workers only).
    down: std::sync::atomic::AtomicBool,
}

/// Failures in a row that eject a worker.
pub const EJECT_AFTER: u32 = 3;
/// Base ejection time; it grows with each ejection, up to `EJECT_MAX`.
pub const EJECT_BASE: Duration = Duration::from_secs(5);
pub const EJECT_MAX: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Health {
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Returns true when this failure ejected the worker.
    pub fn record_failure(&self) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < EJECT_AFTER {
            return false;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let times = self.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let d = (EJECT_BASE * times).min(EJECT_MAX);
        self.ejected_until_ms
            .store(now_ms() + d.as_millis() as u64, Ordering::Relaxed);
        true
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Records an active health check's outcome; returns whether the state changed.
    pub fn set_down(&self, down: bool) -> bool {
        self.down.swap(down, Ordering::Relaxed) != down
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Out of selection: failed its health check, or ejected after failures. Selection
    /// still falls back to such a worker when the pool has nothing else.
    pub fn is_excluded(&self) -> bool {
        self.is_down() || self.is_ejected()
    }
}

/// Attributes a worker's time to the requests it serves at once: while `n` requests from
/// this router are in flight to it, each accrues `1/n` of every second. A request's share is
/// the clock's advance between its start and its end (processor-sharing accounting), so
/// concurrent requests split the worker's cost instead of each paying for all of it.
#[derive(Debug)]
pub struct ShareClock(Mutex<ShareState>);

#[derive(Debug)]
struct ShareState {
    at: Instant,
    in_flight: u32,
    /// Seconds accrued per request since the clock started.
    per_request: f64,
}

impl Default for ShareClock {
    fn default() -> Self {
        Self(Mutex::new(ShareState {
            at: Instant::now(),
            in_flight: 0,
            per_request: 0.0,
        }))
    }
}

impl ShareClock {
    fn advance(&self, now: Instant, delta: i32) -> f64 {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let dt = now.saturating_duration_since(s.at).as_secs_f64();
        if s.in_flight > 0 {
            s.per_request += dt / f64::from(s.in_flight);
        }
        s.at = s.at.max(now);
        s.in_flight = s.in_flight.saturating_add_signed(delta);
        s.per_request
    }

    /// A request starts; returns the clock reading to hand back to [`ShareClock::end`].
    pub fn start(&self, now: Instant) -> f64 {
        self.advance(now, 1)
    }

    /// A request that started at reading `started` ends; returns its share in seconds.
    pub fn end(&self, now: Instant, started: f64) -> f64 {
        (self.advance(now, -1) - started).max(0.0)
    }
}

impl Worker {
    /// `live`, `draining`, `unhealthy` (a static worker failing its health check) or
    /// `ejected` (live but out of selection after failures): the states `/admin/pools`, `/readyz` and `switchyard_router_workers` report.
    pub fn routing_state(&self) -> &'static str {
        if self.state == WorkerState::Draining {
            "draining"
        } else if self.health.is_down() {
            "unhealthy"
        } else if self.health.is_ejected() {
            "ejected"
        } else {
            "live"
        }
    }

    pub fn load(&self) -> u32 {
        self.reported_load.load(Ordering::Relaxed) + self.router_in_flight.load(Ordering::Relaxed)
    }

    /// A live worker that registered now (its counters and health fresh).
    fn registered(
        id: String,
        pool: Arc<str>,
        address: SocketAddr,
        models: Vec<ServedModel>,
        device: String,
        registered_unix: u64,
    ) -> Self {
        Self {
            id,
            pool,
            address,
            state: WorkerState::Live,
            models,
            device,
            reported_load: Arc::default(),
            router_in_flight: Arc::new(AtomicU32::new(0)),
            health: Arc::default(),
            share: Arc::default(),
            registered_at: Instant::now(),
            registered_unix,
            is_static: false,
        }
    }

    /// A static worker with no model list (from a rules file that names no models) takes
    /// any model.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m.name == model) || (self.is_static && self.models.is_empty())
    }

    /// Whether the worker takes `model` with these input modalities (a worker that
    /// advertises no modalities is taken at its word for any; static workers take all).
    pub fn accepts(&self, model: &str, modalities: routing_rules::ModalitySet) -> bool {
        if self.is_static {
            return self.serves(model);
        }
        self.models.iter().any(|m| {
            m.name == model
                && (m.modalities.is_empty()
                    || modalities
                        .names()
                        .iter()
                        .all(|n| m.modalities.iter().any(|x| x == n)))
        })
    }
}

/// What the request path reads: live and draining workers grouped by pool.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub by_pool: HashMap<Arc<str>, Vec<Arc<Worker>>>,
    pub generation: u64,
}

impl Snapshot {
    /// Workers of `pool` that take new requests for `model`.
    pub fn routable<'a>(
        &'a self,
        pool: &str,
        model: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Worker>> + 'a {
        self.by_pool
            .get(pool)
            .into_iter()
            .flatten()
            .filter(move |w| w.state == WorkerState::Live && w.serves(model))
    }
    pub fn workers(&self) -> impl Iterator<Item = &Arc<Worker>> {
        self.by_pool.values().flatten()
    }
}

struct Lease {
    worker: Arc<Worker>,
    last_heartbeat: Instant,
}

/// A registered worker's lease as the router hands it to the process replacing it
/// (`switchyard serve --upgrade`), so the workers keep their leases across the upgrade.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportedLease {
    pub lease_id: String,
    pub id: String,
    pub pool: String,
    pub address: SocketAddr,
    pub models: Vec<ServedModel>,
    pub device: String,
    pub draining: bool,
    pub reported_load: u32,
    pub registered_unix: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("unknown lease `{0}` (expired, or the router restarted): register again")]
    UnknownLease(String),
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

    fn publish(&self, leases: &HashMap<String, Lease>) {
        let mut by_pool: HashMap<Arc<str>, Vec<Arc<Worker>>> = HashMap::new();
        for l in leases.values() {
            by_pool
                .entry(l.worker.pool.clone())
                .or_default()
                .push(Arc::clone(&l.worker));
        }
        for w in self
            .statics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
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

    /// Adds a worker; a worker re-registering with the same id replaces its old lease.
    pub fn register(
        &self,
        id: String,
        pool: Arc<str>,
        address: SocketAddr,
        models: Vec<ServedModel>,
        device: String,
    ) -> String {
        let lease_id = uuid::Uuid::new_v4().simple().to_string();
        let mut leases = self.leases();
        leases.retain(|_, l| l.worker.id != id);
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
            registered_unix,
        ));
        leases.insert(
            lease_id.clone(),
            Lease {
                worker,
                last_heartbeat: Instant::now(),
            },
        );
        self.publish(&leases);
        lease_id
    }

    /// Every registered worker's lease (static workers come from the rules file instead).
    pub fn export(&self) -> Vec<ExportedLease> {
        let leases = self.leases();
        let mut list: Vec<ExportedLease> = leases
            .iter()
            .map(|(lease_id, l)| {
                let w = &l.worker;
                ExportedLease {
                    lease_id: lease_id.clone(),
                    id: w.id.clone(),
                    pool: w.pool.to_string(),
                    address: w.address,
                    models: w.models.clone(),
                    device: w.device.clone(),
                    draining: w.state == WorkerState::Draining,
                    reported_load: w.reported_load.load(Ordering::Relaxed),
                    registered_unix: w.registered_unix,
                }
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Takes over leases exported by the process this one replaces: the workers' next
    /// heartbeats renew them here, with no re-registration and no gap in routing. Each
    /// lease starts a fresh TTL.
    pub fn import(&self, exported: Vec<ExportedLease>) -> usize {
        let mut leases = self.leases();
        let mut known: std::collections::HashSet<String> =
            leases.values().map(|l| l.worker.id.clone()).collect();
        let now = Instant::now();
        let mut n = 0;
        for e in exported {
            if !known.insert(e.id.clone()) {
                continue;
            }
            let mut worker = Worker::registered(
                e.id,
                e.pool.into(),
                e.address,
                e.models,
                e.device,
                e.registered_unix,
            );
            if e.draining {
                worker.state = WorkerState::Draining;
            }
            worker
                .reported_load
                .store(e.reported_load, Ordering::Relaxed);
            let worker = Arc::new(worker);
            leases.insert(
                e.lease_id,
                Lease {
                    worker,
                    last_heartbeat: now,
                },
            );
            n += 1;
        }
        self.publish(&leases);
        n
    }

    /// Restarts every lease's TTL now (the control plane starting after an upgrade's
    /// hand-over, which may come seconds after the leases were imported).
    pub fn renew_all(&self) {
        let now = Instant::now();
        for l in self.leases().values_mut() {
            l.last_heartbeat = now;
        }
    }

    /// Renews a lease and records load. Returns whether the worker should drain.
    pub fn heartbeat(&self, lease_id: &str, load: u32) -> Result<bool, RegistryError> {
        let mut leases = self.leases();
        let lease = leases
            .get_mut(lease_id)
            .ok_or_else(|| RegistryError::UnknownLease(lease_id.into()))?;
        lease.last_heartbeat = Instant::now();
        let draining = lease.worker.state == WorkerState::Draining;
        lease.worker.reported_load.store(load, Ordering::Relaxed);
        Ok(draining)
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
        leases
            .remove(lease_id)
            .ok_or_else(|| RegistryError::UnknownLease(lease_id.into()))?;
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
            .map(|l| l.worker.id.clone())
            .collect::<Vec<_>>();
        if !ids.is_empty() {
            self.publish(&leases);
        }
        ids
    }

    /// Replaces the static workers (pools that list addresses in the rules file). A worker
    /// listed before keeps its state (health, in-flight count) across reloads.
    pub fn set_static(&self, workers: Vec<(Arc<str>, SocketAddr, Vec<ServedModel>)>) {
        let mut statics = self.statics.lock().unwrap_or_else(|p| p.into_inner());
        let list = workers
            .into_iter()
            .map(|(pool, address, models)| {
                if let Some(w) = statics
                    .iter()
                    .find(|w| w.pool == pool && w.address == address)
                {
                    // same counters and health; the model list may have changed
                    return Arc::new(Worker {
                        models,
                        ..clone_worker(w)
                    });
                }
                Arc::new(Worker {
                    id: format!("static-{pool}-{address}"),
                    pool,
                    address,
                    state: WorkerState::Live,
                    models,
                    device: "static".into(),
                    reported_load: Arc::default(),
                    router_in_flight: Arc::new(AtomicU32::new(0)),
                    health: Arc::default(),
                    share: Arc::default(),
                    registered_at: Instant::now(),
                    registered_unix: 0,
                    is_static: true,
                })
            })
            .collect();
        *statics = list;
        drop(statics);
        let leases = self.leases();
        self.publish(&leases);
    }

    /// The static workers (for the active health checker).
    pub fn statics(&self) -> Vec<Arc<Worker>> {
        self.statics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

fn clone_worker(w: &Worker) -> Worker {
    Worker {
        id: w.id.clone(),
        pool: w.pool.clone(),
        address: w.address,
        state: w.state,
        models: w.models.clone(),
        device: w.device.clone(),
        reported_load: Arc::clone(&w.reported_load),
        router_in_flight: Arc::clone(&w.router_in_flight),
        health: Arc::clone(&w.health),
        share: Arc::clone(&w.share),
        registered_at: w.registered_at,
        registered_unix: w.registered_unix,
        is_static: w.is_static,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A alone for 1 s, A and B together for 2 s, B alone for 1 s: each had the worker's
    /// whole attention for 1 s and half of it for 2 s, so each is charged 2 s, and the
    /// charges add up to the 4 s the worker was busy.
    #[test]
    fn concurrent_requests_split_the_workers_time() {
        let c = ShareClock::default();
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let a = c.start(s(0));
        let b = c.start(s(1));
        let a_share = c.end(s(3), a);
        let b_share = c.end(s(4), b);
        assert!((a_share - 2.0).abs() < 1e-9, "{a_share}");
        assert!((b_share - 2.0).abs() < 1e-9, "{b_share}");
        // idle time is charged to nobody
        let d = c.start(s(10));
        assert!((c.end(s(11), d) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets() {
        let h = Health::default();
        assert!(!h.record_failure());
        h.record_success();
        assert!(!h.record_failure());
        assert!(!h.record_failure());
        assert!(!h.is_ejected());
        assert!(h.record_failure(), "the third failure in a row ejects");
        assert!(h.is_ejected());
    }

    #[test]
    fn ejection_never_empties_a_pool() {
        let r = Registry::new(Duration::from_millis(100), Duration::from_millis(300));
        r.register("a".into(), Arc::from("p"), addr(), served_m(), "cpu".into());
        r.register(
            "b".into(),
            Arc::from("p"),
            "127.0.0.1:10".parse().unwrap(),
            served_m(),
            "cpu".into(),
        );
        let snap = r.snapshot();
        let a = snap.routable("p", "m").find(|w| w.id == "a").unwrap();
        for _ in 0..EJECT_AFTER {
            a.health.record_failure();
        }
        for _ in 0..20 {
            assert_eq!(
                crate::upstream::pick(&snap, "p", "m", Default::default(), &[])
                    .unwrap()
                    .id,
                "b"
            );
        }
        // with b already tried, the ejected a is still used rather than nothing
        assert_eq!(
            crate::upstream::pick(&snap, "p", "m", Default::default(), &["b".into()])
                .unwrap()
                .id,
            "a"
        );
    }

    /// Model `m`, text only.
    fn served_m() -> Vec<ServedModel> {
        vec![ServedModel {
            name: "m".into(),
            max_context: 10,
            modalities: vec![],
        }]
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    /// What an upgrade hands over: the new process routes to the same workers at once and
    /// their next heartbeats (with the old lease ids) renew the leases there.
    #[test]
    fn exported_leases_are_routable_and_renewable_in_the_next_process() {
        let old = Registry::new(Duration::from_millis(100), Duration::from_millis(300));
        let live = old.register("a".into(), Arc::from("p"), addr(), served_m(), "cpu".into());
        let draining = old.register("b".into(), Arc::from("p"), addr(), served_m(), "cpu".into());
        old.heartbeat(&live, 7).unwrap();
        old.drain(&draining).unwrap();
        let exported = serde_json::to_string(&old.export()).unwrap();

        let new = Registry::new(Duration::from_millis(100), Duration::from_millis(300));
        let imported: Vec<ExportedLease> = serde_json::from_str(&exported).unwrap();
        assert_eq!(new.import(imported.clone()), 2);
        let snap = new.snapshot();
        let ids: Vec<&str> = snap.routable("p", "m").map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["a"], "the draining worker stays out of routing");
        assert_eq!(snap.routable("p", "m").next().unwrap().load(), 7);
        assert_eq!(new.heartbeat(&live, 1), Ok(false));
        assert_eq!(new.heartbeat(&draining, 1), Ok(true), "still told to drain");
        // importing twice (a retried upgrade) adds nothing
        assert_eq!(new.import(imported), 0);
        assert_eq!(new.export().len(), 2);
        // unrenewed, the leases expire as any other
        assert_eq!(new.expire(Instant::now() + Duration::from_secs(1)).len(), 2);
    }

    #[test]
    fn lease_lifecycle_is_visible_in_snapshots() {
        let r = Registry::new(Duration::from_millis(100), Duration::from_millis(300));
        let m = vec![ServedModel {
            name: "m".into(),
            max_context: 10,
            modalities: vec![],
        }];
        let lease = r.register("w1".into(), Arc::from("cpu"), addr(), m, "cpu".into());
        assert_eq!(r.snapshot().routable("cpu", "m").count(), 1);
        assert_eq!(r.snapshot().routable("cpu", "other").count(), 0);
        r.heartbeat(&lease, 3).unwrap();
        assert_eq!(r.snapshot().routable("cpu", "m").next().unwrap().load(), 3);
        r.drain(&lease).unwrap();
        assert_eq!(r.snapshot().routable("cpu", "m").count(), 0);
        assert!(
            r.heartbeat(&lease, 0).unwrap(),
            "a draining worker is told to drain"
        );
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(r.expire(later), vec!["w1".to_string()]);
        assert_eq!(
            r.heartbeat(&lease, 0),
            Err(RegistryError::UnknownLease(lease.clone()))
        );
    }
}
