//! L7: what tollgate does with HTTP requests on connections matched to a route. Recognised LLM
//! operations go through [`llm`] (inspected, measured, reported); everything else is proxied
//! transparently by [`http`].

pub mod http;
pub mod llm;

pub use self::http::{handle, L7Context, ProxyBody};

use ::http::StatusCode;

use crate::upstream::{FailureKind, UpstreamError};

/// Failures tollgate itself answers for. Each maps to a status and an OpenAI-shaped error body,
/// so agents' SDKs surface a readable message instead of a JSON decode error.
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
            ProtocolError::ClientBody(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// OpenAI `error.type` and `error.code`.
    pub fn type_and_code(&self) -> (&'static str, &'static str) {
        match self {
            ProtocolError::Upstream(e) => match e.kind() {
                FailureKind::Timeout => ("upstream_error", "upstream_timeout"),
                FailureKind::Connect => ("upstream_error", "upstream_connect_failed"),
                FailureKind::Other => ("upstream_error", "upstream_failed"),
            },
            ProtocolError::BodyTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            ProtocolError::ClientBody(_) => ("invalid_request_error", "bad_request_body"),
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
