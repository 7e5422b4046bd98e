//! Static workers: OpenAI-compatible servers the rules file lists instead of registering.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

use super::worker::clone_worker;
use super::{Registry, ServedModel, Worker, WorkerState};

/// A static worker: its pool, one address its entry resolved to, the models it serves and
/// the host name it was listed by (when not an IP).
pub type StaticWorker = (Arc<str>, SocketAddr, Vec<ServedModel>, Option<Arc<str>>);

impl Registry {
    /// Replaces the static workers (pools that list addresses in the rules file), each
    /// `(pool, address, models, host name it was listed by)`. A worker listed before keeps
    /// its state (health, in-flight count) across reloads and re-resolutions.
    pub fn set_static(&self, workers: Vec<StaticWorker>) {
        let mut statics = self.statics_guard();
        let list = workers
            .into_iter()
            .map(|(pool, address, models, host)| {
                if let Some(w) = statics
                    .iter()
                    .find(|w| w.pool == pool && w.address == address)
                {
                    // same counters and health; the model list may have changed
                    return Arc::new(Worker {
                        models,
                        host,
                        ..clone_worker(w)
                    });
                }
                Arc::new(Worker {
                    id: format!("static-{pool}-{address}"),
                    pool,
                    address,
                    host,
                    state: WorkerState::Live,
                    models,
                    device: "static".into(),
                    engine: String::new(),
                    reported_load: Arc::default(),
                    others_load: Arc::default(),
                    report: Arc::default(),
                    gone: Default::default(),
                    router_in_flight: Arc::new(AtomicU32::new(0)),
                    max_concurrency: Arc::default(),
                    health: Arc::default(),
                    share: Arc::default(),
                    connects: super::worker::connect_permits(),
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
        self.statics_guard().clone()
    }
}
