//! The admin listener (loopback by default): `/healthz`, `/readyz`, `/metrics`,
//! `/admin/workers`, `/admin/pools`, `/admin/rules`, `POST /admin/reload` (also
//! `/admin/rules/reload`), `POST /admin/explain`, and `/admin/registry/leases` for the
//! process that replaces this one in an upgrade.
//!
//! With an admin token (`--admin-token`, required when the listener is reachable beyond
//! loopback), every `/admin/*` route wants `Authorization: Bearer <token>`; `/healthz`,
//! `/readyz` and `/metrics` stay open for probes and scrapers (their labels are bounded).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::classify::Classifier;
use crate::error::{ProxyError, openai_body};
use crate::select::{self, Ask};
use crate::state::Shared;

/// The admin API. `token`: the bearer token `/admin/*` requires, if any.
pub fn router(shared: Arc<Shared>, token: Option<String>) -> Router {
    let admin = Router::new()
        .route("/admin/workers", get(workers))
        .route("/admin/pools", get(pools))
        .route("/admin/rules", get(rules))
        .route("/admin/reload", post(reload))
        .route("/admin/rules/reload", post(reload))
        .route("/admin/explain", post(explain))
        .route("/admin/registry/leases", get(leases))
        .route("/admin/tenants", get(tenants))
        .route("/admin/cost", get(cost))
        .route("/admin/drift", get(drift))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(admin)
        .with_state(shared)
}

/// An OpenAI-shaped error answer.
fn error(status: StatusCode, message: &str, code: &str) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        openai_body(message, kind, code, None),
    )
        .into_response()
}

/// Lets a request through when no token is configured, or it presents the token.
async fn require_token(
    State(token): State<Arc<Option<String>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use subtle::ConstantTimeEq;
    if let Some(token) = token.as_deref() {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
            return error(
                StatusCode::UNAUTHORIZED,
                "the admin API needs its token: Authorization: Bearer <admin token>",
                "invalid_api_key",
            );
        }
    }
    next.run(req).await
}

/// Both ends of an admin connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

impl Peer {
    /// A caller on this host: loopback, or this host connecting to its own address.
    pub fn same_host(&self) -> bool {
        self.remote.ip().is_loopback() || self.remote.ip() == self.local.ip()
    }
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        let remote = *s.remote_addr();
        Self {
            remote,
            local: s.io().local_addr().unwrap_or(remote),
        }
    }
}

