//! The admin listener (loopback by default): `/healthz`, `/metrics`, `/admin/workers`,
//! `/admin/rules`, `POST /admin/reload`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::state::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/admin/workers", get(workers))
        .route("/admin/rules", get(rules))
        .route("/admin/reload", post(reload))
        .with_state(shared)
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
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
                "id": w.id, "pool": w.pool, "state": w.state, "address": w.address.to_string(),
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
    }))
    .into_response()
}

async fn reload(State(s): State<Arc<Shared>>) -> Response {
    let shared = Arc::clone(&s);
    let result = tokio::task::spawn_blocking(move || {
        let r = shared.rules.reload();
        shared.on_reload(&r);
        r.map_err(|e| e.problems())
    })
    .await;
    match result {
        Ok(Ok(_)) => axum::Json(json!({ "generation": s.rules.generation() })).into_response(),
        Ok(Err(problems)) => (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(json!({ "error": "rules rejected; the previous rules keep serving", "problems": problems }))).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
