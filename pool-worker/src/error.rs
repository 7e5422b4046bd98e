//! Worker errors, and their OpenAI-shaped HTTP answers. [`error_body`] is the one builder
//! of the `{"error": {...}}` body: every answer and stream frame that reports an error
//! uses it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The model files could not be loaded (operator side).
    #[error("model: {0}")]
    Model(String),
    /// The request is wrong (client side, never retryable).
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
        code: &'static str,
    },
    #[error("The model `{0}` does not exist")]
    UnknownModel(String),
    /// Bounded queue full (retry later, maybe elsewhere).
    #[error("the worker's queue is full")]
    QueueFull,
    /// The worker is draining or was told to fail (retryable elsewhere).
    #[error("{0}")]
    Unavailable(&'static str),
    /// Inference failed (worker side).
    #[error("inference failed: {0}")]
    Engine(String),
}

impl WorkerError {
    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param,
            code: "invalid_request",
        }
    }
}

/// OpenAI's error body, `{"error": {"message", "type", "code", "param"}}` (`param` is
/// `null` when no single parameter is at fault).
pub fn error_body(kind: &str, code: &str, message: &str, param: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "error": { "message": message, "type": kind, "code": code, "param": param }
    })
}

/// [`error_body`] as a JSON answer with `status`.
pub fn openai_error(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
    param: Option<&str>,
) -> Response {
    (status, axum::Json(error_body(kind, code, message, param))).into_response()
}

impl IntoResponse for WorkerError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match self {
            Self::BadRequest { param, code, .. } => openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                code,
                &msg,
                param,
            ),
            Self::UnknownModel(_) => openai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                &msg,
                Some("model"),
            ),
            Self::QueueFull => {
                let mut r = openai_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "queue_full",
                    &msg,
                    None,
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            Self::Unavailable(code) => {
                let mut r = openai_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    code,
                    &msg,
                    None,
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            Self::Model(_) | Self::Engine(_) => openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "inference_failed",
                &msg,
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Every error answer, and the error frame of a stream, carries all four fields.
    #[test]
    fn error_bodies_have_message_type_code_and_param() {
        let v = super::error_body("server_error", "inference_failed", "boom", None);
        let e = &v["error"];
        assert_eq!(e["message"], "boom");
        assert_eq!(e["type"], "server_error");
        assert_eq!(e["code"], "inference_failed");
        assert!(e.get("param").is_some_and(Value::is_null), "{v}");
        let v = super::error_body("invalid_request_error", "invalid_request", "x", Some("n"));
        assert_eq!(v["error"]["param"], "n");
    }
}