/// The registered workers' leases, for `switchyard serve --upgrade`: the new process takes
/// them over so routing has no gap. Only callers on this host (the listening sockets are
/// handed over on this host anyway).
async fn leases(State(s): State<Arc<Shared>>, ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    if !peer.same_host() {
        return error(
            StatusCode::FORBIDDEN,
            "leases are handed only to a process on this host",
            "forbidden",
        );
    }
    axum::Json(s.registry.export()).into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let snap = s.registry.snapshot();
    let gauge = &s.metrics.workers;
    gauge.reset();
    for pool in s.rules.load().rules.pools() {
        for state in ["live", "draining", "unhealthy", "ejected"] {
            gauge.with_label_values(&[&*pool.name, state]).set(0);
        }
    }
    for w in snap.workers() {
        gauge
            .with_label_values(&[&*w.pool, w.routing_state()])
            .inc();
    }
    s.metrics.set_pool_demand(
        s.rules.load().rules.pools().iter().map(|p| &*p.name),
        snap.workers().map(|w| &**w),
    );
    s.metrics.body_bytes.set(s.body_budget.in_use() as i64);
    let dropped = crate::logging::dropped_lines();
    let counted = s.metrics.log_lines_dropped.get();
    s.metrics
        .log_lines_dropped
        .inc_by(dropped.saturating_sub(counted));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// Every configured tenant: its limits and, where it has sent requests, what it uses now.
async fn tenants(State(s): State<Arc<Shared>>) -> Response {
    let rules = s.rules.load();
    let list: Vec<_> = rules
        .rules
        .tenants()
        .iter()
        .map(|t| {
            let usage = s.limiters.usage(&t.name);
            json!({
                "name": &*t.name,
                "limits": {
                    "requests_per_minute": t.limits.requests_per_minute,
                    "tokens_per_minute": t.limits.tokens_per_minute,
                    "max_concurrent": t.limits.max_concurrent,
                    "budget_usd_per_day": t.limits.budget_nano_usd_per_day.map(|n| n.get() as f64 / 1e9),
                    "budget_usd_per_month": t.limits.budget_nano_usd_per_month.map(|n| n.get() as f64 / 1e9),
                    "breaker": t.limits.breaker,
                },
                "in_flight": usage.map_or(0, |u| u.in_flight),
                "breaker": usage.map_or("closed", |u| u.breaker),
                "spent_today_usd": usage.map_or(0.0, |u| u.spent_today_usd),
                "spent_this_month_usd": usage.map_or(0.0, |u| u.spent_this_month_usd),
            })
        })
        .collect();
    axum::Json(json!({ "auth": rules.rules.auth(), "tenants": list })).into_response()
}

/// `GET /admin/cost?window=60&by=tenant,model,pool&baseline=h100-ondemand`: what the
/// traffic of the last `window` minutes (default 60, at most a day) cost, grouped `by`
/// (default: all three), against running it all on `baseline` (default: the dearest
/// on-demand pool). See [`crate::cost`].
async fn cost(
    State(s): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let bad = |m: String| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": { "message": m, "type": "invalid_request_error" } })),
        )
            .into_response()
    };
    let window = match q.get("window").map(|w| w.parse::<u64>()) {
        None => 60,
        Some(Ok(w)) if (1..=24 * 60).contains(&w) => w,
        Some(_) => return bad("`window` is minutes, 1 to 1440".into()),
    };
    let by = match crate::cost::By::parse(q.get("by").map_or("tenant,model,pool", String::as_str)) {
        Ok(by) => by,
        Err(e) => return bad(e),
    };
    let rules = s.rules.load();
    let pools = rules.rules.pools();
    let baseline = match q.get("baseline") {
        Some(name) => match pools.iter().find(|p| &*p.name == name.as_str()) {
            Some(p) => p,
            None => return bad(format!("no pool `{name}` in the rules")),
        },
        None => match pools
            .iter()
            .filter(|p| p.capacity == routing_rules::Capacity::OnDemand)
            .max_by(|a, b| a.cost_per_hour.total_cmp(&b.cost_per_hour))
        {
            Some(p) => p,
            None => return bad("no on-demand pool to compare with: name one as `baseline`".into()),
        },
    };
    let totals = s
        .ledger
        .since(crate::cost::minute_now().saturating_sub(window - 1));
    let report = crate::cost::report(
        &totals,
        window,
        by,
        (&baseline.name, baseline.cost_per_hour),
    );
    axum::Json(report).into_response()
}

