//! Active health checks for static workers (pools that list addresses in the rules file).
//!
//! Registered workers prove they are alive with heartbeats; static workers cannot, so the
//! router asks them: `GET <path>` every interval, a 2xx answer within the interval (at most
//! 2 s) is healthy. A failed check takes the worker out of selection at once (state
//! `unhealthy`; like an ejected one, it is reached only when no pool of the route has a
//! healthy worker); the first passing check brings it back. A pool's `upstream.api_key` is
//! sent with the check; pools with `upstream.tls` are not checked actively (the checker
//! speaks plain HTTP): their workers rely on passive outlier detection (ejection).

use std::sync::Arc;
use std::time::Duration;

use crate::registry::Worker;
use crate::state::Shared;

pub async fn run(shared: Arc<Shared>, every: Duration, path: String) {
    let timeout = every.min(Duration::from_secs(2));
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("health checks disabled: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut checks = tokio::task::JoinSet::new();
        let upstreams = shared.upstreams.load_full();
        for w in shared.registry.statics() {
            let conn = upstreams.get(&w.pool).cloned();
            if conn.as_ref().is_some_and(|c| c.tls.is_some()) {
                continue; // HTTPS pools rely on passive outlier detection (see the module docs)
            }
            let (client, path, shared) = (client.clone(), path.clone(), Arc::clone(&shared));
            checks.spawn(async move { check(&shared, &client, &w, &path, conn.as_deref()).await });
        }
        while checks.join_next().await.is_some() {}
    }
}

async fn check(
    shared: &Shared,
    client: &reqwest::Client,
    w: &Worker,
    path: &str,
    conn: Option<&crate::upstream::PoolConn>,
) {
    let url = format!("http://{}{path}", w.address);
    let mut req = client.get(&url);
    if let Some(a) = conn.and_then(|c| c.authorization.as_ref()) {
        req = req.header(reqwest::header::AUTHORIZATION, a.as_bytes());
    }
    let failure = match req.send().await {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => Some(format!("answered {}", r.status())),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = &failure {
        shared
            .metrics
            .health_check_failures
            .with_label_values(&[&*w.pool])
            .inc();
        if w.health.set_down(true) {
            tracing::warn!(worker = %w.id, pool = %w.pool, "static worker unhealthy: {url} {why}");
        }
    } else if w.health.set_down(false) {
        tracing::info!(worker = %w.id, pool = %w.pool, "static worker healthy again");
    }
}
