//! The pingora `ProxyHttp` implementation: the request's lifecycle, each stage in its own
//! module. Read top to bottom, [`SwitchyardProxy::handle`] is the lifecycle:
//!
//! [`admit`](crate::admit) → [`body`](crate::body) → [`classify`](crate::classify) →
//! route (`CompiledRules::route`) → [`failover`](crate::failover) (over
//! [`select`](crate::select) and [`attempt`](crate::attempt)) → [`relay`](crate::relay)
//! → [`log`](crate::log).
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
use std::time::Instant;

use async_trait::async_trait;
use pingora::connectors::http::v1::Connector;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;

use crate::classify::{self, Classifier};
use crate::ctx::RequestCtx;
use crate::error::ProxyError;
use crate::state::Shared;
use crate::{admit, body, failover, log, respond};

pub struct SwitchyardProxy {
    pub shared: Arc<Shared>,
    /// Workers are spoken to over HTTP/1.1 (their peers offer only h1 in TLS), so the
    /// HTTP/1 connector: its pooled-connection lookup is a small future of its own, where
    /// the umbrella connector's one future also holds every way of making a connection.
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

#[async_trait]
impl ProxyHttp for SwitchyardProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(&self.shared.active_requests)
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
        let trace = ctx.trace.take();
        let cost_usd = log::record(
            &self.shared,
            ctx,
            e,
            trace.as_ref().map(|t| t.trace_id()).as_deref(),
        );
        if let Some(t) = trace {
            crate::trace::finish(*t, &self.shared, ctx, cost_usd, e);
        }
        // completion tokens count against the tenant's tokens per minute once reported
        if let (Some(admitted), Some(tokens)) = (&ctx.admitted, ctx.completion_tokens) {
            self.shared
                .limiters
                .charge_completion(admitted, tokens)
                .await;
        }
    }
}

/// Bodies beyond this are parsed on a blocking thread: a 30 MB body takes long enough to
/// parse that the event loop's other requests would stall behind it.
const PARSE_ON_LOOP_BYTES: usize = 256 * 1024;

/// The body parsed: on the event loop when small, on a blocking thread when large.
async fn parse_body(
    endpoint: routing_rules::Endpoint,
    body: &bytes::Bytes,
) -> std::result::Result<classify::Parsed, ProxyError> {
    if body.len() <= PARSE_ON_LOOP_BYTES {
        return classify::parse(endpoint, body);
    }
    let body = body.clone();
    tokio::task::spawn_blocking(move || classify::parse(endpoint, &body))
        .await
        .unwrap_or_else(|_| {
            Err(ProxyError::BadRequest(
                "the body could not be parsed".into(),
                None,
            ))
        })
}

