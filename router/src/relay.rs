//! Relay: the chosen answer streamed back to the client, unbuffered. Past the commit point
//! a failure cannot be hidden: an SSE stream ends with an error event (never a silent
//! cut), any other body is cut short. Completion tokens are read from the answer's `usage`
//! as it passes ([`UsageScan`]).

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use routing_rules::RouteDecision;

use crate::ctx::RequestCtx;
use crate::error::openai_body;
use crate::proxy::SwitchyardProxy;
use crate::usage::{HideUsage, UsageScan};

/// A worker's answer: header read, and its body up to the first token (`held`, in order;
/// `None` when the body ended).
pub struct Answer<'a> {
    pub upstream: HttpSession,
    pub header: ResponseHeader,
    pub peer: &'a HttpPeer,
    pub held: Vec<Option<Bytes>>,
}

/// Whether an answer is a server-sent event stream.
pub fn is_sse(header: &ResponseHeader) -> bool {
    header
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// What waiting for the worker's next body bytes ended with.
pub enum Next {
    /// Bytes, or `None`: the body ended.
    Chunk(Option<Bytes>),
    WorkerFailed(pingora::BError),
    /// The total deadline passed.
    Timeout,
    /// The client closed its connection.
    ClientGone(pingora::BError),
}

/// The worker's next body bytes, bounded by `deadline`, watching the client's side of the
/// connection meanwhile (as pingora's own proxy loop does): a client that leaves is seen
/// at once, so the worker stops generating for no one. Bytes from the client after its
/// request (a pipelined request, a stray CRLF) end the watching (`watch` set false) and
/// this connection's keep-alive.
pub async fn next_chunk(
    session: &mut Session,
    upstream: &mut HttpSession,
    deadline: tokio::time::Instant,
    watch: &mut bool,
) -> Next {
    loop {
        let read = tokio::time::timeout_at(deadline, upstream.read_response_body());
        let next = if *watch {
            tokio::select! {
                biased;
                next = read => next,
                idle = session.as_downstream_mut().read_body_or_idle(true) => {
                    match idle {
                        Err(e) if matches!(e.etype(), ConnectionClosed | ReadError) => {
                            return Next::ClientGone(e);
                        }
                        _ => {
                            *watch = false;
                            session.set_keepalive(None);
                            continue;
                        }
                    }
                }
            }
        } else {
            read.await
        };
        return match next {
            Ok(Ok(chunk)) => Next::Chunk(chunk),
            Ok(Err(e)) => Next::WorkerFailed(e),
            Err(_) => Next::Timeout,
        };
    }
}

/// Response headers that describe one connection, not the answer (RFC 9110 §7.6.1), and
/// so are never passed on; nor is any header the upstream's `Connection` lists.
/// `transfer-encoding` is not passed on as such either: pingora frames the body anew.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The answer's header as the client gets it: hop-by-hop headers removed.
fn client_header(upstream: &ResponseHeader) -> Result<ResponseHeader> {
    let listed: Vec<String> = upstream
        .headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut resp = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + 3))?;
    for (name, value) in upstream.headers.iter() {
        let n = name.as_str();
        if !HOP_BY_HOP.contains(&n) && !listed.iter().any(|l| l == n) {
            resp.append_header(name.clone(), value.clone())?;
        }
    }
    Ok(resp)
}

