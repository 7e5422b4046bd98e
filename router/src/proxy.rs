//! The pingora `ProxyHttp` implementation. Thin: each stage calls `classify`, `route`,
//! `upstream` and the forwarding loop below.
//!
//! ## Why `request_filter` drives the upstream leg
//!
//! pingora 0.9 calls `upstream_peer` before the request body is read and only replays a body
//! that fits its fixed 64 KiB retry buffer. Switchyard must classify the whole body (token
//! count, modality) before choosing a pool, and must replay bodies of many megabytes on
//! failover. So the router reads the body itself (capped) in `request_filter`, then drives
//! each attempt with pingora's own HTTP `Connector` (pooled upstream connections), and writes
//! the chosen response to the downstream session unbuffered. Failover is possible until the
//! first response byte is written downstream; after that a broken stream ends with an SSE
//! error event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use routing_rules::{Endpoint, RetryOn, RouteDecision};

use crate::budget::Held;
use crate::classify::{self, Parsed};
use crate::error::ProxyError;
use crate::state::Shared;
use crate::upstream::{self, InFlight};

/// Per-request context: what `logging` reports.
pub struct RequestCtx {
    started: Instant,
    endpoint: Option<Endpoint>,
    model: Option<String>,
    tenant: Option<String>,
    decision: Option<RouteDecision>,
    pool: Option<Arc<str>>,
    attempts: u32,
    tried: Vec<String>,
    status: u16,
    exact: bool,
    prompt_tokens: u64,
    /// Completion tokens the worker reported in its answer's `usage`.
    completion_tokens: Option<u64>,
    /// Each attempt's pool and share of its worker's time (seconds), for cost.
    worker_seconds: Vec<(Arc<str>, f64)>,
    _active: Active,
}

/// Counts a request in `Shared::active_requests` while it lives.
struct Active(Arc<std::sync::atomic::AtomicUsize>);

impl Active {
    fn new(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(Arc::clone(counter))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

pub struct SwitchyardProxy {
    pub shared: Arc<Shared>,
    pub connector: Connector,
}

impl SwitchyardProxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            connector: Connector::new(None),
        }
    }
}

async fn respond(
    session: &mut Session,
    status: u16,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header("content-type", "application/json")?;
    h.insert_header("content-length", body.len().to_string())?;
    for (k, v) in extra {
        h.insert_header(*k, v.as_str())?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await
}

async fn respond_error(session: &mut Session, ctx: &mut RequestCtx, e: &ProxyError) -> Result<()> {
    ctx.status = e.status();
    let mut extra = Vec::new();
    if let Some(s) = e.retry_after() {
        extra.push(("retry-after", s.to_string()));
    }
    respond(session, e.status(), e.body(), &extra).await
}

/// Why an attempt failed, and whether it could be retried.
struct AttemptFailure {
    reason: RetryOn,
    message: String,
    /// The worker answered 429: it is healthy but full. That is not held against its
    /// health (ejecting busy workers under load would only shrink capacity further).
    overloaded: bool,
}

#[async_trait]
impl ProxyHttp for SwitchyardProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            endpoint: None,
            model: None,
            tenant: None,
            decision: None,
            pool: None,
            attempts: 0,
            tried: Vec::new(),
            status: 0,
            exact: false,
            prompt_tokens: 0,
            completion_tokens: None,
            worker_seconds: Vec::new(),
            _active: Active::new(&self.shared.active_requests),
        }
    }

    /// Never reached: `request_filter` answers every request itself (see the module docs).
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Err(Error::explain(
            InternalError,
            "switchyard drives upstreams from request_filter",
        ))
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if let Err(e) = self.handle(session, ctx).await {
            // An error answer could not even be attempted (downstream gone): let pingora log it.
            if ctx.status == 0 {
                ctx.status = 499;
            }
            return Err(e);
        }
        Ok(true)
    }

    async fn logging(
        &self,
        _session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        let m = &self.shared.metrics;
        let pool = ctx.pool.as_deref().unwrap_or("none");
        let rule = ctx.decision.as_ref().map(|d| &*d.rule).unwrap_or("none");
        let elapsed = ctx.started.elapsed();
        if ctx.endpoint.is_some() {
            m.requests
                .with_label_values(&[pool, rule, &ctx.status.to_string()])
                .inc();
            m.duration
                .with_label_values(&[pool])
                .observe(elapsed.as_secs_f64());
            if ctx.pool.is_some() {
                m.prompt_tokens
                    .with_label_values(&[pool])
                    .inc_by(ctx.prompt_tokens);
                if let Some(n) = ctx.completion_tokens {
                    m.completion_tokens.with_label_values(&[pool]).inc_by(n);
                }
            }
            // Every attempt's pool is charged its share of the worker's time, failed
            // attempts included: the worker spent it.
            if !ctx.worker_seconds.is_empty() {
                let rules = self.shared.rules.load();
                let tenant = ctx.tenant.as_deref().unwrap_or("anonymous");
                for (p, secs) in &ctx.worker_seconds {
                    if let Some(price) = rules.rules.pool(p).map(|p| p.cost_per_hour) {
                        m.cost
                            .with_label_values(&[p, tenant])
                            .inc_by(price * secs / 3600.0);
                    }
                }
            }
        }
        tracing::info!(
            status = ctx.status,
            model = ctx.model.as_deref().unwrap_or("-"),
            tenant = ctx.tenant.as_deref().unwrap_or("-"),
            rule,
            pool,
            attempts = ctx.attempts,
            prompt_tokens = ctx.prompt_tokens,
            exact = ctx.exact,
            ms = elapsed.as_secs_f64() * 1000.0,
            error = e.map(|e| e.to_string()).unwrap_or_default(),
            "request"
        );
    }
}

