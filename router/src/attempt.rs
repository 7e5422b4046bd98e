//! One attempt at one worker: the buffered request sent with pingora's HTTP connector
//! (pooled connections), the response header read. Nothing is written downstream here;
//! a failure is an [`AttemptError`] the failover loop decides on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use routing_rules::RetryOn;

use crate::admit::{HOP_HEADER, REQUEST_ID};
use crate::error::AttemptError;
use crate::registry::Worker;
use crate::state::Config;
use crate::upstream::PoolConn;

/// Request headers passed on to the worker as the client sent them.
const PASSED_ON: [&str; 2] = ["accept", "traceparent"];

/// The peer for `worker`, with the router's timeouts and its pool's connection settings
/// (`conn`: HTTPS, CA, client certificate). The peer's `sni` is the name the worker is
/// known by: the pool's `server_name`, the host name a static worker was listed by, or its
/// IP address; the request's `Host` follows it.
pub fn peer(config: &Config, worker: &Worker, conn: Option<&PoolConn>) -> HttpPeer {
    let tls = conn.and_then(|c| c.tls.as_ref());
    let name = tls
        .and_then(|t| t.server_name.clone())
        .or_else(|| worker.host.as_deref().map(str::to_string))
        .unwrap_or_else(|| worker.address.ip().to_string());
    let mut peer = HttpPeer::new(worker.address, tls.is_some(), name);
    if let Some(c) = conn {
        peer.group_key = c.group;
    }
    if let Some(t) = tls {
        peer.options.ca = t.ca.clone();
        peer.client_cert_key = t.client.clone();
    }
    peer.options.connection_timeout = Some(config.connect_timeout);
    peer.options.read_timeout = Some(config.first_byte_timeout);
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    peer
}

/// What one attempt sends.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    pub path: &'a str,
    pub body: &'a Bytes,
    /// The client's request head, for the headers passed on.
    pub client: &'a RequestHeader,
    /// The hop header's value: the client's, with this router's id added.
    pub hops: &'a str,
    /// The request's id (`x-request-id`).
    pub request_id: &'a str,
    /// The attempt's trace context, when traced (else the client's is passed on).
    pub traceparent: Option<&'a str>,
    /// The pool's credentials for its workers (never the client's).
    pub authorization: Option<&'a http::HeaderValue>,
}

/// Sends the request; succeeds only with a response header that is an answer (not 429,
/// 503 or another 5xx).
pub async fn attempt(
    connector: &Connector,
    config: &Config,
    worker: &Worker,
    peer: &HttpPeer,
    out: &Outgoing<'_>,
) -> std::result::Result<(HttpSession, ResponseHeader), AttemptError> {
    let req = request(peer, out).map_err(AttemptError::router)?;
    // A pooled connection the worker has closed fails at once: retry that on a fresh one.
    for fresh in [false, true] {
        let (mut up, reused) = connection(connector, config, worker, peer).await?;
        // The connector does not apply the peer's read timeout: it bounds the wait for
        // the response header (first byte) and, later, each gap between body chunks.
        up.set_read_timeout(peer.options.read_timeout);
        up.set_write_timeout(Some(config.connect_timeout.max(Duration::from_secs(10))));
        let sent = async {
            up.write_request_header(Box::new(req.clone())).await?;
            up.write_request_body(out.body.clone(), true).await?;
            up.finish_request_body().await?;
            up.read_response_header().await
        }
        .await;
        match sent {
            Ok(()) => {
                let Some(resp) = up.response_header().cloned() else {
                    return Err(AttemptError::network(RetryOn::Reset, "no response header"));
                };
                if let Some(e) = AttemptError::from_status(resp.status.as_u16()) {
                    return Err(e);
                }
                return Ok((up, resp));
            }
            // a pooled connection the worker closed: once more on another connection (a
            // timeout is not retried here: the worker may be generating the answer)
            Err(e) if reused && !fresh && !matches!(e.etype(), ReadTimedout | WriteTimedout) => {
                tracing::debug!("pooled connection failed ({e}); retrying on a fresh one");
                continue;
            }
            Err(e) => {
                let reason = if matches!(e.etype(), ReadTimedout | WriteTimedout) {
                    RetryOn::Timeout
                } else {
                    RetryOn::Reset
                };
                return Err(AttemptError::network(reason, e));
            }
        }
    }
    Err(AttemptError::network(RetryOn::Reset, "connection failed"))
}

