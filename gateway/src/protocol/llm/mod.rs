//! Recognised LLM operations (see [`api`]): the request is buffered (bounded) to read `model`
//! and `stream`, and the response is observed as it streams past (see [`body`]) until one
//! [`LlmCall`] can be reported. On routes with targets, [`dispatch`] chooses the provider,
//! injects its key, fails over and translates; otherwise the call goes to the original
//! destination, rewritten only to ask OpenAI-shaped streams for usage.

pub mod anthropic;
pub mod api;
mod body;
pub mod dispatch;
pub mod estimate;
pub mod gemini;
mod json;
pub mod openai;
pub mod sse;
pub mod translate;

pub use body::{FinishHook, ObservedBody};

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::http::{prepare, prepare_uri, send, L7Context, ProxyBody};
use super::ProtocolError;
use crate::config::ProviderKind;
use crate::policy::chain::{check_response, insert_headers, CallHooks, Deny, PolicyCtx, ResponseCheck, ResponseFilter};
use crate::protocol::errors::shaped_error;
use crate::telemetry::{LlmCall, Payload, SpanIds, Telemetry};
use api::{Api, Detected, Observer, Shape};
use body::{Mode, Observation};

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

    /// The telemetry facade (metrics of gateway attempts).
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Hand one finished call to every sink.
    pub fn report(&self, call: LlmCall) {
        self.telemetry.llm_call(&call);
        if let Some(o) = &self.observer {
            let _ = o.try_send(call);
        }
    }
}

/// Read the agent's request body within `limits.max_request_body_bytes`,
/// `limits.body_read_timeout` and the process budget `limits.max_buffered_body_bytes` (see
/// [`crate::protocol::bounded`]).
pub(crate) async fn read_request_body(
    ctx: &L7Context,
    headers: &http::HeaderMap,
    body: Incoming,
) -> Result<Bytes, ProtocolError> {
    crate::protocol::bounded::read_request_body(ctx, headers, body).await
}

/// Pass one recognised LLM call through to the original destination (or the route's
/// `upstream`) and return the observed response.
pub(crate) async fn observe_call(ctx: &L7Context, det: Detected, req: Request<Incoming>) -> Response<ProxyBody> {
    let t0 = Instant::now();
    let shape = det.api.shape();
    let (mut parts, body) = req.into_parts();
    let mut call = new_call(ctx, det.api, &parts);
    call.server_address = Some(ctx.target.server_address.clone());
    call.server_port = Some(ctx.target.server_port);

    let bytes = match read_request_body(ctx, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return report_failure(ctx, shape, call, t0, e),
    };
    let api = det.api;
    let (body, injected) = rewrite(det, &bytes, &mut call, ctx.include_usage);
    let (mut call, body, mut hooks) = match run_policies(ctx, api, call, body, t0).await {
        Ok(admitted) => admitted,
        Err(denied) => return denied,
    };
    // Identity encoding, so usage can be read from the response.
    parts.headers.remove(ACCEPT_ENCODING);
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    propagate(&call, &mut parts.headers);
    prepare(ctx, &mut parts);
    if let Err(e) = prepare_uri(ctx, &mut parts) {
        return report_failure(ctx, shape, call, t0, e);
    }
    let resp = match send(ctx, Request::from_parts(parts, Either::Right(Full::new(body)))).await {
        Ok(r) => r,
        Err(e) => return report_failure(ctx, shape, call, t0, e),
    };

    let (mut rparts, rbody) = resp.into_parts();
    call.status = rparts.status.as_u16();
    hooks.response_headers(rparts.status, &mut rparts.headers);
    let filter = if rparts.status.is_success() { hooks.response_filter() } else { None };
    let is_sse = rparts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().get(..17).is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream")));
    let observer = Observer::new(api, bytes, ctx.provider == ProviderKind::OpenaiCompatible);
    if rparts.status.is_success() && !is_sse {
        let checks = hooks.response_checks();
        if !checks.is_empty() {
            let held = Held { call, t0, shape, observer, filter, hooks, checks };
            return held.respond(ctx, rparts, rbody).await;
        }
    }
    let drop_usage = injected && is_sse;
    if drop_usage || filter.is_some() {
        // Bytes will be removed: let hyper frame the body itself.
        rparts.headers.remove(CONTENT_LENGTH);
    }
    let limits = &ctx.config.limits;
    let mode = match (is_sse, &filter) {
        (true, _) => Mode::sse(limits.max_sse_event_bytes, drop_usage),
        (false, Some(_)) => Mode::json_held(limits.max_inspect_bytes),
        (false, None) => Mode::json(limits.max_inspect_bytes),
    };
    let mut obs = Observation::plain(observer);
    match filter {
        Some(f) if is_sse => obs.translator = Some(f.into_stream(None, drop_usage)),
        f => obs.filter = f,
    }
    if !hooks.is_empty() {
        obs.on_finish = Some(with_policy_hooks(Box::new(|_| {}), hooks));
    }
    let observed = ObservedBody::new(rbody, mode, call, t0, ctx.reporter.clone(), obs);
    Response::from_parts(rparts, ProxyBody::Observed(Box::new(observed)))
}