impl SwitchyardProxy {
    async fn handle(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let header_bytes: usize = session
            .req_header()
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        let limit = self.shared.config.max_header_bytes;
        if header_bytes > limit {
            return respond_error(session, ctx, &ProxyError::HeadersTooLarge { limit }).await;
        }
        let (method, path) = {
            let h = session.req_header();
            (h.method.clone(), h.uri.path().to_string())
        };
        let endpoint = match (method.as_str(), path.as_str()) {
            ("GET", "/v1/models") => return self.models(session, ctx).await,
            ("POST", "/v1/chat/completions") => Endpoint::ChatCompletions,
            ("POST", "/v1/completions") => Endpoint::Completions,
            ("POST", "/v1/embeddings") => Endpoint::Embeddings,
            (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models") => {
                return respond_error(session, ctx, &ProxyError::MethodNotAllowed).await;
            }
            _ => return respond_error(session, ctx, &ProxyError::NotFound(path)).await,
        };
        ctx.endpoint = Some(endpoint);
        ctx.tenant = classify::tenant_of(
            session
                .req_header()
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
        );

        // `held` keeps the body's bytes reserved in the global budget until a worker answers.
        let (body, held) = match self.read_body(session).await? {
            Ok(b) => b,
            Err(e) => return respond_error(session, ctx, &e).await,
        };
        let t0 = Instant::now();
        let mut parsed = match classify::parse(endpoint, &body) {
            Ok(p) => p,
            Err(e) => return respond_error(session, ctx, &e).await,
        };
        ctx.model = Some(parsed.features.model.clone());
        let rules = self.shared.rules.load();
        let snapshot = self.shared.registry.snapshot();
        let model_name = parsed.features.model.clone();
        let model = rules.rules.model(&model_name);
        if model.is_none() && !snapshot.workers().any(|w| w.serves(&model_name)) {
            return respond_error(session, ctx, &ProxyError::UnknownModel(model_name)).await;
        }
        parsed.features.tenant = ctx.tenant.clone();
        self.collect_headers(session, &mut parsed, &rules.rules);
        let counter = self.shared.counters.load().get(&model_name).cloned();
        ctx.exact = classify::count_tokens(
            &mut parsed,
            model,
            counter,
            &rules.rules,
            self.shared.config.classify_budget,
        )
        .await;
        ctx.prompt_tokens = parsed.features.prompt_tokens;
        self.shared
            .metrics
            .classify
            .with_label_values(&[if ctx.exact { "true" } else { "false" }])
            .observe(t0.elapsed().as_secs_f64());
        let decision = rules.rules.route(&parsed.features);
        ctx.decision = Some(decision.clone());
        drop(rules);
        self.forward(
            session,
            ctx,
            &decision,
            &parsed.features,
            &path,
            (body, held),
        )
        .await
    }

