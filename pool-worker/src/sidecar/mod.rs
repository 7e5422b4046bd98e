//! Registration sidecar: `switchyard-worker --engine-url URL --engine KIND` stands for an
//! external engine (vLLM, sglang, TGI, llama.cpp's server, any OpenAI-compatible server)
//! running on the same host. It is control plane only — routers send requests straight to
//! the engine's address:
//!
//! 1. waits until the engine's health endpoint answers 200, then finds its models (ids and
//!    context windows) in its API ([`engines`]);
//! 2. registers the engine with every router like a worker of our own (pool, device,
//!    models, lease), heartbeating the load read from the engine's `/metrics` every poll;
//! 3. takes it out of routing (deregisters) as soon as the engine refuses connections — a
//!    dead engine leaves every router within one poll instead of a lease TTL — or fails
//!    its health check [`STRIKES`] times in a row (hung), and registers it again, models
//!    found anew, once it answers;
//! 4. on SIGTERM or `POST /admin/preempt` announces the drain to the routers, waits until
//!    the engine reports no request running or waiting (or the deadline), deregisters and
//!    exits. Engines without metrics (`openai`) cannot show that: the sidecar then waits
//!    the whole drain deadline.
//!
//! Its own HTTP listener (`--listen`) serves `/health`, `/metrics` and `/admin/preempt`
//! with the worker's semantics, so `switchyard preempt --worker` works on it too.

pub mod engines;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::{Gauge, IntGauge};
use proto::ServedModel;

use crate::registration::{Load, LoadSource, Models};
use crate::routers::Routers;
pub use engines::EngineKind;

/// How to reach and describe the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `http://host:port` of the engine's OpenAI API (no path).
    pub url: String,
    pub kind: EngineKind,
    /// The engine's API key (vLLM `--api-key`), sent on its `/v1` calls.
    pub api_key: Option<String>,
    /// Context window to register when the engine does not say it.
    pub max_context: Option<u32>,
    pub modalities: Vec<String>,
    /// How often health and metrics are read.
    pub poll: Duration,
}

/// The engine's load as last read: what heartbeats report and the sidecar's `/metrics`
/// export (one prometheus registry of its own).
#[derive(Debug)]
pub struct EngineLoad {
    registry: prometheus::Registry,
    up: IntGauge,
    running: IntGauge,
    waiting: IntGauge,
    kv_cache: Gauge,
    tokens_per_second: Gauge,
    prefix_hit_rate: Gauge,
}

impl LoadSource for EngineLoad {
    fn load(&self) -> Load {
        let count = |g: &IntGauge| u32::try_from(g.get().max(0)).unwrap_or(u32::MAX);
        Load {
            in_flight: count(&self.running),
            queued: count(&self.waiting),
            kv_cache_usage: self.kv_cache.get() as f32,
            tokens_per_second: self.tokens_per_second.get() as f32,
            prefix_cache_hit_rate: self.prefix_hit_rate.get() as f32,
            ..Load::default()
        }
    }
}

impl EngineLoad {
    pub fn new() -> prometheus::Result<Self> {
        let registry = prometheus::Registry::new();
        let int = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let up = int(
            "switchyard_sidecar_engine_up",
            "Whether the engine answers its health check.",
        )?;
        let running = int(
            "switchyard_sidecar_engine_requests_running",
            "Requests the engine runs, from its metrics.",
        )?;
        let waiting = int(
            "switchyard_sidecar_engine_requests_waiting",
            "Requests waiting in the engine, from its metrics.",
        )?;
        let float = |name: &str, help: &str| -> prometheus::Result<Gauge> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let kv_cache = float(
            "switchyard_sidecar_engine_kv_cache_usage",
            "Fraction of the engine's KV cache in use.",
        )?;
        let tokens_per_second = float(
            "switchyard_sidecar_engine_tokens_per_second",
            "Tokens the engine generates per second.",
        )?;
        let prefix_hit_rate = float(
            "switchyard_sidecar_engine_prefix_cache_hit_rate",
            "Prompt tokens the engine found in its prefix cache, as a fraction of those looked up (0 when it reports none).",
        )?;
        Ok(Self {
            registry,
            up,
            running,
            waiting,
            kv_cache,
            tokens_per_second,
            prefix_hit_rate,
        })
    }

    /// Whether the engine passes its health check (as the sidecar last saw it).
    pub fn is_up(&self) -> bool {
        self.up.get() == 1
    }

    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    fn record(&self, s: &engines::Scrape, tps: f64) {
        let count = |x: f64| x.clamp(0.0, f64::from(u32::MAX)).round() as i64;
        self.running.set(count(s.running));
        self.waiting.set(count(s.waiting));
        self.kv_cache
            .set(s.kv_cache_usage.unwrap_or(0.0).clamp(0.0, 1.0));
        self.tokens_per_second.set(tps.max(0.0));
        self.prefix_hit_rate.set(s.prefix_hit_rate.unwrap_or(0.0));
    }

