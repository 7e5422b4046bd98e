//! Router errors and their OpenAI-shaped answers.

use bytes::Bytes;

/// Every way the router itself answers a request with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid JSON body: {0}")]
    BadJson(String),
    #[error("{0}")]
    BadRequest(String, Option<&'static str>),
    #[error("The model `{0}` does not exist or no worker serves it")]
    UnknownModel(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body did not arrive within {timeout:?}")]
    BodyTimeout { timeout: std::time::Duration },
    #[error("request headers are larger than the limit of {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("unknown endpoint {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No pool on the route has a live worker (or every attempt failed).
    #[error("no capacity: {0}")]
    NoCapacity(String),
    /// The bodies of requests in flight fill the router's memory budget.
    #[error("the router is holding its limit of {limit} bytes of request bodies; retry shortly")]
    BodyBudget { limit: usize },
}

impl ProxyError {
    pub fn status(&self) -> u16 {
        match self {
            Self::BadJson(_) | Self::BadRequest(..) => 400,
            Self::UnknownModel(_) | Self::NotFound(_) => 404,
            Self::MethodNotAllowed => 405,
            Self::BodyTimeout { .. } => 408,
            Self::TooLarge { .. } => 413,
            Self::HeadersTooLarge { .. } => 431,
            Self::NoCapacity(_) | Self::BodyBudget { .. } => 503,
        }
    }

    fn kind_and_code(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadJson(_) => ("invalid_request_error", "invalid_json"),
            Self::BadRequest(..) => ("invalid_request_error", "invalid_request"),
            Self::UnknownModel(_) => ("invalid_request_error", "model_not_found"),
            Self::TooLarge { .. } => ("invalid_request_error", "request_too_large"),
            Self::BodyTimeout { .. } => ("invalid_request_error", "request_timeout"),
            Self::HeadersTooLarge { .. } => ("invalid_request_error", "headers_too_large"),
            Self::NotFound(_) => ("invalid_request_error", "not_found"),
            Self::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
            Self::NoCapacity(_) => ("server_error", "no_capacity"),
            Self::BodyBudget { .. } => ("server_error", "router_overloaded"),
        }
    }

    /// `Retry-After` seconds, for errors a client should retry later.
    pub fn retry_after(&self) -> Option<u32> {
        matches!(self, Self::NoCapacity(_) | Self::BodyBudget { .. }).then_some(1)
    }

    /// `{"error": {"message", "type", "code", "param"}}`.
    pub fn body(&self) -> Bytes {
        let (kind, code) = self.kind_and_code();
        let param = match self {
            Self::BadRequest(_, p) => *p,
            Self::UnknownModel(_) => Some("model"),
            _ => None,
        };
        let v = serde_json::json!({
            "error": { "message": self.to_string(), "type": kind, "code": code, "param": param }
        });
        Bytes::from(v.to_string())
    }
}