    fn collect_headers(
        &self,
        session: &Session,
        parsed: &mut Parsed,
        rules: &routing_rules::CompiledRules,
    ) {
        for name in rules.header_names() {
            if let Some(v) = session
                .req_header()
                .headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
            {
                parsed.features.headers.push((name.clone(), v.to_string()));
            }
        }
    }

    /// Reads the whole body under the byte cap and the global budget: Content-Length is
    /// checked (and reserved) before reading, chunked bodies are counted as they arrive.
    async fn read_body(
        &self,
        session: &mut Session,
    ) -> Result<std::result::Result<(Bytes, Held), ProxyError>> {
        let limit = self.shared.config.max_body_bytes;
        let budget = &self.shared.body_budget;
        let declared = session
            .req_header()
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Ok(Err(ProxyError::TooLarge { limit }));
        }
        // A declared body that cannot fit now is refused before reading it; otherwise bytes
        // are reserved as they arrive, so a client that declares much and sends little
        // holds only what it sent.
        if declared.is_some_and(|n| budget.in_use().saturating_add(n) > budget.limit()) {
            return Ok(Err(ProxyError::BodyBudget {
                limit: budget.limit(),
            }));
        }
        let Some(mut held) = budget.reserve(0) else {
            return Ok(Err(ProxyError::BodyBudget {
                limit: budget.limit(),
            }));
        };
        let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(4096).min(1 << 20));
        // The whole body must arrive within the body timeout (pingora's own timeout is per
        // read: a client dripping a byte a minute would hold its reservation forever).
        let deadline = tokio::time::Instant::now() + self.shared.config.body_timeout;
        loop {
            let read = session.as_downstream_mut().read_request_body();
            let Ok(next) = tokio::time::timeout_at(deadline, read).await else {
                return Ok(Err(ProxyError::BodyTimeout {
                    timeout: self.shared.config.body_timeout,
                }));
            };
            let Some(chunk) = next? else { break };
            let len = buf.len() + chunk.len();
            if len > limit {
                return Ok(Err(ProxyError::TooLarge { limit }));
            }
            if !held.grow_to(len) {
                return Ok(Err(ProxyError::BodyBudget {
                    limit: budget.limit(),
                }));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Ok((buf.freeze(), held)))
    }

    async fn models(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let snapshot = self.shared.registry.snapshot();
        let mut names: Vec<&str> = snapshot
            .workers()
            .flat_map(|w| w.models.iter().map(|m| m.name.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        let data: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({ "id": n, "object": "model", "created": 0, "owned_by": "switchyard" }))
            .collect();
        ctx.status = 200;
        let body = serde_json::json!({ "object": "list", "data": data }).to_string();
        respond(session, 200, Bytes::from(body), &[]).await
    }

    /// Tries the route's pools in order, failing over before the first byte reaches the client.
    async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        decision: &RouteDecision,
        features: &routing_rules::RequestFeatures,
        path: &str,
        (body, held): (Bytes, Held),
    ) -> Result<()> {
        let shared = &self.shared;
        shared.retry_budget.record_request();
        let snapshot = shared.registry.snapshot();
        let mut last_failure: Option<(Arc<str>, AttemptFailure)> = None;
        let mut targets = decision.targets.iter().peekable();
        while let Some(pool) = targets.peek().cloned() {
            if ctx.attempts >= decision.retry.max_attempts {
                break;
            }
            let Some(worker) = upstream::pick(
                &snapshot,
                pool,
                &features.model,
                features.modalities,
                &ctx.tried,
            ) else {
                targets.next(); // no (more) live workers here: next pool
                continue;
            };
            if let Some((from, f)) = &last_failure {
                if !decision.retry.retries_on(f.reason)
                    || !shared
                        .retry_budget
                        .try_retry(decision.retry.budget_ratio, decision.retry.budget_floor)
                {
                    break;
                }
                shared
                    .metrics
                    .retries
                    .with_label_values(&[from, pool, reason_name(f.reason)])
                    .inc();
                if !decision.retry.backoff.is_zero() {
                    tokio::time::sleep(decision.retry.backoff).await;
                }
            }
            ctx.attempts += 1;
            ctx.tried.push(worker.id.clone());
            let in_flight = InFlight::new(Arc::clone(&worker));
            let peer = self.peer(&worker);
            let t0 = Instant::now();
            let attempt = self.attempt(&peer, session, path, &body).await;
            match attempt {
                Ok((up, resp)) => {
                    worker.health.record_success();
                    shared
                        .metrics
                        .ttfb
                        .with_label_values(&[pool])
                        .observe(t0.elapsed().as_secs_f64());
                    ctx.pool = Some(pool.clone());
                    ctx.status = resp.status.as_u16();
                    // No failover after this point: the body and its reservation go now,
                    // not when a long stream ends.
                    drop((body, held));
                    let relayed = self.relay(session, ctx, decision, &peer, up, resp).await;
                    ctx.worker_seconds.push((pool.clone(), in_flight.finish()));
                    return relayed;
                }
                Err(f) => {
                    ctx.worker_seconds.push((pool.clone(), in_flight.finish()));
                    if !f.overloaded && worker.health.record_failure() {
                        tracing::warn!(worker = %worker.id, %pool, "worker ejected after {} consecutive failures", crate::registry::EJECT_AFTER);
                        shared.metrics.ejections.with_label_values(&[pool]).inc();
                    }
                    tracing::warn!(worker = %worker.id, %pool, reason = reason_name(f.reason), "attempt failed: {}", f.message);
                    last_failure = Some((pool.clone(), f));
                }
            }
        }
        let msg = match &last_failure {
            Some((pool, f)) => format!("every attempt failed (last: pool `{pool}`, {})", f.message),
            None => format!(
                "no live worker in any pool of rule `{}` ({})",
                decision.rule,
                decision.targets.join(", ")
            ),
        };
        respond_error(session, ctx, &ProxyError::NoCapacity(msg)).await
    }

    fn peer(&self, worker: &crate::registry::Worker) -> HttpPeer {
        let mut peer = HttpPeer::new(worker.address, false, String::new());
        let c = &self.shared.config;
        peer.options.connection_timeout = Some(c.connect_timeout);
        peer.options.read_timeout = Some(c.first_byte_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer
    }

    /// One attempt: send the buffered request; succeed only with a response header that is
    /// not a retryable failure. Nothing is written downstream here.
    async fn attempt(
        &self,
        peer: &HttpPeer,
        session: &Session,
        path: &str,
        body: &Bytes,
    ) -> std::result::Result<
        (
            pingora::protocols::http::client::HttpSession,
            ResponseHeader,
        ),
        AttemptFailure,
    > {
        let fail = |reason, e: &dyn std::fmt::Display| AttemptFailure {
            reason,
            message: e.to_string(),
            overloaded: false,
        };
        let mut req = RequestHeader::build("POST", path.as_bytes(), Some(6))
            .map_err(|e| fail(RetryOn::Connect, &e))?;
        let setup = (|| -> Result<()> {
            req.insert_header("host", peer._address.to_string())?;
            req.insert_header("content-type", "application/json")?;
            req.insert_header("content-length", body.len().to_string())?;
            for name in ["accept", "x-request-id", "traceparent"] {
                if let Some(v) = session.req_header().headers.get(name) {
                    req.insert_header(name, v.clone())?;
                }
            }
            Ok(())
        })();
        setup.map_err(|e| fail(RetryOn::Connect, &e))?;
        // A pooled connection the worker has closed fails at once: retry that on a fresh one.
        for fresh in [false, true] {
            let (mut up, reused) = self
                .connector
                .get_http_session(peer)
                .await
                .map_err(|e| fail(RetryOn::Connect, &e))?;
            // The connector does not apply the peer's read timeout: it bounds the wait for
            // the response header (first byte) and, later, each gap between body chunks.
            up.set_read_timeout(peer.options.read_timeout);
            up.set_write_timeout(Some(
                self.shared
                    .config
                    .connect_timeout
                    .max(Duration::from_secs(10)),
            ));
            let sent = async {
                up.write_request_header(Box::new(req.clone())).await?;
                up.write_request_body(body.clone(), true).await?;
                up.finish_request_body().await?;
                up.read_response_header().await
            }
            .await;
            match sent {
                Ok(()) => {
                    let Some(resp) = up.response_header().cloned() else {
                        return Err(fail(RetryOn::Reset, &"no response header"));
                    };
                    let status = resp.status.as_u16();
                    if status == 429 {
                        return Err(AttemptFailure {
                            reason: RetryOn::Preempted,
                            message: "worker is at capacity (429)".into(),
                            overloaded: true,
                        });
                    }
                    if status == 503 {
                        return Err(AttemptFailure {
                            reason: RetryOn::Preempted,
                            message: format!("worker answered {status}"),
                            overloaded: false,
                        });
                    }
                    if status >= 500 {
                        return Err(AttemptFailure {
                            reason: RetryOn::Status5xx,
                            message: format!("worker answered {status}"),
                            overloaded: false,
                        });
                    }
                    return Ok((up, resp));
                }
                Err(e) if reused && !fresh => {
                    tracing::debug!("pooled connection failed ({e}); retrying on a fresh one");
                    continue;
                }
                Err(e) => {
                    let reason = if matches!(e.etype(), ReadTimedout | WriteTimedout) {
                        RetryOn::Timeout
                    } else {
                        RetryOn::Reset
                    };
                    return Err(fail(reason, &e));
                }
            }
        }
        Err(fail(RetryOn::Reset, &"connection failed"))
    }

    /// Streams the chosen response downstream, unbuffered. After this point failover is no
    /// longer invisible: a broken SSE stream ends with an error event.
    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        decision: &RouteDecision,
        peer: &HttpPeer,
        mut up: pingora::protocols::http::client::HttpSession,
        upstream: ResponseHeader,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + 3))?;
        for (name, value) in upstream.headers.iter() {
            if !matches!(name.as_str(), "connection" | "keep-alive") {
                resp.append_header(name.clone(), value.clone())?;
            }
        }
        let sse = upstream
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if self.shared.config.debug_headers {
            resp.insert_header("x-switchyard-pool", ctx.pool.as_deref().unwrap_or_default())?;
            resp.insert_header("x-switchyard-rule", &*decision.rule)?;
            resp.insert_header("x-switchyard-attempts", ctx.attempts.to_string())?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        let deadline = ctx.started + self.shared.config.total_timeout;
        let pool = ctx.pool.clone().unwrap_or_else(|| Arc::from("none"));
        let mut usage = UsageScan::default();
        let mut first = true;
        loop {
            let next = tokio::time::timeout_at(deadline.into(), up.read_response_body()).await;
            let (message, code, status) = match next {
                Ok(Ok(Some(chunk))) => {
                    usage.feed(&chunk);
                    session.write_response_body(Some(chunk), false).await?;
                    if std::mem::take(&mut first) {
                        // What the client waited for its first token (or whole answer, when
                        // not streaming): classification and failover included.
                        self.shared
                            .metrics
                            .ttft
                            .with_label_values(&[&*pool])
                            .observe(ctx.started.elapsed().as_secs_f64());
                    }
                    continue;
                }
                Ok(Ok(None)) => {
                    ctx.completion_tokens = usage.completion_tokens;
                    break;
                }
                Ok(Err(e)) => (
                    format!("the worker failed mid-stream: {e}"),
                    "upstream_disconnected",
                    502,
                ),
                Err(_) => (
                    format!(
                        "the request passed the router's total timeout of {:?}",
                        self.shared.config.total_timeout
                    ),
                    "timeout",
                    504,
                ),
            };
            // After the first byte a failure cannot be hidden: an SSE stream ends with an
            // error event (never a silent cut), any other body is cut short.
            tracing::warn!(pool = ctx.pool.as_deref().unwrap_or("-"), "{message}");
            if sse {
                let ev = serde_json::json!({ "error": {
                    "message": message, "type": "server_error", "code": code, "param": null } });
                session
                    .write_response_body(Some(Bytes::from(format!("data: {ev}\n\n"))), false)
                    .await?;
            }
            ctx.status = status;
            ctx.completion_tokens = usage.completion_tokens;
            session.write_response_body(None, true).await?;
            up.shutdown().await;
            return Ok(());
        }
        session.write_response_body(None, true).await?;
        if up.response_done() {
            self.connector
                .release_http_session(up, peer, Some(Duration::from_secs(60)))
                .await;
        }
        Ok(())
    }
}