/// A pooled connection, or a new one. At most [`MAX_CONNECTS_IN_FLIGHT`] connection
/// attempts run at once per worker; the others wait their turn (Envoy's pending-request
/// queue), for at most the first-byte timeout. A request whose worker was ejected while it
/// waited moves on at once. Neither counts against the worker's health.
///
/// [`MAX_CONNECTS_IN_FLIGHT`]: crate::registry::worker::MAX_CONNECTS_IN_FLIGHT
async fn connection(
    connector: &Connector,
    config: &Config,
    worker: &Worker,
    peer: &HttpPeer,
) -> std::result::Result<(HttpSession, bool), AttemptError> {
    let not_now = |detail: &str| {
        let mut e = AttemptError::network(RetryOn::Connect, detail);
        e.overloaded = true;
        e
    };
    let excluded_before = worker.health.is_excluded();
    let permit = tokio::time::timeout(config.first_byte_timeout, worker.connects.acquire())
        .await
        .ok()
        .and_then(Result::ok);
    let Some(_permit) = permit else {
        return Err(not_now("no connection slot to the worker in time"));
    };
    if !excluded_before && worker.health.is_excluded() {
        return Err(not_now("the worker was ejected while the request waited"));
    }
    connector
        .get_http_session(peer)
        .await
        .map_err(|e| AttemptError::network(RetryOn::Connect, e))
}

/// The `Host` a request to `peer` carries: the name the worker is known by (see [`peer`]),
/// an IP address as `ip:port`.
pub fn host(peer: &HttpPeer) -> String {
    match peer.sni.parse::<std::net::IpAddr>() {
        Ok(_) => peer._address.to_string(),
        Err(_) => match peer._address.as_inet() {
            Some(a) => format!("{}:{}", peer.sni, a.port()),
            None => peer.sni.clone(),
        },
    }
}

fn request(peer: &HttpPeer, out: &Outgoing<'_>) -> Result<RequestHeader> {
    let mut req = RequestHeader::build("POST", out.path.as_bytes(), Some(7 + PASSED_ON.len()))?;
    req.insert_header("host", host(peer))?;
    if let Some(a) = out.authorization {
        req.insert_header(http::header::AUTHORIZATION, a.clone())?;
    }
    req.insert_header("content-type", "application/json")?;
    req.insert_header("content-length", out.body.len().to_string())?;
    req.insert_header(HOP_HEADER, out.hops)?;
    req.insert_header(REQUEST_ID, out.request_id)?;
    for name in PASSED_ON {
        if let Some(v) = out.client.headers.get(name) {
            req.insert_header(name, v.clone())?;
        }
    }
    if let Some(tp) = out.traceparent {
        req.insert_header("traceparent", tp)?;
    }
    Ok(req)
}

/// Counts a request in its worker's router-side in-flight load and cost share while it
/// lives.
pub struct InFlight {
    worker: Arc<Worker>,
    share_start: f64,
    done: bool,
}

impl InFlight {
    pub fn new(worker: Arc<Worker>) -> Self {
        worker
            .router_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let share_start = worker.share.start(Instant::now());
        Self {
            worker,
            share_start,
            done: false,
        }
    }

    /// Ends the request; returns its share of the worker's time in seconds.
    pub fn finish(mut self) -> f64 {
        self.end()
    }

    fn end(&mut self) -> f64 {
        if std::mem::replace(&mut self.done, true) {
            return 0.0;
        }
        self.worker
            .router_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.worker.share.end(Instant::now(), self.share_start)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end();
    }
}
