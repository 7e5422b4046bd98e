//! Registers with the router over gRPC and keeps the lease alive.
//!
//! Register with retry (exponential backoff with jitter); heartbeat live load; on NOT_FOUND
//! (lease expired, router restarted) register again.

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
    pub model: String,
    pub max_context: u32,
    pub modalities: Vec<String>,
    pub max_concurrency: u32,
    pub device: String,
}

/// The worker's side of the registry conversation.
pub struct Registration {
    cfg: RegistrationConfig,
    stats: Arc<EngineStats>,
    lease: tokio::sync::Mutex<Option<String>>,
}

impl Registration {
    pub fn new(cfg: RegistrationConfig, stats: Arc<EngineStats>) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            stats,
            lease: tokio::sync::Mutex::new(None),
        })
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

    /// Runs forever: register, heartbeat, re-register when the lease is lost. Returns when the
    /// router answers a drain command.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.register_once().await {
                Ok((mut client, interval)) => {
                    backoff = Duration::from_millis(100);
                    if self.heartbeat_loop(&mut client, interval).await {
                        return;
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
                models: vec![ServedModel {
                    name: c.model.clone(),
                    max_context: c.max_context,
                    modalities: c.modalities.clone(),
                }],
                max_concurrency: c.max_concurrency,
                device: c.device.clone(),
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

    /// Heartbeats until the lease is lost (false) or the router says drain (true).
    async fn heartbeat_loop(
        &self,
        client: &mut RegistryClient<Channel>,
        interval: Duration,
    ) -> bool {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let Some(lease_id) = self.lease.lock().await.clone() else {
                return false;
            };
            let hb = HeartbeatRequest {
                lease_id,
                in_flight: self.stats.in_flight() as u32,
                queued: self.stats.queued() as u32,
                kv_cache_usage: 0.0,
                tokens_per_second: self.stats.last_tps_milli.load(Ordering::Relaxed) as f32
                    / 1000.0,
                device_memory_bytes: 0,
            };
            match client.heartbeat(self.req(hb)).await {
                Ok(r) if r.get_ref().command == Command::Drain as i32 => return true,
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {
                    tracing::warn!("lease lost ({}); registering again", s.message());
                    return false;
                }
                Err(s) => tracing::warn!("heartbeat failed: {}", s.message()),
            }
        }
    }

    /// Announces a drain with a deadline (best effort).
    pub async fn drain(&self, deadline_s: u32, reason: &str) {
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

    /// Leaves routing (best effort).
    pub async fn deregister(&self) {
        let Some(lease_id) = self.lease.lock().await.take() else {
            return;
        };
        if let Ok(mut c) = self.client().await {
            let _ = c.deregister(self.req(DeregisterRequest { lease_id })).await;
        }
    }
}