fn reason_name(r: RetryOn) -> &'static str {
    match r {
        RetryOn::Connect => "connect",
        RetryOn::Reset => "reset",
        RetryOn::Status5xx => "status_5xx",
        RetryOn::Preempted => "preempted",
        RetryOn::Timeout => "timeout",
    }
}

/// Finds `"completion_tokens": N` in a relayed answer (the last one wins: a stream's usage
/// chunk comes last), across chunk boundaries, without buffering the answer.
#[derive(Default)]
struct UsageScan {
    /// The end of the previous chunk, for a key split across two chunks.
    tail: Vec<u8>,
    completion_tokens: Option<u64>,
}

impl UsageScan {
    const KEY: &'static [u8] = b"\"completion_tokens\":";
    const KEEP: usize = 48;

    fn feed(&mut self, chunk: &[u8]) {
        if !self.tail.is_empty() {
            let mut seam = std::mem::take(&mut self.tail);
            seam.extend_from_slice(&chunk[..chunk.len().min(Self::KEEP)]);
            if let Some(n) = Self::find(&seam) {
                self.completion_tokens = Some(n);
            }
            seam.truncate(seam.len() - chunk.len().min(Self::KEEP));
            self.tail = seam;
        }
        if let Some(n) = Self::find(chunk) {
            self.completion_tokens = Some(n);
        }
        // keep the last KEEP bytes of (tail + chunk): a key may span several small chunks
        if chunk.len() >= Self::KEEP {
            self.tail.clear();
        }
        self.tail
            .extend_from_slice(&chunk[chunk.len().saturating_sub(Self::KEEP)..]);
        let excess = self.tail.len().saturating_sub(Self::KEEP);
        self.tail.drain(..excess);
    }

