//! Registers with the router over gRPC and keeps the lease alive.
//!
//! Register with retry (exponential backoff with jitter); heartbeat live load; on NOT_FOUND
//! (lease expired, router restarted) register again. What is registered (the models) and
//! the load heartbeats report come from the data plane behind the registration: the candle
//! engine of this process, or an external engine a sidecar watches ([`crate::sidecar`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::registry_client::RegistryClient;
use proto::{
    Command, DeregisterRequest, DrainRequest, HeartbeatRequest, RegisterRequest, ServedModel,
};
use rand::RngExt;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::engine::EngineStats;

/// Load as a heartbeat reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub in_flight: u32,
    pub queued: u32,
    /// Fraction of the KV cache in use, 0..1 (0 when unknown).
    pub kv_cache_usage: f32,
    pub tokens_per_second: f32,
    /// Prompt tokens served from the prefix cache, as a fraction of all prompt tokens.
    pub prefix_cache_hit_rate: f32,
    /// Memory the prefix cache holds, bytes.
    pub prefix_cache_bytes: u64,
}

/// Where heartbeats read load from.
pub trait LoadSource: Send + Sync + 'static {
    fn load(&self) -> Load;
}

impl LoadSource for EngineStats {
    fn load(&self) -> Load {
        Load {
            in_flight: u32::try_from(self.in_flight()).unwrap_or(u32::MAX),
            queued: u32::try_from(self.queued()).unwrap_or(u32::MAX),
            kv_cache_usage: 0.0,
            tokens_per_second: self.last_tps_milli.load(Ordering::Relaxed) as f32 / 1000.0,
            prefix_cache_hit_rate: {
                let m = &self.metrics;
                let (hit, miss) = (m.prefix_hit_tokens.get(), m.prefix_miss_tokens.get());
                (hit as f64 / (hit + miss).max(1) as f64) as f32
            },
            prefix_cache_bytes: u64::try_from(self.metrics.prefix_cache_bytes.get()).unwrap_or(0),
        }
    }
}

/// The models a registration announces. Shared, so a sidecar can change them (an engine
/// restarted with another model) before it registers again.
pub type Models = Arc<std::sync::RwLock<Vec<ServedModel>>>;

#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    pub router: String,
    pub token: Option<String>,
    /// TLS to the registry (`https://` routers): the CA to trust, and for mTLS the
    /// worker's own certificate.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    pub worker_id: String,
    pub pool: String,
    pub address: String,
    pub models: Models,
    pub max_concurrency: u32,
    pub device: String,
    /// `switchyard`, or the external engine a sidecar registers.
    pub engine: String,
}

/// The worker's side of the registry conversation.
pub struct Registration {
    cfg: RegistrationConfig,
    load: Arc<dyn LoadSource>,
    /// Whether to be registered at all, and the generation of that switch: a sidecar
    /// whose engine is down leaves routing (false) and comes back when the engine does
    /// (true, the generation moved on: registered anew even when the two changes came
    /// between two heartbeats, so the routers get the engine's models as they are now).
    enabled: tokio::sync::watch::Receiver<(bool, u64)>,
    lease: tokio::sync::Mutex<Option<String>>,
    /// Draining or left for good: never registered again. Heartbeats go on through a
    /// drain, so routers keep the worker (as draining) until it deregisters.
    done: std::sync::atomic::AtomicBool,
}