async fn workers(State(s): State<Arc<Shared>>) -> Response {
    let snap = s.registry.snapshot();
    let now = Instant::now();
    let mut list: Vec<_> = snap
        .workers()
        .map(|w| {
            json!({
                "id": w.id, "pool": w.pool, "state": w.state, "routing_state": w.routing_state(),
                "address": w.address.to_string(),
                "load": w.load(), "reported_load": w.reported_load.load(std::sync::atomic::Ordering::Relaxed),
                "router_in_flight": w.router_in_flight.load(std::sync::atomic::Ordering::Relaxed),
                "reported": w.report.json(),
                "max_concurrency": w.max_concurrency.load(std::sync::atomic::Ordering::Relaxed),
                "models": w.models, "device": w.device, "engine": w.engine, "static": w.is_static,
                "lease_age_s": now.duration_since(w.registered_at).as_secs_f64(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    axum::Json(list).into_response()
}

/// Ready when some pool of the live rules has a worker that takes requests: what a load
/// balancer in front of several routers should check.
async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let snap = s.registry.snapshot();
    let loaded = s.rules.load();
    let ready: Vec<&str> = loaded
        .rules
        .pools()
        .iter()
        .filter(|p| {
            snap.by_pool
                .get(&p.name)
                .is_some_and(|ws| ws.iter().any(|w| w.routing_state() == "live"))
        })
        .map(|p| &*p.name)
        .collect();
    let shutting_down = s.shutting_down.load(std::sync::atomic::Ordering::Relaxed);
    let is_ready = !ready.is_empty() && !shutting_down;
    let status = if is_ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": is_ready, "shutting_down": shutting_down,
        "pools_with_capacity": ready, "rules_generation": loaded.generation,
    });
    (status, axum::Json(body)).into_response()
}

/// Every pool of the live rules with its price, capacity type and workers by state.
async fn pools(State(s): State<Arc<Shared>>) -> Response {
    let snap = s.registry.snapshot();
    let loaded = s.rules.load();
    let list: Vec<_> = loaded
        .rules
        .pools()
        .iter()
        .map(|p| {
            let workers = snap
                .by_pool
                .get(&p.name)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let count = |state: &str| {
                workers
                    .iter()
                    .filter(|w| w.routing_state() == state)
                    .count()
            };
            let load: u64 = workers.iter().map(|w| u64::from(w.load())).sum();
            json!({
                "name": p.name, "class": p.class, "capacity": p.capacity,
                "cost_per_hour": p.cost_per_hour, "labels": p.labels, "static_workers": p.workers,
                "workers": {
                    "live": count("live"), "draining": count("draining"),
                    "unhealthy": count("unhealthy"), "ejected": count("ejected"),
                },
                "load": load,
            })
        })
        .collect();
    axum::Json(list).into_response()
}

#[derive(serde::Deserialize)]
struct ExplainQuery {
    endpoint: Option<String>,
}

/// The header that carries the explained request's `authorization` (on this listener,
/// `authorization` authenticates the admin caller when a token is set).
pub const EXPLAIN_AUTHORIZATION: &str = "x-switchyard-explain-authorization";

/// `POST /admin/explain[?endpoint=/v1/completions]` with a request body and the request's
/// headers: the features the router reads from it (the same classifier as live traffic),
/// the rule it matches, and for each target pool how many workers could take it right now.
/// The explained request's API key goes in `x-switchyard-explain-authorization` (or in
/// `authorization` when the admin API has no token). Nothing is forwarded.
async fn explain(
    State(s): State<Arc<Shared>>,
    Query(q): Query<ExplainQuery>,
    mut head: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let endpoint = q.endpoint.as_deref().unwrap_or("/v1/chat/completions");
    let Some(endpoint) = crate::classify::endpoint_of(endpoint) else {
        let e = ProxyError::NotFound(endpoint.to_string());
        return (StatusCode::NOT_FOUND, e.body()).into_response();
    };
    if let Some(key) = head.remove(EXPLAIN_AUTHORIZATION) {
        head.insert(header::AUTHORIZATION, key);
    }
    let loaded = s.rules.load();
    let counters = s.counters.load();
    let classifier = Classifier {
        rules: &loaded.rules,
        counters: &counters,
        budget: s.config.classify_budget,
    };
    let explained = match classifier.explain(endpoint, &head, &body).await {
        Ok(v) => v,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                e.body(),
            )
                .into_response();
        }
    };
    let snap = s.registry.snapshot();
    let features = &explained.classified.features;
    let ask = Ask {
        model: &features.model,
        modalities: features.modalities,
        tried: &[],
        continuation: false,
    };
    // a rule with a latency objective: the route as the SLO-aware choice orders it now
    let slo = explained.decision.slo_ttft_p95.map(|objective| {
        let utilization = |p: &str| crate::slo::utilization(&snap, p);
        let views = s
            .slo
            .views(&explained.decision.targets, objective, &utilization, false);
        let mut order: Vec<&crate::slo::PoolView> = views.iter().filter(|v| !v.spilling).collect();
        order.extend(views.iter().filter(|v| v.spilling));
        let order: Vec<Arc<str>> = order.into_iter().map(|v| Arc::clone(&v.pool)).collect();
        (objective, views, order)
    });
    let route: Vec<Arc<str>> = match &slo {
        Some((_, _, order)) => order.clone(),
        None => explained.decision.targets.to_vec(),
    };
    let counts: Vec<(&str, usize, usize)> = route
        .iter()
        .map(|pool| {
            let (healthy, live) = select::count(&snap, pool, &ask);
            (&**pool, healthy, live)
        })
        .collect();
    let targets: Vec<_> = counts
        .iter()
        .map(|(pool, healthy, _)| json!({ "pool": pool, "routable_workers": healthy }))
        .collect();
    // what the failover loop does: the first pool with a healthy worker, else the first
    // with any live one
    let would_serve = counts
        .iter()
        .find(|c| c.1 > 0)
        .or_else(|| counts.iter().find(|c| c.2 > 0))
        .map(|c| c.0);
    let mut out = explained.to_json();
    out["targets_now"] = json!(targets);
    out["would_serve"] = json!(would_serve);
    if let Some((objective, views, _)) = &slo {
        out["slo"] = json!({
            "ttft_p95_ms": objective.as_millis() as u64,
            "pools": views,
        });
    }
    out["rules_generation"] = json!(loaded.generation);
    axum::Json(out).into_response()
}