    fn busy(&self) -> i64 {
        self.running.get().max(0) + self.waiting.get().max(0)
    }

    fn encode(&self) -> prometheus::Result<Vec<u8>> {
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut out,
        )?;
        Ok(out)
    }
}

/// The sidecar's side of the engine's HTTP API.
pub struct Engine {
    pub cfg: EngineConfig,
    http: reqwest::Client,
    pub load: Arc<EngineLoad>,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .build()?;
        Ok(Self {
            cfg,
            http,
            load: Arc::new(EngineLoad::new()?),
        })
    }

    /// GET `path` of the engine, with its key.
    async fn send(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        let mut req = self.http.get(format!("{}{path}", self.cfg.url));
        if let Some(k) = &self.cfg.api_key {
            req = req.bearer_auth(k);
        }
        req.send().await
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response, String> {
        self.send(path)
            .await
            .map_err(|e| format!("{}{path}: {e}", self.cfg.url))
    }

    async fn get_json(&self, path: &str) -> Result<serde_json::Value, String> {
        let r = self.get(path).await?;
        if !r.status().is_success() {
            return Err(format!("{}{path}: {}", self.cfg.url, r.status()));
        }
        r.json()
            .await
            .map_err(|e| format!("{}{path}: not JSON: {e}", self.cfg.url))
    }

    /// Whether the engine answers its health check with 200.
    pub async fn healthy(&self) -> bool {
        self.probe().await.is_ok()
    }

    /// The engine's health check: `Err((refused, why))` when it fails, `refused` when
    /// nothing listens (the process is gone).
    pub async fn probe(&self) -> Result<(), (bool, String)> {
        let path = self.cfg.kind.health_path();
        let url = format!("{}{path}", self.cfg.url);
        match self.send(path).await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err((false, format!("{url}: {}", r.status()))),
            Err(e) => Err((e.is_connect(), format!("{url}: {e}"))),
        }
    }

    /// The engine's models with their context windows, and the requests it runs at once
    /// where it says so. A model whose window is found nowhere takes `--max-context`; with
    /// neither, discovery fails (the router must know the window to classify).
    pub async fn discover(&self) -> Result<(Vec<ServedModel>, Option<u32>), String> {
        let found = engines::models_from_list(&self.get_json("/v1/models").await?)?;
        let (info_ctx, slots) = match engines::info_path(self.cfg.kind) {
            Some(p) => match self.get_json(p).await {
                Ok(v) => engines::context_from_info(self.cfg.kind, &v),
                Err(e) => {
                    tracing::warn!("engine info: {e}");
                    (None, None)
                }
            },
            None => (None, None),
        };
        let mut models = Vec::with_capacity(found.len());
        for m in found {
            let max_context = self
                .cfg
                .max_context
                .or(info_ctx)
                .or(m.max_context)
                .ok_or_else(|| {
                    format!(
                        "the engine does not say model `{}`'s context window: pass --max-context",
                        m.id
                    )
                })?;
            models.push(ServedModel {
                name: m.id,
                max_context,
                modalities: self.cfg.modalities.clone(),
            });
        }
        Ok((models, slots))
    }

    /// Reads the engine's metrics once into [`Self::load`].
    pub async fn scrape(&self, rate: &mut engines::Rate) -> Result<(), String> {
        let Some(path) = self.cfg.kind.metrics_path() else {
            return Ok(());
        };
        let r = self.get(path).await?;
        if !r.status().is_success() {
            return Err(format!("{}{path}: {}", self.cfg.url, r.status()));
        }
        let text = r.text().await.map_err(|e| e.to_string())?;
        let s = self.cfg.kind.parse_metrics(&text)?;
        let tps = rate.update(Instant::now(), &s);
        self.load.record(&s, tps);
        Ok(())
    }

    /// Waits until the engine is healthy and its models are found (logging every 10 s).
    pub async fn wait_ready(&self) -> (Vec<ServedModel>, Option<u32>) {
        let start = Instant::now();
        let mut said = Instant::now();
        loop {
            let why = if self.healthy().await {
                match self.discover().await {
                    Ok(found) => return found,
                    Err(e) => e,
                }
            } else {
                format!(
                    "{}{} not healthy yet",
                    self.cfg.url,
                    self.cfg.kind.health_path()
                )
            };
            if said.elapsed() > Duration::from_secs(10) {
                tracing::info!(waited = ?start.elapsed(), "waiting for the engine: {why}");
                said = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Failed health checks in a row (timeouts, errors) that take an engine out of routing.
/// A refused connection takes it out at once: the process is gone. A busy engine may be
/// slow to answer its health check (vLLM's under load, sglang's generates a token), and
/// leaving routing gives up on every request still waiting on it.
const STRIKES: u32 = 3;

/// Polls the engine until the process ends: load into heartbeats; out of routing while it
/// fails its health check ([`STRIKES`] times in a row, or once when it refuses
/// connections), back in once it passes, its models found anew.
pub async fn watch(engine: Arc<Engine>, routers: Arc<Routers>, models: Models) {
    let mut rate = engines::Rate::default();
    let mut tick = tokio::time::interval(engine.cfg.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        tick.tick().await;
        let was_up = engine.load.is_up();
        if let Err((refused, why)) = engine.probe().await {
            failures += 1;
            if was_up && (refused || failures >= STRIKES) {
                tracing::warn!("the engine fails its health check ({why}): leaving routing");
                engine.load.set_up(false);
                routers.set_enabled(false);
            }
            continue;
        }
        failures = 0;
        if !was_up {
            match engine.discover().await {
                Ok((found, _)) => {
                    let names: Vec<&str> = found.iter().map(|m| m.name.as_str()).collect();
                    tracing::info!(models = ?names, "the engine is back: registering again");
                    if let Ok(mut m) = models.write() {
                        *m = found;
                    }
                    engine.load.set_up(true);
                    routers.set_enabled(true);
                }
                Err(e) => {
                    tracing::warn!("the engine answers but its models are not found: {e}");
                    continue;
                }
            }
        }
        if let Err(e) = engine.scrape(&mut rate).await {
            tracing::warn!("engine metrics: {e}");
        }
    }
}

/// The sidecar's HTTP state.
pub struct Admin {
    pub engine: Arc<Engine>,
    pub draining: AtomicBool,
    pub admin_token: Option<String>,
    /// The deadline of a preemption notice, once one came.
    pub preempted: tokio::sync::watch::Sender<Option<u32>>,
}

/// `/health` (503 while draining or while the engine is down), `/metrics`,
/// `/admin/preempt`.
pub fn router(state: Arc<Admin>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/preempt", post(preempt))
        .with_state(state)
}

async fn health(State(s): State<Arc<Admin>>) -> Response {
    if s.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if !s.engine.load.is_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "engine down").into_response()
    } else {
        "ok".into_response()
    }
}

async fn metrics(State(s): State<Arc<Admin>>) -> Response {
    match s.engine.load.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
        Err(e) => {
            tracing::warn!("metrics: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn preempt(
    State(s): State<Arc<Admin>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let deadline =
        match crate::api::preemption_notice(peer, s.admin_token.as_deref(), &headers, q.as_deref())
        {
            Ok(d) => d,
            Err(refused) => return *refused,
        };
    s.draining.store(true, Ordering::Relaxed);
    s.preempted.send_replace(Some(deadline));
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "draining": true, "deadline_s": deadline })),
    )
        .into_response()
}

