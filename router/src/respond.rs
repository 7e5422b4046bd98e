//! Answers the router writes itself: JSON bodies and OpenAI-shaped errors.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use crate::ctx::RequestCtx;
use crate::error::ProxyError;

/// A complete JSON answer with `extra` headers.
pub async fn json(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> Result<()> {
    ctx.status = status;
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header("content-type", "application/json")?;
    if !ctx.request_id.is_empty() {
        h.insert_header(crate::admit::REQUEST_ID, ctx.request_id.as_str())?;
    }
    h.insert_header("content-length", body.len().to_string())?;
    for (k, v) in extra {
        h.insert_header(*k, v.as_str())?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await
}

/// The error's OpenAI body with its status, and `Retry-After` where it applies.
pub async fn error(session: &mut Session, ctx: &mut RequestCtx, e: &ProxyError) -> Result<()> {
    error_with(session, ctx, e, Vec::new()).await
}

/// [`error`] with `extra` headers.
pub async fn error_with(
    session: &mut Session,
    ctx: &mut RequestCtx,
    e: &ProxyError,
    mut extra: Vec<(&'static str, String)>,
) -> Result<()> {
    // An answer given before the whole body was read (413, 408, 503 budget, 404, 405,
    // 508) closes the connection: keeping it would make pingora drain the rest of the
    // body first, with no time limit.
    if !session.as_downstream_mut().is_body_done() {
        session.set_keepalive(None);
    }
    if let Some(s) = e.retry_after() {
        extra.push(("retry-after", s.to_string()));
    }
    json(session, ctx, e.status(), e.body(), &extra).await
}