    /// The last complete `"completion_tokens": N` in `buf`.
    fn find(buf: &[u8]) -> Option<u64> {
        let mut found = None;
        for at in memchr::memmem::find_iter(buf, Self::KEY) {
            let rest = &buf[at + Self::KEY.len()..];
            let rest = &rest[rest.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            // a number cut by the end of the buffer is read again from the seam
            if digits > 0 && digits < rest.len() {
                found = std::str::from_utf8(&rest[..digits])
                    .ok()
                    .and_then(|d| d.parse().ok());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::UsageScan;

    #[test]
    fn completion_tokens_are_found_in_one_chunk_and_across_chunks() {
        let answer = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":345,"total_tokens":357}}"#;
        for split in 0..answer.len() {
            let mut u = UsageScan::default();
            u.feed(&answer[..split]);
            u.feed(&answer[split..]);
            assert_eq!(u.completion_tokens, Some(345), "split at {split}");
        }
        for size in 1..12 {
            let mut u = UsageScan::default();
            for c in answer.chunks(size) {
                u.feed(c);
            }
            assert_eq!(u.completion_tokens, Some(345), "{size}-byte chunks");
        }
        let mut u = UsageScan::default();
        u.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        assert_eq!(u.completion_tokens, None, "no usage, no count");
        u.feed(b"data: {\"usage\":{\"completion_tokens\": 7}}\n\ndata: [DONE]\n\n");
        assert_eq!(u.completion_tokens, Some(7));
    }
}
