//! Errors tollgate itself answers, in the caller's API shape: an OpenAI SDK raises
//! `APIStatusError` with our message, an Anthropic SDK its own error class, a Gemini client its
//! `google.rpc.Status`, instead of a JSON decode failure on a body it does not understand.
//! Every message starts with `tollgate:` so operators can tell our answers from the provider's.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};

use super::http::ProxyBody;
use super::llm::api::Shape;

/// Error classes, mapped per shape below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is malformed or cannot be served as asked (400, 404, 413).
    InvalidRequest,
    /// Authentication missing or refused (401).
    Authentication,
    /// Refused by policy (403).
    Permission,
    /// Rate or token limit (429).
    RateLimit,
    /// Upstream unreachable or failed (502).
    Upstream,
    /// Upstream too slow (504).
    Timeout,
    /// Every target is out (503).
    Unavailable,
    /// tollgate itself has no room for the request now (503; retry shortly).
    Overloaded,
}

impl ErrorClass {
    fn openai_type(self) -> &'static str {
        match self {
            ErrorClass::InvalidRequest => "invalid_request_error",
            ErrorClass::Authentication => "authentication_error",
            ErrorClass::Permission => "permission_error",
            ErrorClass::RateLimit => "rate_limit_error",
            ErrorClass::Upstream | ErrorClass::Timeout | ErrorClass::Unavailable => "upstream_error",
            ErrorClass::Overloaded => "server_error",
        }
    }

    fn anthropic_type(self, status: StatusCode) -> &'static str {
        match self {
            ErrorClass::InvalidRequest if status == StatusCode::NOT_FOUND => "not_found_error",
            ErrorClass::InvalidRequest if status == StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            ErrorClass::InvalidRequest if status == StatusCode::REQUEST_TIMEOUT => "timeout_error",
            ErrorClass::InvalidRequest => "invalid_request_error",
            ErrorClass::Authentication => "authentication_error",
            ErrorClass::Permission => "permission_error",
            ErrorClass::RateLimit => "rate_limit_error",
            ErrorClass::Timeout => "timeout_error",
            ErrorClass::Unavailable | ErrorClass::Overloaded => "overloaded_error",
            ErrorClass::Upstream => "api_error",
        }
    }

    fn gemini_status(self, status: StatusCode) -> &'static str {
        match self {
            ErrorClass::InvalidRequest if status == StatusCode::NOT_FOUND => "NOT_FOUND",
            ErrorClass::InvalidRequest if status == StatusCode::REQUEST_TIMEOUT => "DEADLINE_EXCEEDED",
            ErrorClass::InvalidRequest => "INVALID_ARGUMENT",
            ErrorClass::Authentication => "UNAUTHENTICATED",
            ErrorClass::Permission => "PERMISSION_DENIED",
            ErrorClass::RateLimit => "RESOURCE_EXHAUSTED",
            ErrorClass::Timeout => "DEADLINE_EXCEEDED",
            ErrorClass::Unavailable | ErrorClass::Upstream | ErrorClass::Overloaded => "UNAVAILABLE",
        }
    }
}

/// An error response in `shape` with `status`; `code` is OpenAI's machine-readable
/// `error.code`.
pub fn shaped_error(
    shape: Shape,
    status: StatusCode,
    class: ErrorClass,
    code: &str,
    message: &str,
) -> Response<ProxyBody> {
    let bytes = Bytes::from(error_body(shape, status, class, code, message));
    let mut r = Response::new(ProxyBody::Full(Some(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The JSON body of [`shaped_error`], for callers that can only replace a body (a response
/// whose headers already went out).
pub fn error_body(shape: Shape, status: StatusCode, class: ErrorClass, code: &str, message: &str) -> Vec<u8> {
    let message = format!("tollgate: {message}");
    let body = match shape {
        Shape::OpenAi => serde_json::json!({
            "error": { "message": message, "type": class.openai_type(), "param": null, "code": code }
        }),
        Shape::Anthropic => serde_json::json!({
            "type": "error",
            "error": { "type": class.anthropic_type(status), "message": message }
        }),
        Shape::Gemini => serde_json::json!({
            "error": { "code": status.as_u16(), "message": message, "status": class.gemini_status(status) }
        }),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn json(r: Response<ProxyBody>) -> serde_json::Value {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test]
    async fn each_shape_is_what_its_sdk_expects() {
        let st = StatusCode::BAD_GATEWAY;
        let o = json(shaped_error(Shape::OpenAi, st, ErrorClass::Upstream, "upstream_failed", "boom")).await;
        assert_eq!(o["error"]["type"], "upstream_error");
        assert_eq!(o["error"]["code"], "upstream_failed");
        assert_eq!(o["error"]["message"], "tollgate: boom");
        let a = json(shaped_error(Shape::Anthropic, st, ErrorClass::Upstream, "upstream_failed", "boom")).await;
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "api_error");
        let g = json(shaped_error(Shape::Gemini, StatusCode::GATEWAY_TIMEOUT, ErrorClass::Timeout, "t", "slow")).await;
        assert_eq!(g["error"]["code"], 504);
        assert_eq!(g["error"]["status"], "DEADLINE_EXCEEDED");
    }
}
