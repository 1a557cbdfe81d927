//! Upstream error bodies in the client's shape, so an agent's SDK raises its usual error type
//! with the upstream's message. Never fails: anything unparseable becomes a generic message
//! naming the HTTP status (plus the start of the body when it is text). The status code itself
//! is passed through unchanged by the caller.
//!
//! Shapes: OpenAI `{"error":{"message","type","param","code"}}`; Anthropic
//! `{"type":"error","error":{"type","message"}}`, whose `error.type` is a closed set.

use serde_json::{json, Value};

use super::common::{encode, text, Obj};

/// Longest piece of a non-JSON upstream body quoted in a fallback message.
const MAX_QUOTED: usize = 512;

/// Translate an upstream Anthropic error body (any status) into an OpenAI error body.
pub fn anthropic_error_to_openai(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let object = match error.and_then(Value::as_object) {
        // Anthropic shape, or already OpenAI's (both keep the message under error.message).
        Some(e) if text(e, "message").is_some() => openai_error_object(e, Some(status)),
        _ => {
            let message = loose_message(parsed.as_ref()).unwrap_or_else(|| fallback_message(status, body));
            json!({ "message": message, "type": openai_type_from_status(status), "param": null, "code": null })
        }
    };
    encode(&json!({ "error": object }))
}

/// Translate an upstream OpenAI(-compatible) error body (any status) into an Anthropic error
/// body.
pub fn openai_error_to_anthropic(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let object = match error.and_then(Value::as_object) {
        Some(e) if text(e, "message").is_some() => anthropic_error_object(e, Some(status)),
        _ => {
            let message = loose_message(parsed.as_ref()).unwrap_or_else(|| fallback_message(status, body));
            json!({ "type": anthropic_type_from_status(status).unwrap_or("api_error"), "message": message })
        }
    };
    encode(&json!({ "type": "error", "error": object }))
}

/// Anthropic error object (`{"type","message"}`, from a body or a stream `error` event) →
/// OpenAI error object. The Anthropic type is kept as `code`.
pub(super) fn openai_error_object(e: &Obj, status: Option<u16>) -> Value {
    let message = text(e, "message").unwrap_or("upstream error");
    let upstream_type = text(e, "type");
    let kind = match upstream_type {
        Some("api_error") | Some("overloaded_error") | Some("timeout_error") => "server_error",
        Some(
            t @ ("invalid_request_error"
            | "authentication_error"
            | "permission_error"
            | "not_found_error"
            | "rate_limit_error"
            | "billing_error"),
        ) => t,
        Some(t) if status.is_none() => t,
        _ => status.map_or("server_error", openai_type_from_status),
    };
    let code = text(e, "code").or(upstream_type);
    json!({ "message": message, "type": kind, "param": e.get("param").cloned().unwrap_or(Value::Null), "code": code })
}

/// OpenAI error object (from a body or a mid-stream error chunk) → Anthropic error object. The
/// status decides the type when it is an error status; otherwise the OpenAI type/code does.
pub(super) fn anthropic_error_object(e: &Obj, status: Option<u16>) -> Value {
    let message = text(e, "message").unwrap_or("upstream error");
    let kind = status
        .and_then(anthropic_type_from_status)
        .or_else(|| anthropic_type_from_openai(text(e, "type"), text(e, "code")))
        .unwrap_or("api_error");
    json!({ "type": kind, "message": message })
}

/// Best-effort message from non-standard error bodies: `{"error":"..."}`, `{"message":"..."}`,
/// `{"detail":"..."}`.
fn loose_message(v: Option<&Value>) -> Option<String> {
    let o = v?.as_object()?;
    ["error", "message", "detail"].iter().find_map(|k| text(o, k)).map(str::to_string)
}

/// "upstream returned HTTP 502: <start of body>".
fn fallback_message(status: u16, body: &[u8]) -> String {
    let quoted = std::str::from_utf8(body).map(str::trim).unwrap_or("");
    if quoted.is_empty() {
        return format!("upstream returned HTTP {status}");
    }
    let mut end = quoted.len().min(MAX_QUOTED);
    while !quoted.is_char_boundary(end) {
        end -= 1;
    }
    format!("upstream returned HTTP {status}: {}", &quoted[..end])
}

/// OpenAI error `type` for an HTTP status.
fn openai_type_from_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// Anthropic error `type` for an error HTTP status (`None` for non-error statuses).
fn anthropic_type_from_status(status: u16) -> Option<&'static str> {
    Some(match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        500..=599 => "api_error",
        _ => return None,
    })
}

/// Anthropic error `type` from an OpenAI error's `type`/`code`, for errors without a status.
fn anthropic_type_from_openai(kind: Option<&str>, code: Option<&str>) -> Option<&'static str> {
    let known = |t: &str| -> Option<&'static str> {
        Some(match t {
            "invalid_request_error" => "invalid_request_error",
            "authentication_error" | "invalid_api_key" => "authentication_error",
            "permission_error" => "permission_error",
            "not_found_error" | "model_not_found" => "not_found_error",
            "rate_limit_error" | "rate_limit_exceeded" | "requests" | "tokens" | "insufficient_quota" => {
                "rate_limit_error"
            }
            "billing_error" => "billing_error",
            "timeout_error" => "timeout_error",
            "overloaded_error" => "overloaded_error",
            "server_error" | "api_error" => "api_error",
            _ => return None,
        })
    };
    code.and_then(known).or_else(|| kind.and_then(known))
}