impl Registration {
    pub fn new(
        cfg: RegistrationConfig,
        load: Arc<dyn LoadSource>,
        enabled: tokio::sync::watch::Receiver<(bool, u64)>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            load,
            enabled,
            lease: tokio::sync::Mutex::new(None),
            done: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(Duration::from_secs(3));
        if let Some(t) = &self.cfg.token
            && let Ok(v) = MetadataValue::try_from(format!("Bearer {t}"))
        {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    async fn client(&self) -> Result<RegistryClient<Channel>, String> {
        let mut ch = Channel::from_shared(self.cfg.router.clone())
            .map_err(|e| format!("bad router URL `{}`: {e}", self.cfg.router))?
            .connect_timeout(Duration::from_secs(2));
        if let Some(tls) = &self.cfg.tls {
            ch = ch
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS: {e}"))?;
        }
        Ok(RegistryClient::new(
            ch.connect().await.map_err(|e| e.to_string())?,
        ))
    }

    /// Runs until the worker drains or leaves: register, heartbeat, re-register when the
    /// lease is lost; while not enabled, deregistered.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        let mut enabled = self.enabled.clone();
        loop {
            if self.done() {
                return;
            }
            if enabled.wait_for(|e| e.0).await.is_err() {
                return; // the switch is gone: the process is ending
            }
            let generation = enabled.borrow_and_update().1;
            if self.done() {
                return;
            }
            match self.register_once().await {
                Ok((mut client, interval)) => {
                    backoff = Duration::from_millis(100);
                    match self.heartbeat_loop(&mut client, interval, generation).await {
                        Beat::Done => return,
                        Beat::LeaseLost => {}
                        Beat::Disabled => {
                            self.deregister().await;
                            tracing::info!("left {} (disabled)", self.cfg.router);
                        }
                    }
                }
                Err(e) => {
                    let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
                    tracing::warn!(
                        "registration with {} failed: {e}; retrying in {:?}",
                        self.cfg.router,
                        backoff
                    );
                    tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn register_once(&self) -> Result<(RegistryClient<Channel>, Duration), String> {
        let mut client = self.client().await?;
        let c = &self.cfg;
        let resp = client
            .register(self.req(RegisterRequest {
                worker_id: c.worker_id.clone(),
                pool: c.pool.clone(),
                address: c.address.clone(),
                models: c.models.read().map(|m| m.clone()).unwrap_or_default(),
                max_concurrency: c.max_concurrency,
                device: c.device.clone(),
                engine: c.engine.clone(),
            }))
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        tracing::info!(lease = %resp.lease_id, pool = %c.pool, "registered with {}", c.router);
        *self.lease.lock().await = Some(resp.lease_id);
        Ok((
            client,
            Duration::from_millis(u64::from(resp.heartbeat_interval_ms.max(100))),
        ))
    }

    /// Heartbeats until the lease is lost, registration is disabled (or switched off and
    /// on since `generation`), or the worker has left. A drain goes on heartbeating: the
    /// routers then know the worker lives until it deregisters, and a worker that dies
    /// mid-drain is noticed by its lease expiring.
    async fn heartbeat_loop(
        &self,
        client: &mut RegistryClient<Channel>,
        interval: Duration,
        generation: u64,
    ) -> Beat {
        let mut tick = tokio::time::interval(interval);
        let mut enabled = self.enabled.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = enabled.changed() => {
                    let now = *enabled.borrow_and_update();
                    if changed.is_err() || !now.0 || now.1 != generation {
                        return Beat::Disabled;
                    }
                    continue;
                }
            }
            let Some(lease_id) = self.lease.lock().await.clone() else {
                return if self.done() {
                    Beat::Done
                } else {
                    Beat::LeaseLost
                };
            };
            let load = self.load.load();
            let hb = HeartbeatRequest {
                lease_id,
                in_flight: load.in_flight,
                queued: load.queued,
                kv_cache_usage: load.kv_cache_usage,
                tokens_per_second: load.tokens_per_second,
                device_memory_bytes: 0,
                prefix_cache_hit_rate: load.prefix_cache_hit_rate,
                prefix_cache_bytes: load.prefix_cache_bytes,
            };
            match client.heartbeat(self.req(hb)).await {
                // the router repeats the drain this worker announced: heartbeats go on
                Ok(r) if r.get_ref().command == Command::Drain as i32 => {}
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {
                    if self.done() {
                        return Beat::Done;
                    }
                    tracing::warn!("lease lost ({}); registering again", s.message());
                    return Beat::LeaseLost;
                }
                Err(s) => tracing::warn!("heartbeat failed: {}", s.message()),
            }
        }
    }

    /// Announces a drain with a deadline (best effort). From now on the worker is never
    /// registered again; heartbeats go on until [`Self::leave`].
    pub async fn drain(&self, deadline_s: u32, reason: &str) {
        self.done.store(true, Ordering::Relaxed);
        let Some(lease_id) = self.lease.lock().await.clone() else {
            return;
        };
        if let Ok(mut c) = self.client().await {
            let _ = c
                .drain(self.req(DrainRequest {
                    lease_id,
                    deadline_s,
                    reason: reason.into(),
                }))
                .await;
        }
    }

    /// Leaves routing for good (best effort): the end of a drain.
    pub async fn leave(&self) {
        self.done.store(true, Ordering::Relaxed);
        self.deregister().await;
    }

    /// Leaves routing (best effort); registered again once enabled.
    async fn deregister(&self) {
        let Some(lease_id) = self.lease.lock().await.take() else {
            return;
        };
        if let Ok(mut c) = self.client().await {
            let _ = c.deregister(self.req(DeregisterRequest { lease_id })).await;
        }
    }
}

/// How a heartbeat loop ended.
enum Beat {
    Done,
    LeaseLost,
    Disabled,
}
