//! The router's error model.
//!
//! - [`ProxyError`]: every answer the router gives a client itself, with its status, its
//!   OpenAI `type`/`code`/`param`, and `Retry-After` where retrying later helps.
//! - [`AttemptError`]: why one attempt at a worker failed: who caused it ([`Culprit`]),
//!   the retry class the rules' `retry.on` names, and whether it counts against the
//!   worker's health. Its detail goes to the log, never to the client.
//! - [`openai_body`]: the one builder of OpenAI's error body in this crate.

use std::fmt::Write as _;

use bytes::Bytes;
use routing_rules::RetryOn;

/// `{"error": {"message", "type", "code", "param"}}`: OpenAI's error shape, which the
/// official SDKs parse. Every error body this crate writes comes from here.
pub fn openai_body(message: &str, kind: &str, code: &str, param: Option<&str>) -> Bytes {
    let v = serde_json::json!({
        "error": { "message": message, "type": kind, "code": code, "param": param }
    });
    Bytes::from(v.to_string())
}

/// Client-supplied text echoed in an error (a model name, a path) is cut to this many bytes:
/// a 10 MB model name must not come back as a 10 MB answer and log line.
pub const ECHO_MAX: usize = 128;

/// `s` cut to at most [`ECHO_MAX`] bytes at a character boundary, marked when cut.
pub fn echo(s: &str) -> String {
    if s.len() <= ECHO_MAX {
        return s.to_string();
    }
    let mut end = ECHO_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 16);
    out.push_str(&s[..end]);
    let _ = write!(out, "… ({} bytes)", s.len());
    out
}

/// Every way the router itself answers a request with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid JSON body: {0}")]
    BadJson(String),
    #[error("{0}")]
    BadRequest(String, Option<&'static str>),
    #[error("The model `{}` does not exist or no worker serves it", echo(.0))]
    UnknownModel(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body did not arrive within {timeout:?}")]
    BodyTimeout { timeout: std::time::Duration },
    #[error("request headers are larger than the limit of {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("unknown endpoint {}", echo(.0))]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No pool on the route has a live worker, or every attempt failed. `last` is a
    /// client-safe summary of the last failure ([`AttemptError::summary`]).
    #[error("no worker could take the request (rule `{rule}`){}", last.map(|l| format!(": {l}")).unwrap_or_default())]
    NoCapacity {
        rule: String,
        last: Option<&'static str>,
    },
    /// The bodies of requests in flight fill the router's memory budget.
    #[error("the router is holding its limit of {limit} bytes of request bodies; retry shortly")]
    BodyBudget { limit: usize },
    /// The prompt alone is longer than the model's context window (as the rules declare it):
    /// no worker could take it, so it is refused before it is forwarded anywhere.
    #[error(
        "This model's maximum context length is {window} tokens, but the prompt has at least {at_least} tokens"
    )]
    ContextLengthExceeded {
        window: u32,
        at_least: u64,
        /// The field that holds the prompt: `messages` (chat) or `prompt` (completions,
        /// embeddings' `input`).
        param: &'static str,
    },
    /// The router's total timeout passed before any worker answered.
    #[error("no worker answered within the router's total timeout")]
    GatewayTimeout,
    /// The request already passed through this router (a worker address that is the
    /// router's own listener, or two routers pointing at each other).
    #[error("the request looped back to the router")]
    Loop,
    /// `auth: required` and the request's key is missing or belongs to no tenant.
    #[error(
        "Incorrect or missing API key: this router requires a tenant's key (Authorization: Bearer KEY)"
    )]
    InvalidApiKey,
    /// A tenant limit is reached: `what` is `requests`, `tokens` or `concurrent requests`.
    #[error("Rate limit reached for tenant `{tenant}` on {what}: limit {limit}. Please try again in {}s.", retry_after.as_secs().max(1))]
    RateLimited {
        tenant: String,
        what: &'static str,
        limit: u32,
        retry_after: std::time::Duration,
    },
    /// One request's prompt is more than the tenant's tokens per minute: it can never pass.
    #[error(
        "Request too large for tenant `{tenant}`: {tokens} prompt tokens, limit {limit} tokens per minute"
    )]
    TooLargeForTenant {
        tenant: String,
        tokens: u64,
        limit: u32,
    },
    /// The rule the request matched routes only to pools its tenant may not use.
    #[error("Tenant `{tenant}` may not use the pools rule `{rule}` routes to")]
    PoolNotAllowed { tenant: String, rule: String },
    /// The tenant's circuit breaker is open: its requests have been failing.
    #[error("Tenant `{tenant}`'s requests are failing; they are refused for {}s while the fleet recovers", retry_after.as_secs().max(1))]
    TenantCircuitOpen {
        tenant: String,
        retry_after: std::time::Duration,
    },
    /// The tenant spent its daily or monthly budget.
    #[error("Tenant `{tenant}` has spent its budget of ${budget_usd} for this {period} (UTC); it resets in {}s", retry_after.as_secs())]
    QuotaExceeded {
        tenant: String,
        budget_usd: f64,
        /// `day` or `month`.
        period: &'static str,
        retry_after: std::time::Duration,
    },
}

