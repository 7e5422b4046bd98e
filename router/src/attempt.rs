//! One attempt at one worker: the buffered request sent with pingora's HTTP connector
//! (pooled connections), the response header read. Nothing is written downstream here;
//! a failure is an [`AttemptError`] the failover loop decides on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
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
///
/// The request's head and body leave in one write: the head is built straight into a
/// buffer ([`head`]) and written with the body as one vectored write. pingora's client
/// writes the head and flushes it before the body (two system calls per request, and a
/// `RequestHeader` built and cloned per attempt).
pub async fn attempt(
    connector: &Connector,
    config: &Config,
    worker: &Worker,
    peer: &HttpPeer,
    out: &Outgoing<'_>,
) -> std::result::Result<(HttpSession, ResponseHeader), AttemptError> {
    let head = head(peer, out).map_err(AttemptError::router)?;
    let write_timeout = config.connect_timeout.max(Duration::from_secs(10));
    // A pooled connection the worker has closed fails at once: retry that on a fresh one.
    for fresh in [false, true] {
        let (up, reused) = connection(connector, config, worker, peer).await?;
        let mut stream = up.into_inner();
        let written = write_all(&mut stream, &head, out.body, write_timeout).await;
        let mut up = HttpSession::H1(Http1Session::new_with_options(stream, peer));
        // The connector does not apply the peer's read timeout: it bounds the wait for
        // the response header (first byte) and, later, each gap between body chunks.
        up.set_read_timeout(peer.options.read_timeout);
        let sent = match written {
            Ok(()) => up.read_response_header().await,
            Err(e) => Err(e),
        };
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

/// Writes `head` and `body` to `stream` (one vectored write when the socket takes it all)
/// and flushes, within `timeout`.
async fn write_all(
    stream: &mut pingora::protocols::Stream,
    head: &[u8],
    body: &Bytes,
    timeout: Duration,
) -> Result<()> {
    use bytes::Buf;
    use tokio::io::AsyncWriteExt;
    let mut both = head.chain(body.as_ref());
    let write = async {
        stream.write_all_buf(&mut both).await?;
        stream.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::because(WriteError, "while writing the request", e)),
        Err(_) => Err(Error::explain(
            WriteTimedout,
            "while writing the request (timeout)",
        )),
    }
}

/// A pooled connection, or a new one. At most [`MAX_CONNECTS_IN_FLIGHT`] connection
/// attempts run at once per worker; the others wait their turn (Envoy's pending-request
/// queue), for at most the first-byte timeout. A request whose worker was ejected while it
/// waited moves on at once. Neither counts against the worker's health. A pooled connection
/// is taken without waiting: it is no connection attempt.
///
/// [`MAX_CONNECTS_IN_FLIGHT`]: crate::registry::worker::MAX_CONNECTS_IN_FLIGHT
async fn connection(
    connector: &Connector,
    config: &Config,
    worker: &Worker,
    peer: &HttpPeer,
) -> std::result::Result<(Http1Session, bool), AttemptError> {
    if let Some(pooled) = connector.reused_http_session(peer).await {
        return Ok((pooled, true));
    }
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
    // boxed: connecting (TCP, TLS) is a large future, and most requests find a pooled
    // connection above and never make it
    Box::pin(connector.get_http_session(peer))
        .await
        .map_err(|e| AttemptError::network(RetryOn::Connect, e))
}

/// The `Host` a request to `peer` carries: the name the worker is known by (see [`peer`]),
/// an IP address as `ip:port`.
pub fn host(peer: &HttpPeer) -> String {
    let mut h = String::new();
    // writing to a String cannot fail
    let _ = write_host(&mut h, peer);
    h
}

/// Writes [`host`] to `w`.
fn write_host(w: &mut impl std::fmt::Write, peer: &HttpPeer) -> std::fmt::Result {
    match peer.sni.parse::<std::net::IpAddr>() {
        Ok(_) => write!(w, "{}", peer._address),
        Err(_) => match peer._address.as_inet() {
            Some(a) => write!(w, "{}:{}", peer.sni, a.port()),
            None => w.write_str(&peer.sni),
        },
    }
}

/// The request's HTTP/1.1 head as it goes on the wire: what pingora's client writes for
/// the same request (tested against it), written straight into one buffer. A value holding
/// a line break or NUL (which no `HeaderValue` can, but a worker's host name is not one) is
/// refused, as pingora refuses it.
pub fn head(peer: &HttpPeer, out: &Outgoing<'_>) -> std::result::Result<Vec<u8>, String> {
    use std::io::Write;
    if out
        .path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("the path holds white space or a control character".into());
    }
    let mut head = Head(Vec::with_capacity(
        256 + out.path.len() + out.hops.len() + out.request_id.len(),
    ));
    head.0.extend_from_slice(b"POST ");
    head.0.extend_from_slice(out.path.as_bytes());
    head.0.extend_from_slice(b" HTTP/1.1\r\n");
    // the host formatted straight into the head (no allocation per request), then checked
    head.0.extend_from_slice(b"host: ");
    let at = head.0.len();
    write_host(&mut FmtVec(&mut head.0), peer).map_err(|e| e.to_string())?;
    head.check("host", at)?;
    head.0.extend_from_slice(b"\r\n");
    if let Some(a) = out.authorization {
        head.field("authorization", a.as_bytes())?;
    }
    head.field("content-type", b"application/json")?;
    head.0.extend_from_slice(b"content-length: ");
    write!(head.0, "{}\r\n", out.body.len()).map_err(|e| e.to_string())?;
    head.field(HOP_HEADER, out.hops.as_bytes())?;
    head.field(REQUEST_ID, out.request_id.as_bytes())?;
    for name in PASSED_ON {
        let ours = match name {
            "traceparent" => out.traceparent.map(str::as_bytes),
            _ => None,
        };
        if let Some(v) = ours.or_else(|| out.client.headers.get(name).map(|v| v.as_bytes())) {
            head.field(name, v)?;
        }
    }
    head.0.extend_from_slice(b"\r\n");
    Ok(head.0)
}

