//! Reading the request body: whole, under the per-request cap, the global body budget
//! ([`crate::budget`]) and a whole-body deadline.

use bytes::Bytes;
use pingora::prelude::*;

use crate::budget::Held;
use crate::error::ProxyError;
use crate::state::Shared;

/// The body and its reservation in the budget, or the error to answer. Content-Length is
/// checked (and must fit the budget) before reading; chunked bodies are counted as they
/// arrive. The outer `Err` is a downstream I/O failure (nobody to answer).
pub async fn read(
    shared: &Shared,
    session: &mut Session,
) -> Result<std::result::Result<(Bytes, Held), ProxyError>> {
    let limit = shared.config.max_body_bytes;
    let budget = &shared.body_budget;
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(Err(ProxyError::TooLarge { limit }));
    }
    // A declared body that cannot fit now is refused before reading it; otherwise bytes
    // are reserved as they arrive, so a client that declares much and sends little
    // holds only what it sent.
    if declared.is_some_and(|n| budget.in_use().saturating_add(n) > budget.limit()) {
        return Ok(Err(ProxyError::BodyBudget {
            limit: budget.limit(),
        }));
    }
    let Some(mut held) = budget.reserve(0) else {
        return Ok(Err(ProxyError::BodyBudget {
            limit: budget.limit(),
        }));
    };
    // nothing is allocated for bytes not yet reserved: the buffer grows as bytes arrive
    let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(4096).min(64 << 10));
    // The whole body must arrive within the body timeout (pingora's own timeout is per
    // read: a client dripping a byte a minute would hold its reservation forever).
    let deadline = tokio::time::Instant::now() + shared.config.body_timeout;
    loop {
        let read = session.as_downstream_mut().read_request_body();
        let Ok(next) = tokio::time::timeout_at(deadline, read).await else {
            return Ok(Err(ProxyError::BodyTimeout {
                timeout: shared.config.body_timeout,
            }));
        };
        let Some(chunk) = next? else { break };
        let len = buf.len() + chunk.len();
        if len > limit {
            return Ok(Err(ProxyError::TooLarge { limit }));
        }
        if !held.grow_to(len) {
            return Ok(Err(ProxyError::BodyBudget {
                limit: budget.limit(),
            }));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Ok((buf.freeze(), held)))
}