/// Run the connection's policies on a call about to be sent: `Ok` with the body to send and
/// the call's response-phase hooks, or `Err` with the refusal already reported. An empty
/// chain returns at once.
pub(crate) async fn run_policies(
    ctx: &L7Context,
    api: Api,
    mut call: Box<LlmCall>,
    body: Bytes,
    t0: Instant,
) -> Result<(Box<LlmCall>, Bytes, CallHooks), Response<ProxyBody>> {
    // Payloads are logged as admitted: after redaction and decoration, never a refused prompt.
    let log = |call: &mut LlmCall, body: &Bytes| {
        if let Some(max) = ctx.log_payloads {
            call.payload = Some(Box::new(Payload::new(max, body)));
        }
    };
    if ctx.policies.is_empty() {
        log(&mut call, &body);
        return Ok((call, body, CallHooks::default()));
    }
    let pctx = PolicyCtx {
        agent: &ctx.agent,
        groups: &ctx.groups,
        route: &ctx.route,
        provider: ctx.provider.config_name(),
        api,
        model: call.request_model.as_deref(),
        body,
        events: Vec::new(),
        telemetry: ctx.reporter.telemetry(),
        hooks: Vec::new(),
    };
    match ctx.policies.on_request(pctx).await {
        Ok(a) => {
            log(&mut call, &a.body);
            call.policy_events.extend(a.events);
            Ok((call, a.body, a.hooks))
        }
        Err((deny, events)) => {
            let resp = refusal(api.shape(), &deny, &mut call);
            call.policy_events.extend(events);
            call.duration = t0.elapsed();
            ctx.reporter.report(*call);
            Err(resp)
        }
    }
}

/// The agent's answer to a call a policy refused, recorded on the call.
pub(crate) fn refusal(shape: Shape, deny: &Deny, call: &mut LlmCall) -> Response<ProxyBody> {
    let mut resp = shaped_error(shape, deny.status, deny.class, deny.code, &deny.message);
    insert_headers(resp.headers_mut(), &deny.headers);
    call.status = deny.status.as_u16();
    call.error = Some(format!("denied by {} {}: {}", deny.policy, deny.rule, deny.message));
    resp
}

/// A pass-through response that response checks must see whole before the agent does:
/// read (bounded by `limits.max_inspect_bytes`), observed, redacted, checked, then returned
/// in one piece or replaced by the refusal.
struct Held {
    call: Box<LlmCall>,
    t0: Instant,
    shape: Shape,
    observer: Observer,
    filter: Option<Box<dyn ResponseFilter>>,
    hooks: CallHooks,
    checks: Vec<Box<dyn ResponseCheck>>,
}