/// Drains the engine out of routing: the routers stop sending it work at once; then the
/// sidecar waits until the engine reports nothing running or waiting (engines without
/// metrics: the whole `deadline`), and deregisters.
pub async fn drain(engine: &Engine, routers: &Routers, deadline: Duration, reason: &str) {
    let all = routers.all();
    futures::future::join_all(
        all.iter()
            .map(|r| r.drain(deadline.as_secs() as u32, reason)),
    )
    .await;
    let start = tokio::time::Instant::now();
    let end = start + deadline;
    let mut rate = engines::Rate::default();
    let metrics = engine.cfg.kind.metrics_path().is_some();
    loop {
        if tokio::time::Instant::now() >= end {
            tracing::warn!("drain deadline reached");
            break;
        }
        // idle is what a scrape made now says, never the last poll's figure; and only after
        // a second (a request routed just before the drain reached the routers may not
        // show in the engine's metrics at once)
        let read = metrics && engine.scrape(&mut rate).await.is_ok();
        let settled = start.elapsed() >= Duration::from_secs(1);
        if read && settled && engine.load.busy() == 0 {
            tracing::info!("the engine is idle");
            break;
        }
        // only a refused connection means the engine is gone (a slow one still works)
        if metrics && matches!(engine.probe().await, Err((true, _))) {
            tracing::info!("the engine is gone");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    futures::future::join_all(all.iter().map(|r| r.leave())).await;
}
