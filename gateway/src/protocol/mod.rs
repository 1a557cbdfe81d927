//! L7: what tollgate does with HTTP requests on connections matched to a route. Recognised LLM
//! operations go through [`llm`] (inspected, measured, reported); routes with `protocol: mcp`
//! go through [`mcp`] and `protocol: a2a` through [`a2a`]; everything else is proxied
//! transparently by [`http`].

pub mod a2a;
pub mod bounded;
pub mod errors;
pub mod http;
pub mod llm;
pub mod mcp;

pub use self::http::{handle, L7Context, ProxyBody};

use std::time::Duration;

use ::http::{Response, StatusCode};

use crate::upstream::provider::ProviderError;
use crate::upstream::{FailureKind, UpstreamError};
use errors::{shaped_error, ErrorClass};
use llm::api::Shape;

/// Failures tollgate itself answers for. Each maps to a status and an error body in the
/// caller's API shape (see [`errors`]), so agents' SDKs surface a readable message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The upstream could not be reached or broke mid-exchange.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Request body above `limits.max_request_body_bytes`.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge {
        /// Configured limit.
        limit: usize,
    },
    /// Reading the client's request body failed.
    #[error("reading request body: {0}")]
    ClientBody(String),
    /// The request body did not arrive whole within `limits.body_read_timeout`.
    #[error("request body not received within {} (limits.body_read_timeout)", humantime::format_duration(*.0))]
    BodyTimeout(Duration),
    /// The process-wide budget of buffered bodies (`limits.max_buffered_body_bytes`) had no
    /// room for this body.
    #[error("too many request bytes buffered at once (limits.max_buffered_body_bytes: {budget}); retry shortly")]
    BodyBudget {
        /// The budget in bytes.
        budget: usize,
    },
    /// The request body is not what the API expects (not JSON, unsupported field).
    #[error("{0}")]
    BadRequest(String),
    /// The chosen provider has no equivalent of the requested operation.
    #[error(transparent)]
    Unsupported(#[from] ProviderError),
    /// No model named by the request or the target, and the provider needs one in its URL.
    #[error("no model in the request and none configured for target provider {0}")]
    NoModel(String),
    /// The path is not an LLM operation and the route has no original destination.
    #[error("no LLM operation at {0}")]
    NotFound(String),
    /// Every attempt failed before response headers, or the retry budget ran out.
    #[error("route {route}: all targets failed ({attempts} attempts); last: {last}")]
    Exhausted {
        /// Route name.
        route: String,
        /// Attempts made.
        attempts: u32,
        /// Last failure.
        last: String,
        /// Last failure was a timeout.
        timeout: bool,
    },
    /// The per-call deadline passed before response headers.
    #[error("no response within the request deadline of {0:?}")]
    Deadline(Duration),
    /// A provider response that had to be read whole (to translate or check it) broke off or
    /// exceeded `limits.max_inspect_bytes`.
    #[error("provider response unreadable or too large: {0}")]
    UpstreamBody(String),
}

impl ProtocolError {
    /// Status returned to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            ProtocolError::Upstream(e) => match e.kind() {
                FailureKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            },
            ProtocolError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProtocolError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProtocolError::BodyBudget { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProtocolError::ClientBody(_) | ProtocolError::BadRequest(_) | ProtocolError::Unsupported(_) => {
                StatusCode::BAD_REQUEST
            }
            ProtocolError::NoModel(_) => StatusCode::BAD_REQUEST,
            ProtocolError::NotFound(_) => StatusCode::NOT_FOUND,
            ProtocolError::Exhausted { timeout: true, .. } | ProtocolError::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
            ProtocolError::Exhausted { .. } | ProtocolError::UpstreamBody(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Error class and OpenAI `error.code`.
    pub fn class_and_code(&self) -> (ErrorClass, &'static str) {
        match self {
            ProtocolError::Upstream(e) => match e.kind() {
                FailureKind::Timeout => (ErrorClass::Timeout, "upstream_timeout"),
                FailureKind::Connect => (ErrorClass::Upstream, "upstream_connect_failed"),
                FailureKind::Other => (ErrorClass::Upstream, "upstream_failed"),
            },
            ProtocolError::BodyTooLarge { .. } => (ErrorClass::InvalidRequest, "request_too_large"),
            ProtocolError::ClientBody(_) => (ErrorClass::InvalidRequest, "bad_request_body"),
            ProtocolError::BodyTimeout(_) => (ErrorClass::InvalidRequest, "request_body_timeout"),
            ProtocolError::BodyBudget { .. } => (ErrorClass::Overloaded, "body_budget_exhausted"),
            ProtocolError::BadRequest(_) => (ErrorClass::InvalidRequest, "invalid_request"),
            ProtocolError::Unsupported(_) => (ErrorClass::InvalidRequest, "unsupported_by_target"),
            ProtocolError::NoModel(_) => (ErrorClass::InvalidRequest, "model_required"),
            ProtocolError::NotFound(_) => (ErrorClass::InvalidRequest, "not_found"),
            ProtocolError::Exhausted { timeout: true, .. } => (ErrorClass::Timeout, "upstream_timeout"),
            ProtocolError::Exhausted { .. } => (ErrorClass::Upstream, "all_targets_failed"),
            ProtocolError::Deadline(_) => (ErrorClass::Timeout, "request_deadline"),
            ProtocolError::UpstreamBody(_) => (ErrorClass::Upstream, "upstream_response_unreadable"),
        }
    }

    /// OpenAI `error.type` and `error.code` (kept for callers that only speak OpenAI).
    pub fn type_and_code(&self) -> (&'static str, &'static str) {
        let (class, code) = self.class_and_code();
        let kind = match class {
            ErrorClass::InvalidRequest => "invalid_request_error",
            _ => "upstream_error",
        };
        (kind, code)
    }

    /// The response for this failure in the caller's API shape.
    pub fn response(&self, shape: Shape) -> Response<ProxyBody> {
        let (class, code) = self.class_and_code();
        let mut r = shaped_error(shape, self.status(), class, code, &self.to_string());
        if let Some(secs) = self.retry_after_secs() {
            r.headers_mut().insert(::http::header::RETRY_AFTER, ::http::HeaderValue::from(secs));
        }
        r
    }

    /// Seconds a client should wait before retrying, for failures that pass by themselves
    /// (sent as `retry-after`, which the SDKs honour).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            // Buffered bodies are given back as soon as their calls end.
            ProtocolError::BodyBudget { .. } => Some(1),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn statuses_for_tollgate_failures() {
        let t = ProtocolError::Upstream(UpstreamError::Timeout(Duration::from_secs(1)));
        assert_eq!(t.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(t.type_and_code(), ("upstream_error", "upstream_timeout"));
        let c = ProtocolError::Upstream(UpstreamError::Connect {
            addr: "127.0.0.1:1".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(c.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(ProtocolError::BodyTooLarge { limit: 1 }.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
