//! Admission: the first look at a request, before its body is read. Header size limit,
//! the loop guard, and which endpoint the path names (`GET /v1/models` is answered here).

use pingora::prelude::*;
use routing_rules::Endpoint;

use crate::ctx::RequestCtx;
use crate::error::ProxyError;
use crate::respond;
use crate::state::Shared;

/// The header each router adds to what it forwards, naming itself: a request that comes
/// back with this router's name in it has looped (a worker address that is a router's own
/// listener, routers pointing at each other) and is refused instead of multiplying.
pub const HOP_HEADER: &str = "x-switchyard-hop";
/// The request id header, accepted from the client, echoed, and sent to the worker.
pub const REQUEST_ID: &str = "x-request-id";
/// Routers a request may pass through.
const MAX_HOPS: usize = 8;

/// The endpoint to serve, or `None` when the request has been answered here.
pub async fn admit(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<Option<Endpoint>> {
    // Connection hygiene, for this request's writes and this connection's next request:
    // an idle keep-alive connection closes after the keep-alive timeout, a client that
    // stops reading after the send timeout. A router shutting down or handing over to its
    // upgrade answers with `Connection: close`, so clients move their next requests to the
    // new process instead of meeting a connection closed under them.
    if shared
        .shutting_down
        .load(std::sync::atomic::Ordering::Relaxed)
        || session.get_keepalive().is_none()
    {
        session.set_keepalive(None);
    } else {
        session.set_keepalive(Some(shared.config.keepalive_timeout.as_secs().max(1)));
    }
    session.set_write_timeout(Some(shared.config.send_timeout));
    ctx.request_id = crate::ctx::request_id(session.req_header().headers.get(REQUEST_ID));
    let (header_bytes, method, path) = {
        let head = session.req_header();
        let bytes: usize = head
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        (bytes, head.method.clone(), head.uri.path().to_string())
    };
    let limit = shared.config.max_header_bytes;
    if header_bytes > limit {
        respond::error(session, ctx, &ProxyError::HeadersTooLarge { limit }).await?;
        return Ok(None);
    }
    let endpoint = match (method.as_str(), path.as_str()) {
        ("GET", "/v1/models") => {
            models(shared, session, ctx).await?;
            return Ok(None);
        }
        ("POST", "/v1/chat/completions") => Endpoint::ChatCompletions,
        ("POST", "/v1/completions") => Endpoint::Completions,
        ("POST", "/v1/embeddings") => Endpoint::Embeddings,
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models") => {
            respond::error(session, ctx, &ProxyError::MethodNotAllowed).await?;
            return Ok(None);
        }
        _ => {
            respond::error(session, ctx, &ProxyError::NotFound(path)).await?;
            return Ok(None);
        }
    };
    ctx.path = path;
    ctx.endpoint = Some(endpoint);
    if looped(
        shared,
        session.req_header().headers.get_all(HOP_HEADER).iter(),
    ) {
        respond::error(session, ctx, &ProxyError::Loop).await?;
        return Ok(None);
    }
    Ok(Some(endpoint))
}

/// Whether the hop header names this router, or more routers than a request may cross.
fn looped<'a>(shared: &Shared, values: impl Iterator<Item = &'a http::HeaderValue>) -> bool {
    let mut hops = 0;
    for v in values {
        for hop in v.to_str().unwrap_or_default().split(',') {
            hops += 1;
            if hop.trim() == shared.hop_id || hops > MAX_HOPS {
                return true;
            }
        }
    }
    false
}

/// `GET /v1/models`: every model some registered or static worker serves that the caller's
/// tenant may use (`auth: required`: a key no tenant holds gets 401, as for completions).
async fn models(shared: &Shared, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    let rules = shared.rules.load();
    let tenant = crate::tenants::tenant_of_headers(&rules.rules, &session.req_header().headers);
    let tenant = tenant.as_deref().and_then(|t| rules.rules.tenant(t));
    if tenant.is_none() && rules.rules.auth() == routing_rules::Auth::Required {
        return respond::error(session, ctx, &ProxyError::InvalidApiKey).await;
    }
    let snapshot = shared.registry.snapshot();
    let mut names: Vec<&str> = snapshot
        .workers()
        .flat_map(|w| w.models.iter().map(|m| m.name.as_str()))
        .filter(|m| tenant.is_none_or(|t| t.allows_model(m)))
        .collect();
    names.sort_unstable();
    names.dedup();
    let data: Vec<_> = names
        .iter()
        .map(|n| serde_json::json!({ "id": n, "object": "model", "created": 0, "owned_by": "switchyard" }))
        .collect();
    let body = serde_json::json!({ "object": "list", "data": data }).to_string();
    respond::json(session, ctx, 200, body.into(), &[]).await
}
