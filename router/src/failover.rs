//! Failover: the attempt loop. Picks a worker for each attempt, decides after each failure
//! whether and where to try again, and hands the first real answer to [`crate::relay`].
//!
//! ## How a route is walked
//!
//! The route's pools are tried in order (cheapest first, spot before on-demand):
//!
//! 1. **Healthy workers first, across the whole route.** A pool whose eligible workers are
//!    all ejected or failing their health checks is skipped up front, at no cost: in a
//!    preemption wave the dead spot pool is passed over and requests go straight to
//!    on-demand (Envoy's priority levels). Only when no pool of the route has a healthy
//!    worker does a second sweep reach the unhealthy ones.
//! 2. **Retries within a pool spend the retry budget** ([`RetryBudget`]: a ratio of
//!    requests plus a floor) — any retry into a pool that already failed this request,
//!    the second sweep included — which stops a sick tier from multiplying its own load.
//! 3. **Moving to the next pool does not.** Tier failover is what the route is for: when
//!    the budget refuses another try in the same pool, the loop moves on to the next pool
//!    instead of failing the request. `retry.max_attempts` bounds the attempts in all.
//!
//! A failure is retried only before the first byte reached the client, only for the
//! classes the rule's `retry.on` names, and never when the router itself caused it.
//! Ejected workers come back through half-open probes ([`crate::registry::health`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pingora::prelude::*;

use crate::attempt::{self, InFlight, Outgoing};
use crate::ctx::RequestCtx;
use crate::error::{AttemptError, ProxyError};
use crate::proxy::SwitchyardProxy;
use crate::select::{self, Ask, Reach};
use crate::{relay, respond};

/// Retries allowed as a ratio of requests plus a floor, over a sliding 10-second window.
pub struct RetryBudget {
    window: Duration,
    state: Mutex<(Instant, u64, u64)>, // window start, requests, retries
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }
}

impl RetryBudget {
    fn with<R>(&self, f: impl FnOnce(&mut (Instant, u64, u64)) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0.elapsed() > self.window {
            *s = (Instant::now(), 0, 0);
        }
        f(&mut s)
    }