async fn rules(State(s): State<Arc<Shared>>) -> Response {
    let l = s.rules.load();
    let rules: Vec<_> = l
        .rules
        .rules()
        .iter()
        .map(|r| json!({ "name": r.name, "route": r.targets }))
        .collect();
    axum::Json(json!({
        "generation": l.generation,
        "path": s.rules.path().display().to_string(),
        "pools": l.rules.pools(),
        "rules": rules,
        "last_reload": s.last_reload.lock().ok().and_then(|l| l.clone()),
    }))
    .into_response()
}

async fn reload(State(s): State<Arc<Shared>>) -> Response {
    let shared = Arc::clone(&s);
    let result =
        tokio::task::spawn_blocking(move || shared.reload_now().map_err(|e| e.problems())).await;
    match result {
        Ok(Ok(_)) => axum::Json(json!({ "generation": s.rules.generation() })).into_response(),
        Ok(Err(problems)) => {
            // OpenAI's error shape, with every problem listed beside it
            let mut body = json!({ "error": {
                "message": "rules rejected; the previous rules keep serving",
                "type": "invalid_request_error", "code": "rules_rejected", "param": null,
            }});
            body["problems"] = json!(problems);
            (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response()
        }
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the reload failed",
            "internal_error",
        ),
    }
}

/// Each tenant's drift ([`crate::drift`]): the last window against its baseline.
async fn drift(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(serde_json::json!({
        "window_s": s.drift.window().as_secs_f64(),
        "tenants": s.drift.report(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::Peer;

    #[test]
    fn leases_go_only_to_callers_on_this_host() {
        let peer = |remote: &str, local: &str| Peer {
            remote: remote.parse().unwrap(),
            local: local.parse().unwrap(),
        };
        assert!(peer("127.0.0.1:5000", "127.0.0.1:9090").same_host());
        assert!(peer("[::1]:5000", "[::1]:9090").same_host());
        // this host calling its own network address
        assert!(peer("10.0.0.5:5000", "10.0.0.5:9090").same_host());
        assert!(!peer("10.0.0.6:5000", "10.0.0.5:9090").same_host());
    }
}
