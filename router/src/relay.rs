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

use std::sync::Arc;

use crate::attempt::InFlight;
use crate::ctx::RequestCtx;
use crate::error::openai_body;
use crate::failover;
use crate::proxy::SwitchyardProxy;
use crate::registry::Worker;
use crate::resume::{self, Plan, Splice, Track};
use crate::usage::{HideUsage, UsageScan};

/// A worker's answer: header read, and its body up to the first token (`held`, in order;
/// `None` when the body ended).
pub struct Answer {
    pub upstream: HttpSession,
    pub header: ResponseHeader,
    pub peer: HttpPeer,
    pub held: Vec<Option<Bytes>>,
    /// Who answered, and its share of time running.
    pub worker: Arc<Worker>,
    pub pool: Arc<str>,
    pub in_flight: InFlight,
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

/// The worker's next body bytes, bounded by `deadline`, without watching the client.
pub async fn next_chunk_unwatched(
    upstream: &mut HttpSession,
    deadline: tokio::time::Instant,
) -> Next {
    match tokio::time::timeout_at(deadline, upstream.read_response_body()).await {
        Ok(Ok(chunk)) => Next::Chunk(chunk),
        Ok(Err(e)) => Next::WorkerFailed(e),
        Err(_) => Next::Timeout,
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

/// Writes one chunk to the client, bounded by the total deadline.
async fn write(
    session: &mut Session,
    ctx: &mut RequestCtx,
    deadline: tokio::time::Instant,
    chunk: Option<Bytes>,
    end: bool,
) -> Result<()> {
    tokio::time::timeout_at(deadline, session.write_response_body(chunk, end))
        .await
        .map_err(|_| {
            Error::explain(
                WriteTimedout,
                "the client stopped reading before the total timeout",
            )
        })
        .and_then(|r| r)
        .inspect_err(|_| ctx.status = 499)
}

/// A stream that may be resumed mid-answer: the request as sent (and its place in the
/// body budget), and what the client has of the answer.
struct Resumable {
    body: Bytes,
    _held: crate::budget::Held,
    endpoint: routing_rules::Endpoint,
    track: Track,
    /// The continuation's frames are rewritten into the first stream, once resumed.
    splice: Option<Splice>,
}

/// Relays `answer` to the client. `resume` (the request's body and its reservation)
/// makes the stream resumable mid-answer ([`crate::resume`]). Each worker's share of time
/// is added to the request's as it ends.
pub async fn relay(
    proxy: &SwitchyardProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
    decision: &RouteDecision,
    answer: Answer,
    resume: Option<(Bytes, crate::budget::Held)>,
) -> Result<()> {
    let shared = &proxy.shared;
    let Answer {
        mut upstream,
        header,
        mut peer,
        held,
        mut worker,
        mut pool,
        in_flight,
    } = answer;
    let mut in_flight = Some(in_flight);
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
    let mut resumable = match (resume, ctx.endpoint) {
        (Some((body, held)), Some(endpoint)) if sse => Some(Resumable {
            body,
            _held: held,
            endpoint,
            track: Track::default(),
            splice: None,
        }),
        _ => None,
    };
    // Every downstream write is bounded by the total deadline too: a client that stops
    // reading must not hold the stream (and the worker's slot) past it.
    let deadline: tokio::time::Instant = (ctx.started + shared.config.total_timeout).into();
    let wrote = tokio::time::timeout_at(
        deadline,
        session.write_response_header(Box::new(resp), false),
    )
    .await;
    let wrote = match wrote {
        Ok(r) => r,
        Err(_) => Error::e_explain(
            WriteTimedout,
            "the client stopped reading before the total timeout",
        ),
    };
    let finish = |ctx: &mut RequestCtx, pool: &Arc<str>, f: &mut Option<InFlight>| {
        if let Some(f) = f.take() {
            ctx.worker_seconds.push((pool.clone(), f.finish()));
        }
    };
    if let Err(e) = wrote {
        ctx.status = 499;
        finish(ctx, &pool, &mut in_flight);
        return Err(e);
    }
    let mut usage = UsageScan::default();
    // the usage frame the router asked for is not the client's
    let mut hide = (ctx.usage_asked && sse).then(HideUsage::default);
    let mut first = true;
    let mut watch = true;
    let outcome = loop {
        let next = match held.next() {
            Some(chunk) => Next::Chunk(chunk),
            None => next_chunk(session, &mut upstream, deadline, &mut watch).await,
        };
        let (message, code, status) = match next {
            Next::Chunk(Some(chunk)) => {
                // a resumable stream: the continuation rewritten, only whole frames on
                let chunk = match resumable.as_mut() {
                    Some(r) => {
                        let chunk = match r.splice.as_mut() {
                            Some(s) => s.filter(chunk),
                            None => Some(chunk),
                        };
                        match chunk.and_then(|c| r.track.feed(c)) {
                            Some(c) => c,
                            None => continue,
                        }
                    }
                    None => chunk,
                };
                usage.feed(&chunk);
                let chunk = match hide.as_mut() {
                    Some(h) => match h.filter(chunk) {
                        Some(c) => c,
                        None => continue,
                    },
                    None => chunk,
                };
                if let Err(e) = write(session, ctx, deadline, Some(chunk), false).await {
                    break Err(e);
                }
                if std::mem::take(&mut first) {
                    // What the client waited for its first token (or whole answer, when
                    // not streaming): classification and failover included.
                    ctx.ttft = Some(ctx.started.elapsed());
                }
                continue;
            }
            Next::Chunk(None) => {
                // whatever a stream held back (an unfinished last frame) goes as it is
                let mut rest: Vec<Bytes> = Vec::new();
                if let Some(r) = resumable.as_mut() {
                    if let Some(s) = r.splice.as_mut() {
                        rest.extend(s.finish().and_then(|c| r.track.feed(c)));
                    }
                    rest.extend(r.track.finish());
                }
                for c in &rest {
                    usage.feed(c);
                }
                let mut rest: Vec<Bytes> = match hide.as_mut() {
                    Some(h) => rest.into_iter().filter_map(|c| h.filter(c)).collect(),
                    None => rest,
                };
                rest.extend(hide.as_mut().and_then(HideUsage::finish));
                ctx.completion_tokens = usage.completion_tokens;
                let mut failed = None;
                for c in rest {
                    if let Err(e) = write(session, ctx, deadline, Some(c), false).await {
                        failed = Some(e);
                        break;
                    }
                }
                break match failed {
                    Some(e) => Err(e),
                    None => Ok(true),
                };
            }
            Next::ClientGone(e) => {
                tracing::debug!(%pool, "the client left mid-answer: {e}");
                ctx.status = 499;
                ctx.completion_tokens = usage.completion_tokens;
                upstream.shutdown().await;
                break Err(e);
            }
            Next::WorkerFailed(e) => {
                tracing::warn!(%pool, worker = %worker.id, "the worker failed mid-answer: {e}");
                if let Some(r) = resumable.as_mut() {
                    // bounded: a frozen peer may never take a TLS close_notify
                    let _ = tokio::time::timeout(Duration::from_secs(1), upstream.shutdown()).await;
                    finish(ctx, &pool, &mut in_flight);
                    // the unfinished frame the client never got goes with the worker
                    let _ = r.track.finish();
                    if worker.health.record_failure() {
                        tracing::warn!(worker = %worker.id, %pool, "worker ejected");
                        shared.metrics.ejections.with_label_values(&[&pool]).inc();
                    }
                    ctx.failures
                        .push((pool.clone(), worker.id.clone(), "reset"));
                    match resume_stream(proxy, session, ctx, decision, r, &pool).await {
                        Resume::Continue(next) => {
                            shared
                                .metrics
                                .resumes
                                .with_label_values(&[&next.pool, "resumed"])
                                .inc();
                            ctx.resumed += 1;
                            ctx.pool = Some(next.pool.clone());
                            ctx.worker = Some(next.worker.id.clone());
                            upstream = next.upstream;
                            peer = next.peer;
                            worker = next.worker;
                            pool = next.pool;
                            in_flight = Some(next.in_flight);
                            held = next.held.into_iter();
                            continue;
                        }
                        Resume::End(frames, outcome) => {
                            shared
                                .metrics
                                .resumes
                                .with_label_values(&[&pool, outcome])
                                .inc();
                            let mut failed = None;
                            for c in frames {
                                usage.feed(&c);
                                let c = match hide.as_mut() {
                                    Some(h) => h.filter(c),
                                    None => Some(c),
                                };
                                if let Some(c) = c
                                    && let Err(e) =
                                        write(session, ctx, deadline, Some(c), false).await
                                {
                                    failed = Some(e);
                                    break;
                                }
                            }
                            ctx.completion_tokens =
                                usage.completion_tokens.or(ctx.completion_tokens);
                            break match failed {
                                Some(e) => Err(e),
                                None => Ok(false),
                            };
                        }
                        Resume::ClientGone(e) => {
                            ctx.status = 499;
                            ctx.completion_tokens = usage.completion_tokens;
                            return Err(e);
                        }
                        Resume::Failed(why) => {
                            shared
                                .metrics
                                .resumes
                                .with_label_values(&[&pool, "failed"])
                                .inc();
                            tracing::warn!(%pool, "the stream could not be resumed: {why}");
                        }
                    }
                }
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
            finish(ctx, &pool, &mut in_flight);
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
        break Ok(false);
    };
    finish(ctx, &pool, &mut in_flight);
    let upstream_done = match outcome {
        Err(e) => return Err(e),
        Ok(done) => done,
    };
    if ctx.status >= 500 {
        // the error event went out: end the stream, briefly (the client may not read)
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            session.write_response_body(None, true),
        )
        .await;
        return Ok(());
    }
    write(session, ctx, deadline, None, true).await?;
    if upstream_done
        && upstream.response_done()
        && let pingora::protocols::http::client::HttpSession::H1(h1) = upstream
    {
        proxy
            .connector
            .release_http_session(h1, &peer, Some(Duration::from_secs(60)))
            .await;
    }
    Ok(())
}

/// What resuming a broken stream came to.
enum Resume {
    /// Go on with this worker's continuation.
    Continue(Box<Answer>),
    /// End the stream with these frames (a `length` finish, or `[DONE]`); the outcome's
    /// metric label.
    End(Vec<Bytes>, &'static str),
    Failed(String),
    ClientGone(pingora::BError),
}

/// Resumes a stream whose worker failed mid-answer, or says why not.
async fn resume_stream(
    proxy: &SwitchyardProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
    decision: &RouteDecision,
    r: &mut Resumable,
    from: &Arc<str>,
) -> Resume {
    let track = &r.track;
    if track.done {
        // the answer was whole; only the connection's end was lost
        return Resume::End(Vec::new(), "complete");
    }
    if track.finished {
        return Resume::End(vec![Bytes::from_static(b"data: [DONE]\n\n")], "complete");
    }
    if let Some(why) = track.unresumable {
        return Resume::Failed(why.into());
    }
    // the tokens the client has: counted with the model's tokenizer where the router has
    // it, else one per frame of text (as engines stream them)
    let counter = proxy.shared.counters.load().get(ctx.model()).cloned();
    let carried = match counter {
        Some(c) => {
            let text = [track.text.clone()];
            tokio::task::spawn_blocking(move || c.count(&text))
                .await
                .unwrap_or(track.text_frames)
        }
        None => track.text_frames,
    };
    let plan = match resume::continuation(&r.body, r.endpoint, &track.text, carried) {
        Ok(p) => p,
        Err(why) => return Resume::Failed(why.into()),
    };
    let body = match plan {
        Plan::LimitReached => {
            // the answer used its whole budget: the usage frame is lost with the worker
            ctx.completion_tokens.get_or_insert(carried);
            return Resume::End(
                vec![resume::limit_frames(track, r.endpoint)],
                "limit_reached",
            );
        }
        Plan::Continue(b) => Bytes::from(b),
    };
    match Box::pin(failover::resume(proxy, session, ctx, decision, &body, from)).await {
        failover::Resumed::Answer(a) => {
            // (a later resume starts again from the request as the client sent it, with
            // all the text the client has by then)
            r.splice = Some(Splice::new(&r.track, carried));
            Resume::Continue(a)
        }
        failover::Resumed::Failed(why) => Resume::Failed(why),
        failover::Resumed::ClientGone(e) => Resume::ClientGone(e),
    }
}