    pub fn record_request(&self) {
        self.with(|s| s.1 += 1);
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_retry(&self, ratio: f64, floor: u32) -> bool {
        self.with(|s| {
            let allowed = u64::from(floor) + (s.1 as f64 * ratio) as u64;
            if s.2 < allowed {
                s.2 += 1;
                true
            } else {
                false
            }
        })
    }
}

/// Walks the route until a worker answers (then relays the answer) or nothing is left
/// (then answers 503 with `Retry-After`).
pub async fn forward(
    proxy: &SwitchyardProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
    decision: &routing_rules::RouteDecision,
) -> Result<()> {
    let shared = &proxy.shared;
    let Some((body, held)) = ctx.body.take() else {
        return respond::error(session, ctx, &ProxyError::BadJson("no body".into())).await;
    };
    shared.retry_budget.record_request();
    let snapshot = shared.registry.snapshot();
    // a latency objective: the route's pools that are expected to meet it first
    let slo_ordered;
    let decision = match decision.slo_ttft_p95 {
        Some(objective) => {
            let utilization = |p: &str| crate::slo::utilization(&snapshot, p);
            let ordered = shared.slo.order(&decision.targets, objective, &utilization);
            let spilling = shared.slo.spilling_pools();
            for p in decision.targets.iter() {
                shared
                    .metrics
                    .pool_spilling
                    .with_label_values(&[p])
                    .set(i64::from(spilling.contains(p)));
            }
            ctx.spilled = ordered.spilled;
            slo_ordered = routing_rules::RouteDecision {
                targets: Arc::from(ordered.targets),
                ..decision.clone()
            };
            &slo_ordered
        }
        None => decision,
    };
    let retry = &decision.retry;
    let hops = hops(session, &shared.hop_id);
    let mut last: Option<(Arc<str>, AttemptError)> = None;
    let mut reach = Reach::Healthy;
    let mut next_pool = 0;
    // the total timeout bounds failover too: no attempt starts, and none waits, past it
    let deadline = tokio::time::Instant::from(ctx.started + shared.config.total_timeout);
    while ctx.attempts < retry.max_attempts {
        if tokio::time::Instant::now() >= deadline {
            return respond::error(session, ctx, &ProxyError::GatewayTimeout).await;
        }
        let Some(pool) = decision.targets.get(next_pool) else {
            if reach == Reach::Healthy {
                // no healthy worker left on the route: the unhealthy ones, as a last resort
                reach = Reach::AnyLive;
                next_pool = 0;
                continue;
            }
            break;
        };
        let Some(worker) = pick_in(shared, &snapshot, ctx, pool, reach, false) else {
            next_pool += 1; // nothing (more) here: the next pool
            continue;
        };
        if let Some((from, failed)) = &last {
            if !failed.retryable() || !retry.retries_on(failed.reason) {
                break;
            }
            // a retry into a pool that already failed this request (the same pool, or one
            // met again in the second sweep) spends the budget
            if ctx.failures.iter().any(|(p, ..)| p == pool) {
                if !budget_allows(shared, retry, pool) {
                    next_pool += 1; // the budget bounds retries within a tier, not failover
                    continue;
                }
                if !retry.backoff.is_zero() {
                    tokio::time::sleep(retry.backoff).await;
                }
            }
            shared
                .metrics
                .retries
                .with_label_values(&[from, pool, failed.reason_name()])
                .inc();
        }
        // a worker whose ejection just ended takes one probe at a time
        let Some(_probe) = worker.health.probe() else {
            ctx.tried.push(worker.id.clone());
            continue;
        };
        // with deadline escalation (and a later pool to escalate to) a stream's attempt may
        // be raced by a hedge: the answer is then whichever produced a token first. (Not a
        // JSON answer's: its first byte comes when the generation ends, so it would race
        // two whole generations.)
        let Outcome {
            tried,
            in_flight,
            peer,
            worker,
            pool,
            started: t0,
        } = match retry.escalate_after {
            Some(after)
                if next_pool + 1 < decision.targets.len() && ctx.classified.features.stream =>
            {
                Box::pin(escalate(
                    proxy,
                    session,
                    ctx,
                    decision,
                    &snapshot,
                    next_pool,
                    Arc::clone(&worker),
                    &body,
                    &hops,
                    deadline,
                    after,
                    reach,
                ))
                .await
            }
            _ => {
                let started = Instant::now();
                let (tried, in_flight, peer) =
                    attempt_at(proxy, session, ctx, pool, &worker, &body, &hops, deadline).await;
                Outcome {
                    tried,
                    in_flight,
                    peer,
                    worker: Arc::clone(&worker),
                    pool: pool.clone(),
                    started,
                }
            }
        };
        let pool = &pool;
        let answered = match tried {
            Tried::Answered(up, resp, held) => Ok((up, resp, held)),
            Tried::Failed(e) => Err(e),
            Tried::ClientGone(e) => {
                if let Some(t) = ctx.trace.as_mut() {
                    t.end_attempt(Some("client_gone"));
                }
                ctx.worker_seconds.push((pool.clone(), in_flight.finish()));
                ctx.status = 499;
                return Err(e);
            }
        };
        match answered {
            Ok((up, resp, first_body)) => {
                worker.health.record_success();
                shared
                    .metrics
                    .ttfb
                    .with_label_values(&[pool])
                    .observe(t0.elapsed().as_secs_f64());
                ctx.pool = Some(pool.clone());
                ctx.worker = Some(worker.id.clone());
                if relay::is_sse(&resp) {
                    // a streamed answer's time to its first token, for latency objectives
                    shared.slo.record(pool, t0.elapsed());
                }
                ctx.status = resp.status.as_u16();
                if let Some(t) = ctx.trace.as_mut() {
                    t.answered();
                }
                // The commit point: no failover after this. The body and its reservation
                // go now, not when a long stream ends; unless the stream may be resumed
                // mid-answer on another worker (see `crate::resume`), which needs them.
                let resumable = relay::is_sse(&resp)
                    && retry.resumes()
                    && matches!(
                        ctx.endpoint,
                        Some(
                            routing_rules::Endpoint::ChatCompletions
                                | routing_rules::Endpoint::Completions
                        )
                    );
                let kept = resumable.then_some((body, held));
                let answer = relay::Answer {
                    upstream: up,
                    header: resp,
                    peer,
                    held: first_body,
                    worker: Arc::clone(&worker),
                    pool: pool.clone(),
                    in_flight,
                };
                let relayed =
                    Box::pin(relay::relay(proxy, session, ctx, decision, answer, kept)).await;
                if let Some(t) = ctx.trace.as_mut() {
                    t.relayed(ctx.completion_tokens);
                }
                return relayed;
            }
            Err(failed) => {
                attempt_failed(shared, ctx, pool, &worker, in_flight, &failed, true);
                last = Some((pool.clone(), failed));
            }
        }
    }
    if tokio::time::Instant::now() >= deadline {
        return respond::error(session, ctx, &ProxyError::GatewayTimeout).await;
    }
    let e = ProxyError::NoCapacity {
        rule: decision.rule.to_string(),
        last: last.as_ref().map(|(_, f)| f.summary()),
    };
    let mut extra = Vec::new();
    if shared.config.debug_headers {
        extra.push(("x-switchyard-rule", decision.rule.to_string()));
        extra.push(("x-switchyard-attempts", ctx.attempts.to_string()));
    }
    respond::error_with(session, ctx, &e, extra).await
}

/// Takes a retry into `pool` from the retry budget; counts a refusal.
fn budget_allows(
    shared: &crate::state::Shared,
    retry: &routing_rules::RetryPolicy,
    pool: &str,
) -> bool {
    let allowed = shared
        .retry_budget
        .try_retry(retry.budget_ratio, retry.budget_floor);
    if !allowed {
        shared
            .metrics
            .retry_budget_exhausted
            .with_label_values(&[pool])
            .inc();
    }
    allowed
}

/// A worker of `pool` that may take the request (`continuation`: a resumed stream's).
fn pick_in(
    shared: &crate::state::Shared,
    snapshot: &crate::registry::Snapshot,
    ctx: &RequestCtx,
    pool: &str,
    reach: Reach,
    continuation: bool,
) -> Option<Arc<crate::registry::Worker>> {
    let rules = shared.rules.load();
    let kind = rules.rules.pool(pool).map(|p| p.select).unwrap_or_default();
    let ask = Ask {
        model: ctx.model(),
        modalities: ctx.classified.features.modalities,
        tried: &ctx.tried,
        continuation,
    };
    match select::policy_for(kind) {
        Some(policy) => select::pick(snapshot, pool, policy, &ask, reach),
        None => {
            let policy = select::CacheAware::new(&shared.prefixes, &ctx.classified.prefix);
            let picked = select::pick(snapshot, pool, &policy, &ask, reach);
            if let (Some(placement), Some(_)) = (policy.placement.get(), &picked) {
                shared
                    .metrics
                    .prefix_placements
                    .with_label_values(&[pool, placement.label()])
                    .inc();
            }
            picked
        }
    }
}

/// An attempt about to start: counted in the request, the worker's share of time running,
/// the peer, and the trace context it carries (when traced).
struct Prepared {
    in_flight: InFlight,
    peer: pingora::upstreams::peer::HttpPeer,
    traceparent: Option<String>,
}

/// Counts an attempt at `worker` of `pool` (`traced`: with its own span in the trace).
fn prepare(
    shared: &crate::state::Shared,
    ctx: &mut RequestCtx,
    pool: &str,
    worker: &Arc<crate::registry::Worker>,
    traced: bool,
) -> Prepared {
    ctx.attempts += 1;
    ctx.tried.push(worker.id.clone());
    let upstreams = shared.upstreams.load();
    let conn = upstreams.get(pool);
    Prepared {
        in_flight: InFlight::new(Arc::clone(worker)),
        peer: attempt::peer(&shared.config, worker, conn.map(|c| &**c)),
        traceparent: if traced {
            ctx.trace
                .as_mut()
                .map(|t| t.start_attempt(pool, &worker.id, ctx.attempts))
        } else {
            None
        },
    }
}

/// One attempt at `worker` of `pool`: counted, traced, sent with `body`, and its answer
/// held up to the first token. Returns how it went, the worker's share of time running
/// and the peer it went to.
#[allow(clippy::too_many_arguments)]
async fn attempt_at(
    proxy: &SwitchyardProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
    pool: &Arc<str>,
    worker: &Arc<crate::registry::Worker>,
    body: &bytes::Bytes,
    hops: &str,
    deadline: tokio::time::Instant,
) -> (Tried, InFlight, pingora::upstreams::peer::HttpPeer) {
    let shared = &proxy.shared;
    let p = prepare(shared, ctx, pool, worker, true);
    let upstreams = shared.upstreams.load();
    let out = Outgoing {
        path: &ctx.path,
        body,
        client: session.req_header(),
        hops,
        request_id: &ctx.request_id,
        traceparent: p.traceparent.as_deref(),
        authorization: upstreams.get(pool).and_then(|c| c.authorization.as_ref()),
    };
    let sent = send(proxy, worker, &p.peer, &out, deadline).await;
    (
        hold(Some(session), sent, worker, deadline).await,
        p.in_flight,
        p.peer,
    )
}

/// What an attempt (escalated or not) came to, whose it was, and when it started (its
/// time to first byte is counted from then).
struct Outcome {
    tried: Tried,
    in_flight: InFlight,
    peer: pingora::upstreams::peer::HttpPeer,
    worker: Arc<crate::registry::Worker>,
    pool: Arc<str>,
    started: Instant,
}

/// Deadline escalation: an attempt at `worker` of the route's pool `at` which has no first
/// token `after` it started is also started on a later pool of the route (a hedge, when the
/// retry budget allows one); the first of the two to produce a token is served, and the
/// other is dropped, which closes its connection (a worker stops generating for a request
/// whose connection closed, so no request runs to completion twice). While the two race,
/// neither watches the client: one that leaves is seen when the answer is relayed.
#[allow(clippy::too_many_arguments)]
async fn escalate(
    proxy: &SwitchyardProxy,
    session: &Session,
    ctx: &mut RequestCtx,
    decision: &routing_rules::RouteDecision,
    snapshot: &crate::registry::Snapshot,
    at: usize,
    worker: Arc<crate::registry::Worker>,
    body: &bytes::Bytes,
    hops: &str,
    deadline: tokio::time::Instant,
    after: Duration,
    reach: Reach,
) -> Outcome {
    let shared = &proxy.shared;
    let pool = decision.targets[at].clone();
    let upstreams = shared.upstreams.load();
    let (path, request_id) = (ctx.path.clone(), ctx.request_id.clone());
    let first_started = Instant::now();
    let mut first = prepare(shared, ctx, &pool, &worker, true);
    let traceparent = first.traceparent.take();
    let out = Outgoing {
        path: &path,
        body,
        client: session.req_header(),
        hops,
        request_id: &request_id,
        traceparent: traceparent.as_deref(),
        authorization: upstreams.get(&pool).and_then(|c| c.authorization.as_ref()),
    };
    // each leg of the race owns what it uses (the winner's worker and peer are returned)
    let leg = |w: Arc<crate::registry::Worker>, peer: pingora::upstreams::peer::HttpPeer, out| async move {
        let sent = send(proxy, &w, &peer, &out, deadline).await;
        hold(None, sent, &w, deadline).await
    };
    let primary = leg(Arc::clone(&worker), first.peer.clone(), out);
    tokio::pin!(primary);
    let done = tokio::select! {
        t = &mut primary => Some(t),
        () = tokio::time::sleep(after) => None,
    };
    let alone = |tried, p: Prepared, worker, pool, started| Outcome {
        tried,
        in_flight: p.in_flight,
        peer: p.peer,
        worker,
        pool,
        started,
    };
    if let Some(tried) = done {
        return alone(tried, first, worker, pool, first_started);
    }
    // no first token by the deadline: a worker of a later pool, if the attempts and the
    // budget allow another (and, for a worker whose ejection just ended, its one probe)
    let hedge = (ctx.attempts < decision.retry.max_attempts)
        .then(|| {
            decision.targets[at + 1..].iter().find_map(|p| {
                pick_in(shared, snapshot, ctx, p, reach, false).map(|w| (p.clone(), w))
            })
        })
        .flatten()
        .filter(|(p, _)| budget_allows(shared, &decision.retry, p));
    let probed = hedge.as_ref().map(|(_, w)| Arc::clone(w));
    let probe = probed.as_ref().and_then(|w| w.health.probe());
    let (Some((pool2, worker2)), Some(_probe)) = (hedge, probe) else {
        let tried = primary.await;
        return alone(tried, first, worker, pool, first_started);
    };
    let second_started = Instant::now();
    let second = prepare(shared, ctx, &pool2, &worker2, false);
    let out2 = Outgoing {
        traceparent: None,
        authorization: upstreams.get(&pool2).and_then(|c| c.authorization.as_ref()),
        ..out
    };
    let hedged = leg(Arc::clone(&worker2), second.peer.clone(), out2);
    tokio::pin!(hedged);
    let escalations = |served: &str| {
        shared
            .metrics
            .escalations
            .with_label_values(&[&pool, &pool2, served])
            .inc();
    };
    // the first token wins (the loser's future, and its connection, are dropped when this
    // returns, at once); a failure leaves the other to finish alone
    tokio::select! {
        t = &mut primary => match t {
            Tried::Answered(..) => {
                escalations("first");
                outpaced(ctx, &pool2, &worker2, second.in_flight);
                alone(t, first, worker, pool, first_started)
            }
            failed => {
                book_failed(shared, ctx, &pool, &worker, first.in_flight, failed, true);
                escalations("escalated");
                let tried = hedged.await;
                alone(tried, second, worker2, pool2, second_started)
            }
        },
        t = &mut hedged => match t {
            Tried::Answered(..) => {
                escalations("escalated");
                if let Some(tr) = ctx.trace.as_mut() {
                    tr.end_attempt(Some("escalated"));
                }
                outpaced(ctx, &pool, &worker, first.in_flight);
                alone(t, second, worker2, pool2, second_started)
            }
            failed => {
                // the hedge has no span of its own: the first attempt's stays open
                book_failed(shared, ctx, &pool2, &worker2, second.in_flight, failed, false);
                escalations("first");
                let tried = primary.await;
                alone(tried, first, worker, pool, first_started)
            }
        },
    }
}

/// Books the attempt that lost an escalation race (cancelled; no fault of its worker).
fn outpaced(
    ctx: &mut RequestCtx,
    pool: &Arc<str>,
    worker: &crate::registry::Worker,
    in_flight: InFlight,
) {
    ctx.worker_seconds.push((pool.clone(), in_flight.finish()));
    ctx.failures
        .push((pool.clone(), worker.id.clone(), "outpaced"));
}

/// Books an attempt of an escalation race that failed before the other finished.
fn book_failed(
    shared: &crate::state::Shared,
    ctx: &mut RequestCtx,
    pool: &Arc<str>,
    worker: &crate::registry::Worker,
    in_flight: InFlight,
    tried: Tried,
    traced: bool,
) {
    match tried {
        Tried::Failed(e) => attempt_failed(shared, ctx, pool, worker, in_flight, &e, traced),
        // not reached: a race watches no client
        Tried::Answered(..) | Tried::ClientGone(_) => {
            ctx.worker_seconds.push((pool.clone(), in_flight.finish()));
        }
    }
}

/// Books a failed attempt: the worker's time, the trace, the worker's health (ejection),
/// the request's failures.
fn attempt_failed(
    shared: &crate::state::Shared,
    ctx: &mut RequestCtx,
    pool: &Arc<str>,
    worker: &crate::registry::Worker,
    in_flight: InFlight,
    failed: &AttemptError,
    traced: bool,
) {
    ctx.worker_seconds.push((pool.clone(), in_flight.finish()));
    if traced && let Some(t) = ctx.trace.as_mut() {
        t.end_attempt(Some(failed.reason_name()));
    }
    if failed.against_worker() && worker.health.record_failure() {
        tracing::warn!(worker = %worker.id, %pool, "worker ejected");
        shared.metrics.ejections.with_label_values(&[pool]).inc();
    }
    tracing::warn!(worker = %worker.id, %pool, reason = failed.reason_name(), "attempt failed: {}", failed.detail);
    ctx.failures
        .push((pool.clone(), worker.id.clone(), failed.reason_name()));
}

/// How sending a request to one worker went. (Returned once per attempt and taken apart
/// at once: boxing the answer would cost an allocation per request for nothing.)
#[allow(clippy::large_enum_variant)]
enum Tried {
    /// Its answer's header, and its body up to the first token.
    Answered(
        pingora::protocols::http::client::HttpSession,
        pingora::http::ResponseHeader,
        Vec<Option<bytes::Bytes>>,
    ),
    /// The worker failed before its first token (or left routing): retry elsewhere.
    Failed(AttemptError),
    /// The client left meanwhile.
    ClientGone(pingora::BError),
}

/// Sends `out` to `worker` and reads its answer's header, bounded by the total
/// `deadline` (then [`hold`] reads it up to the first token).
async fn send(
    proxy: &SwitchyardProxy,
    worker: &crate::registry::Worker,
    peer: &pingora::upstreams::peer::HttpPeer,
    out: &Outgoing<'_>,
    deadline: tokio::time::Instant,
) -> std::result::Result<
    (
        pingora::protocols::http::client::HttpSession,
        pingora::http::ResponseHeader,
    ),
    AttemptError,
> {
    let shared = &proxy.shared;
    // a worker that leaves routing (lease expired, deregistered) while the request waits
    // for its header is given up on at once: a frozen or partitioned host's connection
    // would otherwise hold the request for the whole first-byte timeout
    let sent = async {
        tokio::select! {
            // an answer that is there wins over the worker's leaving
            biased;
            r = attempt::attempt(&proxy.connector, &shared.config, worker, peer, out) => r,
            () = worker.gone.cancelled() => Err(AttemptError::network(
                routing_rules::RetryOn::Reset,
                "the worker left routing (lease expired or deregistered) before it answered",
            )),
        }
    };
    tokio::time::timeout_at(deadline, sent)
        .await
        .unwrap_or_else(|_| {
            Err(AttemptError::network(
                routing_rules::RetryOn::Timeout,
                "the router's total timeout passed",
            ))
        })
}

/// Reads a worker's answer (from [`send`]) up to its first token, watching the client
/// when given its `session` (two attempts racing each other cannot both watch it).
async fn hold(
    session: Option<&mut Session>,
    answered: std::result::Result<
        (
            pingora::protocols::http::client::HttpSession,
            pingora::http::ResponseHeader,
        ),
        AttemptError,
    >,
    worker: &crate::registry::Worker,
    deadline: tokio::time::Instant,
) -> Tried {
    // The commit point is the answer's first token, whatever the worker: a JSON answer is
    // held until its body comes (the worker writes it when the generation ends), an event
    // stream until its first `data:` event (engines such as vLLM, TGI and sglang send a
    // stream's header before they have a token). A worker that fails before that — its
    // connection broken, or the worker gone from routing (lease expired, deregistered)
    // while its connection hangs — is retried on the next one, invisibly, as a failure
    // before the first byte is. The client is watched meanwhile.
    let (mut up, resp) = match answered {
        Ok(a) => a,
        Err(e) => return Tried::Failed(e),
    };
    match hold_first(session, &mut up, &resp, worker, deadline).await {
        Ok(held) => Tried::Answered(up, resp, held),
        Err(Held::Failed(e)) => {
            // bounded: a frozen peer may never take a TLS close_notify
            let _ = tokio::time::timeout(Duration::from_secs(1), up.shutdown()).await;
            Tried::Failed(e)
        }
        Err(Held::ClientGone(e)) => {
            up.shutdown().await;
            Tried::ClientGone(e)
        }
    }
}

/// How resuming a broken stream went ([`resume`]).
pub enum Resumed {
    /// Another worker took the continuation: its answer, up to its first token.
    Answer(Box<relay::Answer>),
    /// No worker could (or the attempts or the total timeout ran out); the last reason.
    Failed(String),
    /// The client left meanwhile.
    ClientGone(pingora::BError),
}

/// Sends the continuation `body` of a stream broken mid-answer in `from` to another
/// worker that takes continuations: the same pool first, then the rest of the route in
/// its order (spot before on-demand), then the pools before it; healthy workers first.
/// Attempts count against `retry.max_attempts`, and a retry into a pool that already
/// failed this request spends the retry budget, as in [`forward`].
pub async fn resume(
    proxy: &SwitchyardProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
    decision: &routing_rules::RouteDecision,
    body: &bytes::Bytes,
    from: &Arc<str>,
) -> Resumed {
    let shared = &proxy.shared;
    let snapshot = shared.registry.snapshot();
    let retry = &decision.retry;
    let hops = hops(session, &shared.hop_id);
    let deadline = tokio::time::Instant::from(ctx.started + shared.config.total_timeout);
    let at = decision.targets.iter().position(|p| p == from).unwrap_or(0);
    let order: Vec<&Arc<str>> = decision.targets[at..]
        .iter()
        .chain(&decision.targets[..at])
        .collect();
    let mut last = String::from("no worker that takes a continuation is live on the route");
    for reach in [Reach::Healthy, Reach::AnyLive] {
        let mut i = 0;
        while let Some(pool) = order.get(i).copied() {
            if ctx.attempts >= retry.max_attempts {
                return Resumed::Failed(format!("{last}; no attempts left"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Resumed::Failed("the router's total timeout passed".into());
            }
            let Some(worker) = pick_in(shared, &snapshot, ctx, pool, reach, true) else {
                i += 1;
                continue;
            };
            if ctx.failures.iter().any(|(p, ..)| p == pool) && !budget_allows(shared, retry, pool) {
                i += 1;
                continue;
            }
            let Some(_probe) = worker.health.probe() else {
                ctx.tried.push(worker.id.clone());
                continue;
            };
            shared
                .metrics
                .retries
                .with_label_values(&[from, pool, "resume"])
                .inc();
            let (tried, in_flight, peer) =
                attempt_at(proxy, session, ctx, pool, &worker, body, &hops, deadline).await;
            match tried {
                // a continuation is an event stream (a worker answering it otherwise did
                // not take it as one)
                Tried::Answered(up, resp, held)
                    if resp.status.is_success() && relay::is_sse(&resp) =>
                {
                    worker.health.record_success();
                    if let Some(t) = ctx.trace.as_mut() {
                        t.answered();
                    }
                    return Resumed::Answer(Box::new(relay::Answer {
                        upstream: up,
                        header: resp,
                        peer,
                        held,
                        worker: Arc::clone(&worker),
                        pool: pool.clone(),
                        in_flight,
                    }));
                }
                Tried::Answered(mut up, resp, _) => {
                    // a 4xx to the continuation (an engine that refuses it): not this one
                    up.shutdown().await;
                    ctx.worker_seconds.push((pool.clone(), in_flight.finish()));
                    if let Some(t) = ctx.trace.as_mut() {
                        t.end_attempt(Some("refused"));
                    }
                    last = format!("{} refused the continuation ({})", worker.id, resp.status);
                    tracing::warn!(worker = %worker.id, %pool, "{last}");
                    ctx.failures
                        .push((pool.clone(), worker.id.clone(), "refused"));
                }
                Tried::Failed(failed) => {
                    attempt_failed(shared, ctx, pool, &worker, in_flight, &failed, true);
                    last = failed.summary().to_string();
                }
                Tried::ClientGone(e) => {
                    if let Some(t) = ctx.trace.as_mut() {
                        t.end_attempt(Some("client_gone"));
                    }
                    ctx.worker_seconds.push((pool.clone(), in_flight.finish()));
                    return Resumed::ClientGone(e);
                }
            }
        }
    }
    Resumed::Failed(last)
}

/// Why holding an answer for its first token ended without it.
enum Held {
    /// The worker failed, or left routing: retry elsewhere.
    Failed(AttemptError),
    ClientGone(pingora::BError),
}

/// An event stream held longer than this without a `data:` event is passed on anyway
/// (comments only: not an engine's answer as any known engine sends it).
const HOLD_LIMIT: usize = 64 << 10;

/// Reads the answer up to its first token: a JSON answer's first body bytes, an event
/// stream's first `data:` event (with any comments before it). Returns what was read, in
/// order, for the relay to send first (`None`: the body ended).
async fn hold_first(
    mut session: Option<&mut Session>,
    up: &mut pingora::protocols::http::client::HttpSession,
    resp: &pingora::http::ResponseHeader,
    worker: &crate::registry::Worker,
    deadline: tokio::time::Instant,
) -> std::result::Result<Vec<Option<bytes::Bytes>>, Held> {
    let sse = relay::is_sse(resp);
    if !sse {
        // a JSON answer comes when the generation ends: bounded by the total deadline (and
        // the worker's presence in routing), not by the first-byte timeout
        up.set_read_timeout(None);
    }
    let mut held: Vec<Option<bytes::Bytes>> = Vec::new();
    let mut scan = SseScan::default();
    let mut seen = 0usize;
    let mut watch = true;
    loop {
        let next = tokio::select! {
            // bytes that are there win over the worker's leaving
            biased;
            next = async {
                match session.as_deref_mut() {
                    Some(s) => relay::next_chunk(s, up, deadline, &mut watch).await,
                    None => relay::next_chunk_unwatched(up, deadline).await,
                }
            } => next,
            () = worker.gone.cancelled() => {
                return Err(Held::Failed(AttemptError::network(
                    routing_rules::RetryOn::Reset,
                    "the worker left routing (lease expired or deregistered) before its first token",
                )));
            }
        };
        match next {
            relay::Next::Chunk(Some(chunk)) => {
                seen += chunk.len();
                let event = sse && scan.feed(&chunk);
                held.push(Some(chunk));
                if !sse || event || seen > HOLD_LIMIT {
                    return Ok(held);
                }
            }
            relay::Next::Chunk(None) => {
                held.push(None);
                return Ok(held);
            }
            relay::Next::WorkerFailed(e) => {
                let reason = if matches!(e.etype(), ReadTimedout) {
                    routing_rules::RetryOn::Timeout
                } else {
                    routing_rules::RetryOn::Reset
                };
                return Err(Held::Failed(AttemptError::network(
                    reason,
                    format!("the worker failed before its first token: {e}"),
                )));
            }
            relay::Next::Timeout => {
                return Err(Held::Failed(AttemptError::network(
                    routing_rules::RetryOn::Timeout,
                    "the router's total timeout passed",
                )));
            }
            relay::Next::ClientGone(e) => return Err(Held::ClientGone(e)),
        }
    }
}

/// Finds the end of a server-sent event with a `data` field, fed the stream's bytes as
/// they come (lines end with LF, CRLF or CR; an event ends with an empty line).
#[derive(Default)]
struct SseScan {
    /// The current line's first bytes (enough to tell `data`), and its length.
    head: [u8; 5],
    len: usize,
    /// The last byte was a CR (an LF right after it ends no further line).
    after_cr: bool,
    /// The event so far has a `data` field.
    data: bool,
}

impl SseScan {
    /// Feeds `bytes`; true once an event with data has ended.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, b == b'\r');
            if b == b'\n' && after_cr {
                continue; // the LF of a CRLF
            }
            if b != b'\n' && b != b'\r' {
                if self.len < self.head.len() {
                    self.head[self.len] = b;
                }
                self.len += 1;
                continue;
            }
            // a line ended
            if self.len == 0 {
                if self.data {
                    return true;
                }
            } else {
                let head = &self.head[..self.len.min(5)];
                if head == b"data:" || (self.len == 4 && head == b"data") {
                    self.data = true;
                }
            }
            self.len = 0;
        }
        false
    }
}

/// The hop header to send: the client's (another router's) with this router's id added.
/// (Borrowed, without an allocation, when the client sent none: the common case.)
fn hops<'a>(session: &Session, own: &'a str) -> std::borrow::Cow<'a, str> {
    let prior = session
        .req_header()
        .headers
        .get_all(crate::admit::HOP_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    if prior.is_empty() {
        own.into()
    } else {
        format!("{prior},{own}").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_event_is_found_across_chunks_and_line_ends() {
        let has_data_event = |parts: &[&str]| {
            let mut scan = SseScan::default();
            parts.iter().any(|p| scan.feed(p.as_bytes()))
        };
        let c = |parts: &'static [&'static str]| parts;
        assert!(has_data_event(c(&["data: {\"a\":1}\n\n"])));
        assert!(has_data_event(c(&["da", "ta: x\r", "\n\r\n"])));
        assert!(has_data_event(c(&[
            ": ping\n\n",
            "event: message\ndata: x\n",
            "\n"
        ])));
        assert!(!has_data_event(c(&[": ping\n\n"])), "a comment is no token");
        assert!(
            !has_data_event(c(&["data: x\n"])),
            "the event has not ended"
        );
        assert!(!has_data_event(c(&["event: x\n\n"])));
        assert!(!has_data_event(c(&["xdata: x\n\n"])));
        assert!(has_data_event(c(&["data: x\r\r"])), "CR line ends");
        assert!(
            has_data_event(c(&["data\n", "\n"])),
            "a data field with no value"
        );
        assert!(!has_data_event(c(&["datax\n\n"])));
        assert!(has_data_event(c(&["data: x\r\n", "\r\n"])));
    }

    #[test]
    fn budget_allows_floor_plus_ratio() {
        let b = RetryBudget::default();
        for _ in 0..100 {
            b.record_request();
        }
        let granted = (0..100).filter(|_| b.try_retry(0.2, 3)).count();
        assert_eq!(granted, 23);
    }
}
