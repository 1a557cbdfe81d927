//! Recognised LLM operations: the request is buffered (bounded) to read `model` and `stream`,
//! rewritten only to ask for usage on streams, and the response is observed as it streams past
//! (see [`body`]) until one [`LlmCall`] can be reported.

mod body;
mod json;
pub mod openai;
pub mod sse;

pub use body::ObservedBody;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::http::{error_response, prepare, prepare_uri, send, L7Context, ProxyBody};
use super::ProtocolError;
use crate::telemetry::{LlmCall, Telemetry};
use body::Mode;

/// Sink for finished LLM calls: the telemetry facade, plus an optional observer channel that
/// tests (and future in-process consumers) read without going through metrics.
pub struct Reporter {
    telemetry: Arc<Telemetry>,
    observer: Option<mpsc::Sender<LlmCall>>,
}

impl Reporter {
    /// Report to `telemetry`, and copy each call to `observer` when given (never blocks: a full
    /// channel drops the copy).
    pub fn new(telemetry: Arc<Telemetry>, observer: Option<mpsc::Sender<LlmCall>>) -> Self {
        Reporter { telemetry, observer }
    }

    /// Hand one finished call to every sink.
    pub fn report(&self, call: LlmCall) {
        self.telemetry.llm_call(&call);
        if let Some(o) = &self.observer {
            let _ = o.try_send(call);
        }
    }
}

/// Proxy one chat-completions request and return the observed response.
pub(crate) async fn chat_completions(ctx: &L7Context, req: Request<Incoming>) -> Response<ProxyBody> {
    let t0 = Instant::now();
    let (mut parts, body) = req.into_parts();
    let mut call = Box::new(LlmCall {
        agent: ctx.agent.clone(),
        route: ctx.route.clone(),
        provider: ctx.provider,
        operation: "chat",
        request_model: None,
        response_model: None,
        response_id: None,
        stream: false,
        status: 0,
        usage: None,
        finish_reasons: Vec::new(),
        server_address: Some(ctx.target.server_address.clone()),
        server_port: Some(ctx.target.server_port),
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        start: SystemTime::now(),
        ttft: None,
        duration: Duration::ZERO,
        error: None,
        traceparent: parts.headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string),
    });

    let limits = &ctx.config.limits;
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_request_body_bytes as u64) {
        return fail(ctx, call, t0, ProtocolError::BodyTooLarge { limit: limits.max_request_body_bytes });
    }
    let bytes = match Limited::new(body, limits.max_request_body_bytes).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return fail(ctx, call, t0, ProtocolError::BodyTooLarge { limit: limits.max_request_body_bytes })
        }
        Err(e) => return fail(ctx, call, t0, ProtocolError::ClientBody(e.to_string())),
    };

    let (body, injected) = rewrite(&bytes, &mut call);
    // Identity encoding, so usage can be read from the response.
    parts.headers.remove(ACCEPT_ENCODING);
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    prepare(ctx, &mut parts);
    if let Err(e) = prepare_uri(ctx, &mut parts) {
        return fail(ctx, call, t0, e);
    }
    let resp = match send(ctx, Request::from_parts(parts, Either::Right(Full::new(body)))).await {
        Ok(r) => r,
        Err(e) => return fail(ctx, call, t0, e),
    };

    let (mut rparts, rbody) = resp.into_parts();
    call.status = rparts.status.as_u16();
    let is_sse = rparts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    let drop_usage = injected && is_sse;
    if drop_usage {
        // Bytes will be removed: let hyper frame the body itself.
        rparts.headers.remove(CONTENT_LENGTH);
    }
    let mode =
        if is_sse { Mode::sse(limits.max_sse_event_bytes, drop_usage) } else { Mode::json(limits.max_inspect_bytes) };
    let observed = ObservedBody::new(rbody, mode, call, t0, ctx.reporter.clone());
    Response::from_parts(rparts, ProxyBody::Observed(Box::new(observed)))
}

/// Read request fields into `call`; add `include_usage` to streams that lack it. Returns the
/// body to send and whether it was rewritten.
fn rewrite(bytes: &Bytes, call: &mut LlmCall) -> (Bytes, bool) {
    let Some(info) = openai::inspect_request(bytes) else {
        return (bytes.clone(), false);
    };
    call.stream = info.stream;
    call.request_model = info.model.clone();
    if !openai::needs_usage_injection(&info) {
        return (bytes.clone(), false);
    }
    match openai::inject_include_usage(bytes, &info) {
        Ok(b) => (b, true),
        Err(e) => {
            tracing::debug!(error = %e, "not adding stream_options.include_usage");
            (bytes.clone(), false)
        }
    }
}

/// Report a call that ended in a tollgate-side failure and answer the client.
fn fail(ctx: &L7Context, mut call: Box<LlmCall>, t0: Instant, e: ProtocolError) -> Response<ProxyBody> {
    let resp = error_response(&e);
    call.status = resp.status().as_u16();
    call.error = Some(e.to_string());
    call.duration = t0.elapsed();
    tracing::debug!(route = %ctx.route, error = %e, "llm call failed before a response");
    ctx.reporter.report(*call);
    resp
}