/// A request head being written.
struct Head(Vec<u8>);

impl Head {
    fn field(&mut self, name: &str, value: &[u8]) -> std::result::Result<(), String> {
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b": ");
        let at = self.0.len();
        self.0.extend_from_slice(value);
        self.check(name, at)?;
        self.0.extend_from_slice(b"\r\n");
        Ok(())
    }

    /// Refuses the value written from `at` on if it holds a line break or NUL.
    fn check(&self, name: &str, at: usize) -> std::result::Result<(), String> {
        if self.0[at..].iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(format!("the {name} header holds a line break or NUL"));
        }
        Ok(())
    }
}

/// `fmt::Write` into a byte buffer.
struct FmtVec<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for FmtVec<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The request as pingora's `RequestHeader`: the reference [`head`] is tested against.
#[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn client(headers: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in headers {
            h.append_header(k.to_string(), *v).unwrap();
        }
        h
    }

    /// What pingora's own client would have written for the same request.
    fn pingora_wire(peer: &HttpPeer, out: &Outgoing<'_>) -> Vec<u8> {
        let req = request(peer, out).unwrap();
        pingora::protocols::http::v1::client::http_req_header_to_wire(&req)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn the_head_is_what_pingoras_client_writes() {
        let body = Bytes::from_static(b"{\"model\":\"m\"}");
        let auth = http::HeaderValue::from_static("Bearer pool-key");
        let by_ip = HttpPeer::new("127.0.0.1:8000", false, "127.0.0.1".to_string());
        let by_name = HttpPeer::new("10.0.0.7:8443", true, "gpu-7.internal".to_string());
        let plain = client(&[("content-type", "application/json")]);
        let rich = client(&[
            ("accept", "text/event-stream"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("authorization", "Bearer the-clients-own"),
        ]);
        for (peer, client, traceparent, authorization) in [
            (&by_ip, &plain, None, None),
            (&by_name, &rich, None, Some(&auth)),
            (
                &by_name,
                &rich,
                Some("00-11111111111111111111111111111111-2222222222222222-01"),
                None,
            ),
            (
                &by_ip,
                &plain,
                Some("00-11111111111111111111111111111111-2222222222222222-01"),
                Some(&auth),
            ),
        ] {
            let out = Outgoing {
                path: "/v1/chat/completions",
                body: &body,
                client,
                hops: "router-a,router-b",
                request_id: "req-42",
                traceparent,
                authorization,
            };
            let ours = head(peer, &out).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&pingora_wire(peer, &out))
            );
            // the client's own credentials never reach a worker
            assert!(!String::from_utf8_lossy(&ours).contains("the-clients-own"));
        }
    }

    #[test]
    fn a_host_name_with_a_line_break_is_refused() {
        let body = Bytes::from_static(b"{}");
        let plain = client(&[]);
        let peer = HttpPeer::new("10.0.0.7:8000", false, "gpu\r\nx-injected: 1".to_string());
        let out = Outgoing {
            path: "/v1/completions",
            body: &body,
            client: &plain,
            hops: "r",
            request_id: "id",
            traceparent: None,
            authorization: None,
        };
        let e = head(&peer, &out).unwrap_err();
        assert!(e.contains("line break"), "{e}");
    }
}