pub async fn relay(
    proxy: &SwitchyardProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
    decision: &RouteDecision,
    answer: Answer<'_>,
) -> Result<()> {
    let shared = &proxy.shared;
    let Answer {
        mut upstream,
        header,
        peer,
        held,
    } = answer;
    let mut held = held.into_iter();
    let mut resp = client_header(&header)?;
    resp.insert_header(crate::admit::REQUEST_ID, ctx.request_id.as_str())?;
    for (k, v) in &ctx.ratelimit {
        resp.insert_header(*k, v.as_str())?;
    }
    let sse = is_sse(&header);
    if shared.config.debug_headers {
        resp.insert_header("x-switchyard-pool", ctx.pool.as_deref().unwrap_or_default())?;
        resp.insert_header("x-switchyard-rule", &*decision.rule)?;
        resp.insert_header("x-switchyard-attempts", ctx.attempts.to_string())?;
    }
    // Every downstream write is bounded by the total deadline too: a client that stops
    // reading must not hold the stream (and the worker's slot) past it.
    let deadline: tokio::time::Instant = (ctx.started + shared.config.total_timeout).into();
    let stalled = || {
        Error::explain(
            WriteTimedout,
            "the client stopped reading before the total timeout",
        )
    };
    tokio::time::timeout_at(
        deadline,
        session.write_response_header(Box::new(resp), false),
    )
    .await
    .map_err(|_| stalled())
    .and_then(|r| r)
    .inspect_err(|_| ctx.status = 499)?;
    let pool = ctx.pool.clone().unwrap_or_else(|| "none".into());
    let mut usage = UsageScan::default();
    // the usage frame the router asked for is not the client's
    let mut hide = (ctx.usage_asked && sse).then(HideUsage::default);
    let mut first = true;
    let mut watch = true;
    loop {
        let next = match held.next() {
            Some(chunk) => Next::Chunk(chunk),
            None => next_chunk(session, &mut upstream, deadline, &mut watch).await,
        };
        let (message, code, status) = match next {
            Next::Chunk(Some(chunk)) => {
                usage.feed(&chunk);
                let chunk = match hide.as_mut() {
                    Some(h) => match h.filter(chunk) {
                        Some(c) => c,
                        None => continue,
                    },
                    None => chunk,
                };
                tokio::time::timeout_at(deadline, session.write_response_body(Some(chunk), false))
                    .await
                    .map_err(|_| stalled())
                    .and_then(|r| r)
                    .inspect_err(|_| ctx.status = 499)?;
                if std::mem::take(&mut first) {
                    // What the client waited for its first token (or whole answer, when
                    // not streaming): classification and failover included.
                    ctx.ttft = Some(ctx.started.elapsed());
                }
                continue;
            }
            Next::Chunk(None) => {
                ctx.completion_tokens = usage.completion_tokens;
                if let Some(rest) = hide.as_mut().and_then(HideUsage::finish) {
                    tokio::time::timeout_at(
                        deadline,
                        session.write_response_body(Some(rest), false),
                    )
                    .await
                    .map_err(|_| stalled())
                    .and_then(|r| r)
                    .inspect_err(|_| ctx.status = 499)?;
                }
                break;
            }
            Next::ClientGone(e) => {
                tracing::debug!(%pool, "the client left mid-answer: {e}");
                ctx.status = 499;
                ctx.completion_tokens = usage.completion_tokens;
                upstream.shutdown().await;
                return Err(e);
            }
            Next::WorkerFailed(e) => {
                tracing::warn!(%pool, "the worker failed mid-answer: {e}");
                ("the worker failed mid-answer", "upstream_disconnected", 502)
            }
            Next::Timeout => (
                "the request passed the router's total timeout",
                "timeout",
                504,
            ),
        };
        tracing::warn!(%pool, "{message}");
        ctx.status = status;
        ctx.completion_tokens = usage.completion_tokens;
        upstream.shutdown().await;
        if !sse {
            // A JSON answer is cut by closing the connection: ending it cleanly would hand
            // the client a truncated body as if it were whole. (A stream ends properly with
            // its error event, and its connection stays usable.)
            session.set_keepalive(None);
            return Error::e_explain(ConnectionClosed, message);
        }
        let ev = openai_body(message, "server_error", code, None);
        let mut frame = Vec::with_capacity(ev.len() + 8);
        frame.extend_from_slice(b"data: ");
        frame.extend_from_slice(&ev);
        frame.extend_from_slice(b"\n\n");
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            session.write_response_body(Some(Bytes::from(frame)), false),
        )
        .await;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            session.write_response_body(None, true),
        )
        .await;
        return Ok(());
    }
    tokio::time::timeout_at(deadline, session.write_response_body(None, true))
        .await
        .map_err(|_| stalled())
        .and_then(|r| r)
        .inspect_err(|_| ctx.status = 499)?;
    if upstream.response_done() {
        proxy
            .connector
            .release_http_session(upstream, peer, Some(Duration::from_secs(60)))
            .await;
    }
    Ok(())
}
