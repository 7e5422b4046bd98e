//! A worker as the request path sees it, and the snapshot of all of them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::cost::ShareClock;
use super::health::Health;

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
    /// The host name a static worker was listed by (`vllm.internal:8000`), for `Host` and
    /// TLS; `None` for registered workers and addresses listed as IPs.
    pub host: Option<Arc<str>>,
    pub state: WorkerState,
    pub models: Vec<ServedModel>,
    pub device: String,
    /// What serves the data plane: `switchyard`, an external engine a sidecar registered
    /// (`vllm`, `llamacpp`, …), or empty for a static worker.
    pub engine: String,
    /// Load the worker last reported (in-flight + queued). Shared by every snapshot of
    /// this worker, so a heartbeat updates it without republishing the registry.
    #[serde(serialize_with = "ser_atomic")]
    pub reported_load: Arc<AtomicU32>,
    /// The part of the reported load that is not this router's: what the worker reported
    /// less this router's requests in flight to it at that moment. Selection adds this
    /// router's live count to it ([`Worker::load`]), so this router's own requests are
    /// not counted twice until the next heartbeat.
    #[serde(skip)]
    pub others_load: Arc<AtomicU32>,
    /// The last heartbeat's details (for `/admin/workers`).
    #[serde(skip)]
    pub report: Arc<Report>,
    /// Cancelled when the worker leaves routing for good (its lease expired, or it
    /// deregistered): attempts still waiting for its first token give up on it and fail
    /// over, instead of waiting for a worker that is gone (a partitioned host's
    /// connections do not fail by themselves).
    #[serde(skip)]
    pub gone: tokio_util::sync::CancellationToken,
    /// Requests this router has in flight to the worker right now.
    #[serde(serialize_with = "ser_atomic")]
    pub router_in_flight: Arc<AtomicU32>,
    /// Requests the worker runs at once, as it registered (0: unknown, e.g. a static
    /// worker). Feeds the pool's capacity for autoscaling ([`crate::metrics`]).
    #[serde(serialize_with = "ser_atomic")]
    pub max_concurrency: Arc<AtomicU32>,
    /// Outlier detection and active health-check state, shared by every snapshot of this
    /// worker.
    #[serde(skip)]
    pub health: Arc<Health>,
    /// Each request's share of this worker's time (for cost attribution).
    #[serde(skip)]
    pub share: Arc<ShareClock>,
    /// Connection attempts to this worker in flight at once, at most
    /// [`MAX_CONNECTS_IN_FLIGHT`]: a burst of new streams queues here briefly instead of
    /// overflowing the worker's accept queue (whose connect timeouts would then eject a
    /// healthy worker).
    #[serde(skip)]
    pub connects: Arc<tokio::sync::Semaphore>,
    #[serde(skip)]
    pub registered_at: Instant,
    #[serde(skip)]
    pub registered_unix: u64,
    /// Static workers come from the rules file, not from registration.
    pub is_static: bool,
}

/// A heartbeat's load report as last received.
#[derive(Debug, Default)]
pub struct Report {
    pub in_flight: AtomicU32,
    pub queued: AtomicU32,
    /// Fraction of the KV cache in use ×1000.
    pub kv_cache_milli: AtomicU32,
    /// Generated tokens per second ×1000.
    pub tokens_per_second_milli: AtomicU32,
    /// Prompt tokens served from the prefix cache, as a fraction ×1000.
    pub prefix_hit_milli: AtomicU32,
    /// Memory the prefix cache holds, bytes.
    pub prefix_cache_bytes: std::sync::atomic::AtomicU64,
}

impl Report {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "queued": self.queued.load(Ordering::Relaxed),
            "kv_cache_usage": f64::from(self.kv_cache_milli.load(Ordering::Relaxed)) / 1000.0,
            "tokens_per_second": f64::from(self.tokens_per_second_milli.load(Ordering::Relaxed)) / 1000.0,
            "prefix_cache_hit_rate": f64::from(self.prefix_hit_milli.load(Ordering::Relaxed)) / 1000.0,
            "prefix_cache_bytes": self.prefix_cache_bytes.load(Ordering::Relaxed),
        })
    }
}