impl ProxyError {
    pub fn status(&self) -> u16 {
        match self {
            Self::BadJson(_) | Self::BadRequest(..) | Self::ContextLengthExceeded { .. } => 400,
            Self::UnknownModel(_) | Self::NotFound(_) => 404,
            Self::MethodNotAllowed => 405,
            Self::BodyTimeout { .. } => 408,
            Self::TooLarge { .. } => 413,
            Self::HeadersTooLarge { .. } => 431,
            Self::Loop => 508,
            Self::GatewayTimeout => 504,
            Self::NoCapacity { .. } | Self::BodyBudget { .. } | Self::TenantCircuitOpen { .. } => {
                503
            }
            Self::InvalidApiKey => 401,
            Self::PoolNotAllowed { .. } => 403,
            Self::RateLimited { .. }
            | Self::TooLargeForTenant { .. }
            | Self::QuotaExceeded { .. } => 429,
        }
    }

    fn kind_and_code(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadJson(_) => ("invalid_request_error", "invalid_json"),
            Self::BadRequest(..) => ("invalid_request_error", "invalid_request"),
            Self::ContextLengthExceeded { .. } => {
                ("invalid_request_error", "context_length_exceeded")
            }
            Self::UnknownModel(_) => ("invalid_request_error", "model_not_found"),
            Self::TooLarge { .. } => ("invalid_request_error", "request_too_large"),
            Self::BodyTimeout { .. } => ("invalid_request_error", "request_timeout"),
            Self::HeadersTooLarge { .. } => ("invalid_request_error", "headers_too_large"),
            Self::NotFound(_) => ("invalid_request_error", "not_found"),
            Self::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
            Self::NoCapacity { .. } => ("server_error", "no_capacity"),
            Self::BodyBudget { .. } => ("server_error", "router_overloaded"),
            Self::Loop => ("server_error", "loop_detected"),
            Self::GatewayTimeout => ("server_error", "timeout"),
            Self::InvalidApiKey => ("invalid_request_error", "invalid_api_key"),
            Self::RateLimited { what: "tokens", .. } | Self::TooLargeForTenant { .. } => {
                ("tokens", "rate_limit_exceeded")
            }
            Self::RateLimited { .. } => ("requests", "rate_limit_exceeded"),
            Self::QuotaExceeded { .. } => ("insufficient_quota", "insufficient_quota"),
            Self::TenantCircuitOpen { .. } => ("server_error", "tenant_circuit_open"),
            Self::PoolNotAllowed { .. } => ("invalid_request_error", "pool_not_allowed"),
        }
    }

    /// `Retry-After` seconds, for errors a client should retry later.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::NoCapacity { .. } | Self::BodyBudget { .. } => Some(1),
            // whole seconds, rounded up: a client that waits this long gets through
            Self::RateLimited { retry_after, .. }
            | Self::QuotaExceeded { retry_after, .. }
            | Self::TenantCircuitOpen { retry_after, .. } => {
                let ms = retry_after.as_millis().max(1);
                Some(u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX))
            }
            _ => None,
        }
    }

    pub fn body(&self) -> Bytes {
        let (kind, code) = self.kind_and_code();
        let param = match self {
            Self::BadRequest(_, p) => *p,
            Self::UnknownModel(_) => Some("model"),
            Self::ContextLengthExceeded { param, .. } => Some(*param),
            _ => None,
        };
        openai_body(&self.to_string(), kind, code, param)
    }
}

