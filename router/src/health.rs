//! Active health checks for static workers (pools that list addresses in the rules file).
//!
//! Registered workers prove they are alive with heartbeats; static workers cannot, so the
//! router asks them: `GET <path>` every interval, a 2xx answer within the interval (at most
//! 2 s) is healthy. A failed check takes the worker out of selection at once (state
//! `unhealthy`; like an ejected one, it is reached only when no pool of the route has a
//! healthy worker); the first passing check brings it back.
//!
//! A check goes the way requests go: through pingora's connector with the peer requests
//! use ([`crate::attempt::peer`]), so a pool's `upstream` settings apply to it — HTTPS
//! verified against the pool's CA, the router's client certificate, the `Host` and SNI,
//! and the pool's `api_key`. A worker whose certificate the pool does not trust fails its
//! check, as its requests would.

use std::sync::Arc;
use std::time::Duration;

use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;

use crate::registry::Worker;
use crate::state::Shared;

pub async fn run(shared: Arc<Shared>, every: Duration, path: String) {
    let timeout = every.min(Duration::from_secs(2));
    // a connector of its own: checks never take or leave a pooled request connection
    let connector = Arc::new(Connector::new(None));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut checks = tokio::task::JoinSet::new();
        let upstreams = shared.upstreams.load_full();
        for w in shared.registry.statics() {
            let conn = upstreams.get(&w.pool).cloned();
            let (connector, path, shared) =
                (Arc::clone(&connector), path.clone(), Arc::clone(&shared));
            checks.spawn(async move {
                check(&shared, &connector, timeout, &w, &path, conn.as_deref()).await
            });
        }
        while checks.join_next().await.is_some() {}
    }
}

async fn check(
    shared: &Shared,
    connector: &Connector,
    timeout: Duration,
    w: &Worker,
    path: &str,
    conn: Option<&crate::upstream::PoolConn>,
) {
    let mut peer = crate::attempt::peer(&shared.config, w, conn);
    peer.options.connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    let scheme = if conn.is_some_and(|c| c.tls.is_some()) {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}{path}", w.address);
    let asked = async {
        let (mut session, _) = connector.get_http_session(&peer).await?;
        let mut req = RequestHeader::build("GET", path.as_bytes(), Some(2))?;
        req.insert_header("host", crate::attempt::host(&peer))?;
        if let Some(a) = conn.and_then(|c| c.authorization.as_ref()) {
            req.insert_header(http::header::AUTHORIZATION, a.clone())?;
        }
        session.write_request_header(Box::new(req)).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let status = session.response_header().map(|h| h.status);
        session.shutdown().await;
        Ok::<_, pingora::BError>(status)
    };
    let failure = match tokio::time::timeout(timeout, asked).await {
        Ok(Ok(Some(s))) if s.is_success() => None,
        Ok(Ok(Some(s))) => Some(format!("answered {s}")),
        Ok(Ok(None)) => Some("no response header".to_string()),
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {timeout:?}")),
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
