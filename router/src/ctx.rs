//! The per-request context (pingora's `CTX`): everything the stages learn about one
//! request, and what `logging` reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use routing_rules::{Endpoint, RouteDecision};

use crate::budget::Held;
use crate::classify::Classified;

pub struct RequestCtx {
    pub started: Instant,
    /// The request's id: the client's `x-request-id` when it sent a usable one, else one
    /// made here. Echoed to the client, sent to the worker, in the access line.
    pub request_id: String,
    /// Set once the path names an inference endpoint (requests to other paths are not
    /// counted in the request metrics).
    pub endpoint: Option<Endpoint>,
    /// The request's URI path, as forwarded.
    pub path: String,
    /// What classification found (model and tenant set as soon as the body is parsed).
    pub classified: Classified,
    pub decision: Option<RouteDecision>,
    /// The request body and its reservation in the body budget. Held until a worker
    /// answers (any attempt may replay it); dropped at the commit point.
    pub body: Option<(Bytes, Held)>,
    /// The pool whose worker answered, and that worker (the last, when a stream was
    /// resumed).
    pub pool: Option<Arc<str>>,
    pub worker: Option<String>,
    /// Attempts made, the first included.
    pub attempts: u32,
    /// Workers tried, by id: never tried twice for one request.
    pub tried: Vec<String>,
    /// Streams resumed on another worker after their worker failed mid-answer.
    pub resumed: u32,
    /// Pools of the route moved behind the others for the rule's latency objective.
    pub spilled: Vec<Arc<str>>,
    /// Each failed attempt: `(pool, worker id, retry class)`, for the log.
    pub failures: Vec<(Arc<str>, String, &'static str)>,
    /// The status the client got (499: the client left before an answer could be sent).
    pub status: u16,
    /// When the first answer byte was relayed to the client, from `started`.
    pub ttft: Option<std::time::Duration>,
    /// Completion tokens the worker reported in its answer's `usage`.
    pub completion_tokens: Option<u64>,
    /// Whether the router asked the worker for a usage frame the client did not ask for
    /// (taken out of the stream again, see [`crate::usage`]).
    pub usage_asked: bool,
    /// Each attempt's pool and share of its worker's time (seconds), for cost.
    pub worker_seconds: Vec<(Arc<str>, f64)>,
    /// The tenant's admission: holds its place among the tenant's requests in flight.
    pub admitted: Option<crate::tenants::Admitted>,
    /// OpenAI's `x-ratelimit-*` headers for the answer (the tenant's limits and what is
    /// left of them), when its tenant has per-minute limits.
    pub ratelimit: Vec<(&'static str, String)>,
    /// The request's trace, when tracing is on.
    pub trace: Option<Box<crate::trace::RequestTrace>>,
    _active: Active,
}

impl RequestCtx {
    pub fn new(active: &Arc<AtomicUsize>) -> Self {
        Self {
            started: Instant::now(),
            request_id: String::new(),
            endpoint: None,
            path: String::new(),
            classified: Classified::default(),
            decision: None,
            body: None,
            pool: None,
            worker: None,
            attempts: 0,
            tried: Vec::new(),
            resumed: 0,
            spilled: Vec::new(),
            failures: Vec::new(),
            status: 0,
            ttft: None,
            completion_tokens: None,
            usage_asked: false,
            worker_seconds: Vec::new(),
            admitted: None,
            ratelimit: Vec::new(),
            trace: None,
            _active: Active::new(active),
        }
    }

    /// The model the client asked for (empty until the body is parsed).
    pub fn model(&self) -> &str {
        &self.classified.features.model
    }
}

/// The id for a request: the client's `x-request-id` when it is 1–128 visible ASCII
/// characters (it then ties the client's own logs to ours), else 32 random hex digits.
pub fn request_id(client: Option<&http::HeaderValue>) -> String {
    if let Some(v) = client
        && (1..=128).contains(&v.len())
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        && let Ok(s) = v.to_str()
    {
        return s.to_string();
    }
    format!("{:032x}", rand::random::<u128>())
}

/// Counts a request in `Shared::active_requests` while it lives.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(counter))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