/// Who caused a failed attempt (pingora's `ErrorSource`, for our stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Culprit {
    /// The router could not even build the request (a bug, or a header it cannot send).
    Router,
    /// The connection to the worker: refused, reset, timed out.
    Network,
    /// The worker answered with a failure status.
    Worker,
}

/// Why one attempt at a worker failed. Nothing has been written to the client.
#[derive(Debug, Clone)]
pub struct AttemptError {
    pub culprit: Culprit,
    /// The retry class (`retry.on` in the rules).
    pub reason: RetryOn,
    /// The worker answered 429: healthy but full. Not held against its health (ejecting
    /// busy workers under load would only shrink capacity further).
    pub overloaded: bool,
    /// For the log only: may hold upstream error text.
    pub detail: String,
}

impl AttemptError {
    pub fn router(detail: impl std::fmt::Display) -> Self {
        Self::network(RetryOn::Connect, detail).by(Culprit::Router)
    }

    pub fn network(reason: RetryOn, detail: impl std::fmt::Display) -> Self {
        Self {
            culprit: Culprit::Network,
            reason,
            overloaded: false,
            detail: detail.to_string(),
        }
    }

    /// A response status that is not an answer: 429 (full), 503 (draining, preempted),
    /// other 5xx. `None` for a status the client should see.
    pub fn from_status(status: u16) -> Option<Self> {
        let reason = match status {
            429 | 503 => RetryOn::Preempted,
            500..=599 => RetryOn::Status5xx,
            _ => return None,
        };
        Some(Self {
            culprit: Culprit::Worker,
            reason,
            overloaded: status == 429,
            detail: format!("worker answered {status}"),
        })
    }

    fn by(mut self, culprit: Culprit) -> Self {
        self.culprit = culprit;
        self
    }

    /// Whether another worker may be tried: a router-side failure would fail there too.
    pub fn retryable(&self) -> bool {
        self.culprit != Culprit::Router
    }

    /// Whether it counts toward ejecting the worker.
    pub fn against_worker(&self) -> bool {
        self.culprit != Culprit::Router && !self.overloaded
    }

    /// The retry class's name, for metrics and logs.
    pub fn reason_name(&self) -> &'static str {
        reason_name(self.reason)
    }

    /// What the client may be told: the class of failure, no upstream text.
    pub fn summary(&self) -> &'static str {
        match (self.overloaded, self.culprit, self.reason) {
            (true, _, _) => "the last worker tried was at capacity",
            (_, Culprit::Router, _) => "the router could not forward it",
            (_, _, RetryOn::Timeout) => "the last worker tried timed out",
            (_, _, RetryOn::Preempted) => "the last worker tried was unavailable",
            (_, _, RetryOn::Status5xx) => "the last worker tried failed",
            (_, _, RetryOn::Connect | RetryOn::Reset) => "the last worker tried was unreachable",
        }
    }
}

/// The name `retry.on` uses for a retry class.
pub fn reason_name(r: RetryOn) -> &'static str {
    match r {
        RetryOn::Connect => "connect",
        RetryOn::Reset => "reset",
        RetryOn::Status5xx => "status_5xx",
        RetryOn::Preempted => "preempted",
        RetryOn::Timeout => "timeout",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_text_is_cut_at_a_char_boundary() {
        let long = "é".repeat(1000);
        let e = echo(&long);
        assert!(e.len() < ECHO_MAX + 20, "{}", e.len());
        assert!(e.ends_with("(2000 bytes)"), "{e}");
        assert_eq!(echo("smollm2"), "smollm2");
        let body = ProxyError::UnknownModel("m".repeat(10_000_000)).body();
        assert!(
            body.len() < 512,
            "a 10 MB model name gave a {} B body",
            body.len()
        );
    }

    #[test]
    fn statuses_map_to_retry_classes() {
        assert!(AttemptError::from_status(200).is_none());
        assert!(AttemptError::from_status(400).is_none());
        let full = AttemptError::from_status(429).unwrap();
        assert!(full.overloaded && !full.against_worker() && full.retryable());
        let gone = AttemptError::from_status(503).unwrap();
        assert_eq!(gone.reason, RetryOn::Preempted);
        assert!(gone.against_worker());
        assert_eq!(
            AttemptError::from_status(502).unwrap().reason,
            RetryOn::Status5xx
        );
        let ours = AttemptError::router("bad header");
        assert!(!ours.retryable() && !ours.against_worker());
        assert!(!ours.summary().contains("bad header"));
    }
}