/// Connection attempts in flight to one worker at once.
pub const MAX_CONNECTS_IN_FLIGHT: usize = 32;

pub(super) fn connect_permits() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTS_IN_FLIGHT))
}

fn ser_atomic<S: serde::Serializer>(a: &Arc<AtomicU32>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u32(a.load(Ordering::Relaxed))
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

    /// Load for selection: what the worker runs for others (its last report less this
    /// router's requests at that moment) plus what this router has in flight to it now.
    /// Saturating: a heartbeat claiming `u32::MAX` makes a worker look full, never idle.
    pub fn load(&self) -> u32 {
        self.others_load
            .load(Ordering::Relaxed)
            .saturating_add(self.router_in_flight.load(Ordering::Relaxed))
    }

    /// Records a heartbeat's report.
    pub fn record_report(&self, in_flight: u32, queued: u32, kv_cache: f32, tps: f32) {
        let total = in_flight.saturating_add(queued);
        self.reported_load.store(total, Ordering::Relaxed);
        let ours = self.router_in_flight.load(Ordering::Relaxed);
        self.others_load
            .store(total.saturating_sub(ours), Ordering::Relaxed);
        let milli =
            |x: f32| (f64::from(x).clamp(0.0, f64::from(u32::MAX) / 1000.0) * 1000.0) as u32;
        self.report.in_flight.store(in_flight, Ordering::Relaxed);
        self.report.queued.store(queued, Ordering::Relaxed);
        self.report
            .kv_cache_milli
            .store(milli(kv_cache.min(1.0)), Ordering::Relaxed);
        self.report
            .tokens_per_second_milli
            .store(milli(tps), Ordering::Relaxed);
    }

    /// A live worker that registered now (its counters and health fresh).
    pub(super) fn registered(
        id: String,
        pool: Arc<str>,
        address: SocketAddr,
        models: Vec<ServedModel>,
        device: String,
        engine: String,
        registered_unix: u64,
    ) -> Self {
        Self {
            id,
            pool,
            address,
            host: None,
            state: WorkerState::Live,
            models,
            device,
            engine,
            reported_load: Arc::default(),
            others_load: Arc::default(),
            report: Arc::default(),
            gone: Default::default(),
            router_in_flight: Arc::new(AtomicU32::new(0)),
            max_concurrency: Arc::default(),
            health: Arc::default(),
            share: Arc::default(),
            connects: connect_permits(),
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

    /// Whether the worker's engine continues a chat's final assistant message
    /// (`continue_final_message`, [`crate::resume`]): Switchyard's worker, vLLM and sglang.
    /// llama.cpp and TGI are left out (their servers take no such option), as are static
    /// workers (the engine behind them is unknown).
    pub fn continues(&self) -> bool {
        matches!(self.engine.as_str(), "switchyard" | "vllm" | "sglang")
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

pub(super) fn clone_worker(w: &Worker) -> Worker {
    Worker {
        id: w.id.clone(),
        pool: w.pool.clone(),
        address: w.address,
        host: w.host.clone(),
        state: w.state,
        models: w.models.clone(),
        device: w.device.clone(),
        engine: w.engine.clone(),
        reported_load: Arc::clone(&w.reported_load),
        others_load: Arc::clone(&w.others_load),
        report: Arc::clone(&w.report),
        gone: w.gone.clone(),
        router_in_flight: Arc::clone(&w.router_in_flight),
        max_concurrency: Arc::clone(&w.max_concurrency),
        health: Arc::clone(&w.health),
        share: Arc::clone(&w.share),
        connects: Arc::clone(&w.connects),
        registered_at: w.registered_at,
        registered_unix: w.registered_unix,
        is_static: w.is_static,
    }
}