impl Held {
    async fn respond(self, ctx: &L7Context, mut rparts: http::response::Parts, rbody: Incoming) -> Response<ProxyBody> {
        let Held { mut call, t0, shape, mut observer, mut filter, hooks, checks } = self;
        let buf = match crate::protocol::bounded::read_held(ctx, rbody, ctx.config.limits.max_inspect_bytes).await {
            Ok(b) => b,
            Err(e) => {
                hooks.finish(&mut call);
                return report_failure(ctx, shape, call, t0, e);
            }
        };
        call.ttft = Some(t0.elapsed());
        observer.observe(&mut call, &buf);
        observer.finish(&mut call);
        let out = filter.as_mut().and_then(|f| f.body(&buf)).unwrap_or_else(|| buf.to_vec());
        let verdict = check_response(&checks, ctx.reporter.telemetry(), &mut call, &out).await;
        let resp = match verdict {
            Err(d) => refusal(shape, &d, &mut call),
            Ok(()) => {
                if let Some(p) = call.payload.as_deref_mut() {
                    p.push_response(&out);
                }
                rparts.headers.remove(CONTENT_LENGTH);
                Response::from_parts(rparts, ProxyBody::Full(Some(Bytes::from(out))))
            }
        };
        call.duration = t0.elapsed();
        hooks.finish(&mut call);
        ctx.reporter.report(*call);
        resp
    }
}

/// `prev` followed by the policies' finish hooks (settling reservations, span events).
pub(crate) fn with_policy_hooks(prev: FinishHook, hooks: CallHooks) -> FinishHook {
    if hooks.is_empty() {
        return prev;
    }
    Box::new(move |c: &mut LlmCall| {
        prev(c);
        hooks.finish(c);
    })
}

/// Read request fields into `call`; add `include_usage` to OpenAI-shaped streams that lack it
/// (when the route allows). Returns the body to send and whether it was rewritten.
fn rewrite(det: Detected, bytes: &Bytes, call: &mut LlmCall, include_usage: bool) -> (Bytes, bool) {
    let Some(info) = api::inspect_request(det.api, bytes) else {
        call.request_model = det.path_model;
        return (bytes.clone(), false);
    };
    call.stream = info.stream || det.api == Api::GeminiStreamGenerate;
    call.request_model = info.model.clone().or(det.path_model);
    let wants = include_usage
        && matches!(det.api, Api::OpenAiChat | Api::OpenAiCompletions)
        && info.stream
        && !info.include_usage;
    if !wants {
        return (bytes.clone(), false);
    }
    let oi = openai::RequestInfo {
        model: None,
        stream: true,
        include_usage: false,
        has_stream_options: info.has_stream_options,
    };
    match openai::inject_include_usage(bytes, &oi) {
        Ok(b) => (b, true),
        Err(e) => {
            tracing::debug!(error = %e, "not adding stream_options.include_usage");
            (bytes.clone(), false)
        }
    }
}

/// The call record for a request on this connection: who, which route, which operation, and
/// the request line and trace parent (the rest is filled as the call proceeds).
pub(crate) fn new_call(ctx: &L7Context, api: Api, parts: &http::request::Parts) -> Box<LlmCall> {
    let mut call = Box::new(LlmCall::new(ctx.agent.clone(), ctx.route.clone(), ctx.provider, api.operation()));
    call.method = parts.method.as_str().to_string();
    call.path = parts.uri.path().to_string();
    call.traceparent = parts.headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string);
    if ctx.reporter.telemetry().tracing() {
        call.span_ids = Some(SpanIds::new(call.traceparent.as_deref()));
    }
    call
}

/// Name tollgate's span as the parent of the upstream request (W3C `traceparent`), so the
/// provider's work joins the agent's trace below tollgate.
pub(crate) fn propagate(call: &LlmCall, headers: &mut http::HeaderMap) {
    if let Some(ids) = &call.span_ids {
        if let Ok(v) = HeaderValue::from_str(&ids.traceparent()) {
            headers.insert("traceparent", v);
        }
    }
}

/// Report a call that ended in a tollgate-side failure and answer the agent in its API shape.
pub(crate) fn report_failure(
    ctx: &L7Context,
    shape: Shape,
    mut call: Box<LlmCall>,
    t0: Instant,
    e: ProtocolError,
) -> Response<ProxyBody> {
    let resp = e.response(shape);
    call.status = resp.status().as_u16();
    call.error = Some(e.to_string());
    call.duration = t0.elapsed();
    tracing::debug!(route = %ctx.route, error = %e, "llm call failed before a response");
    ctx.reporter.report(*call);
    resp
}
