//! The admin listener (loopback by default): `/healthz`, `/readyz`, `/metrics`,
//! `/admin/workers`, `/admin/pools`, `/admin/rules`, `POST /admin/reload` (also
//! `/admin/rules/reload`), `POST /admin/explain`, and `/admin/registry/leases` for the
//! process that replaces this one in an upgrade.

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

use crate::error::ProxyError;
use crate::state::Shared;
use crate::upstream::takes;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/workers", get(workers))
        .route("/admin/pools", get(pools))
        .route("/admin/rules", get(rules))
        .route("/admin/reload", post(reload))
        .route("/admin/rules/reload", post(reload))
        .route("/admin/explain", post(explain))
        .route("/admin/registry/leases", get(leases))
        .with_state(shared)
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
        let body = json!({"error": {
            "message": "leases are handed only to a process on this host",
            "type": "invalid_request_error", "code": "forbidden", "param": null,
        }});
        return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
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
    s.metrics.body_bytes.set(s.body_budget.in_use() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
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
                "models": w.models, "device": w.device, "static": w.is_static,
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

/// `POST /admin/explain[?endpoint=/v1/completions]` with a request body: the features the
/// router reads from it, the rule it matches, and for each target pool how many workers
/// could take it right now. Nothing is forwarded.
async fn explain(
    State(s): State<Arc<Shared>>,
    Query(q): Query<ExplainQuery>,
    body: axum::body::Bytes,
) -> Response {
    let endpoint = q.endpoint.as_deref().unwrap_or("/v1/chat/completions");
    let Some(endpoint) = crate::classify::endpoint_of(endpoint) else {
        let e = ProxyError::NotFound(endpoint.to_string());
        return (StatusCode::NOT_FOUND, e.body()).into_response();
    };
    let loaded = s.rules.load();
    let counter = |model: &str| s.counters.load().get(model).cloned();
    let explained = match crate::classify::explain(
        &loaded.rules,
        counter,
        endpoint,
        &body,
        s.config.classify_budget,
    )
    .await
    {
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
    let model = explained.features.model.clone();
    let modalities = explained.features.modalities;
    let targets: Vec<_> = explained
        .decision
        .targets
        .iter()
        .map(|pool| {
            let n = snap
                .by_pool
                .get(&**pool)
                .into_iter()
                .flatten()
                .filter(|w| takes(w, &model, modalities, &[]) && !w.health.is_excluded())
                .count();
            json!({ "pool": pool, "routable_workers": n })
        })
        .collect();
    let would_serve = targets
        .iter()
        .find(|t| t["routable_workers"].as_u64().unwrap_or(0) > 0)
        .map(|t| t["pool"].clone());
    let mut out = explained.to_json();
    out["targets_now"] = json!(targets);
    out["would_serve"] = would_serve.unwrap_or(serde_json::Value::Null);
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
        Ok(Err(problems)) => (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(json!({ "error": "rules rejected; the previous rules keep serving", "problems": problems }))).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
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