impl SwitchyardProxy {
    /// The lifecycle of one request.
    async fn handle(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let shared = &self.shared;
        if let Some(otel) = &shared.otel {
            let head = session.req_header();
            let t = crate::trace::RequestTrace::start(
                otel,
                &head.headers,
                head.method.as_str(),
                head.uri.path(),
            );
            ctx.trace = Some(Box::new(t));
        }
        // 1. admit: header limit, loop guard, endpoint (`GET /v1/models` answered here)
        let Some(endpoint) = admit::admit(shared, session, ctx).await? else {
            return Ok(());
        };
        // the tenant, before the body is read: `auth: required` refuses a key no tenant
        // holds; a configured tenant's requests in flight and per minute are checked
        let (tenant, refused) = {
            let rules = shared.rules.load();
            let tenant =
                crate::tenants::tenant_of_headers(&rules.rules, &session.req_header().headers);
            let refused = match tenant.as_deref().and_then(|t| rules.rules.tenant(t)) {
                Some(t) => match shared.limiters.admit_request(t).await {
                    Ok(mut admitted) => {
                        ctx.ratelimit = std::mem::take(&mut admitted.headers);
                        ctx.admitted = Some(admitted);
                        None
                    }
                    Err(r) => Some((t.name.to_string(), r)),
                },
                None if rules.rules.auth() == routing_rules::Auth::Required => Some((
                    "other".to_string(),
                    crate::tenants::Refused {
                        error: ProxyError::InvalidApiKey,
                        headers: Vec::new(),
                    },
                )),
                None => None,
            };
            (tenant, refused)
        };
        if let Some((label, r)) = refused {
            shared
                .metrics
                .tenant_rejections(&label, crate::tenants::reason(&r.error));
            return respond::error_with(session, ctx, &r.error, r.headers).await;
        }
        // 2. body: whole, capped, reserved in the body budget
        let mut body = match body::read(shared, session).await? {
            Ok(b) => b,
            Err(e) => return respond::error(session, ctx, &e).await,
        };
        // 3. classify: parse, refuse unknown models, count tokens as far as rules need
        let t0 = Instant::now();
        let rules = shared.rules.load();
        let counters = shared.counters.load();
        let classifier = Classifier {
            rules: &rules.rules,
            counters: &counters,
            budget: shared.config.classify_budget,
        };
        let mut parsed = match parse_body(endpoint, &body.0).await {
            Ok(p) => p,
            Err(e) => return respond::error(session, ctx, &e).await,
        };
        classifier.read_head_with_tenant(&mut parsed, &session.req_header().headers, tenant);
        let model = &parsed.features.model;
        let tenant_denies_model = parsed
            .features
            .tenant
            .as_deref()
            .and_then(|t| rules.rules.tenant(t))
            .is_some_and(|t| !t.allows_model(model));
        if tenant_denies_model
            || rules.rules.model(model).is_none()
                && !shared
                    .registry
                    .snapshot()
                    .workers()
                    .any(|w| w.serves(model))
        {
            let e = ProxyError::UnknownModel(model.clone());
            ctx.classified.features = parsed.features;
            return respond::error(session, ctx, &e).await;
        }
        // a stream the client did not ask usage of still reports it, to the router
        let ask_usage = parsed.features.stream
            && !parsed.stream_options
            && endpoint != routing_rules::Endpoint::Embeddings;
        ctx.classified = classifier.count(parsed).await;
        shared.metrics.classify_by_exactness[usize::from(ctx.classified.exact)]
            .observe(t0.elapsed().as_secs_f64());
        if let Some(t) = &ctx.trace {
            let c = &ctx.classified;
            t.stage(
                "classify",
                t0,
                vec![
                    opentelemetry::KeyValue::new(
                        "gen_ai.usage.input_tokens",
                        i64::try_from(c.features.prompt_tokens).unwrap_or(i64::MAX),
                    ),
                    opentelemetry::KeyValue::new("switchyard.tokens_exact", c.exact),
                ],
            );
        }
        // the prompt alone cannot fit the model: no worker could take it
        if let Some(m) = rules.rules.model(ctx.model())
            && ctx.classified.prompt_tokens_lower > u64::from(m.context_window)
        {
            let e = ProxyError::ContextLengthExceeded {
                window: m.context_window,
                at_least: ctx.classified.prompt_tokens_lower,
                param: match ctx.endpoint {
                    Some(routing_rules::Endpoint::Completions) => "prompt",
                    Some(routing_rules::Endpoint::Embeddings) => "input",
                    _ => "messages",
                },
            };
            return respond::error(session, ctx, &e).await;
        }
        // the tenant's prompt tokens per minute, now that they are counted
        if let Some(tenant) = ctx
            .classified
            .features
            .tenant
            .as_deref()
            .and_then(|t| rules.rules.tenant(t))
        {
            match shared
                .limiters
                .admit_tokens(tenant, ctx.classified.features.prompt_tokens)
                .await
            {
                Ok(headers) => ctx.ratelimit.extend(headers),
                Err(refused) => {
                    shared
                        .metrics
                        .tenant_rejections(&tenant.name, crate::tenants::reason(&refused.error));
                    drop(rules);
                    return respond::error_with(session, ctx, &refused.error, refused.headers)
                        .await;
                }
            }
        }
        // 4. route: the first rule that matches gives the ordered target pools
        let t_route = Instant::now();
        let decision = rules.rules.route(&ctx.classified.features);
        if decision.targets.is_empty()
            && let Some(tenant) = ctx
                .classified
                .features
                .tenant
                .as_deref()
                .and_then(|t| rules.rules.tenant(t))
                .filter(|t| t.pools.is_some())
        {
            let e = ProxyError::PoolNotAllowed {
                tenant: tenant.name.to_string(),
                rule: decision.rule.to_string(),
            };
            drop(rules);
            ctx.decision = Some(decision);
            return respond::error(session, ctx, &e).await;
        }
        drop(rules);
        if let Some(t) = &ctx.trace {
            let targets: Vec<&str> = decision.targets.iter().map(|p| &**p).collect();
            t.stage(
                "route",
                t_route,
                vec![
                    opentelemetry::KeyValue::new("switchyard.rule", decision.rule.to_string()),
                    opentelemetry::KeyValue::new("switchyard.targets", targets.join(",")),
                ],
            );
        }
        if ask_usage && let Some(asked) = crate::usage::ask_for_usage(&body.0) {
            body.0 = asked;
            ctx.usage_asked = true;
        }
        ctx.body = Some(body);
        // 5. select, attempt, fail over; 6. relay the answer. Boxed, as are the relay and the
        // rarer paths inside: async_trait allocates this lifecycle's future per request, and
        // with every stage inline it was 65 KB, which mimalloc served from pages it had just
        // returned to the OS (a page fault per request, 4 % of the router's CPU at c=32).
        let forwarded = Box::pin(failover::forward(self, session, ctx, &decision)).await;
        ctx.decision = Some(decision);
        forwarded
    }
}
