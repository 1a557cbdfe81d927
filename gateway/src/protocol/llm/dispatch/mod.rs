//! Dispatch of an LLM call on a route with targets: pick targets (balancer), send with the
//! provider's key, retry on the next target for configured failures within the retry budget and
//! the deadlines, then return the response in the agent's API as it streams.
//!
//! Retries happen only before response headers are returned to the agent, so a streamed
//! response is never retried after its first byte reached the client.

mod request;
pub mod runtime;

pub use runtime::{Gateway, GatewayError, RouteRuntime};

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::api::{self, Api, Detected, Observer, RequestFacts, Shape};
use super::body::{Mode, Observation, ObservedBody};
use super::translate::{self, StreamTranslator};
use super::{new_call, propagate, read_request_body, refusal, report_failure, run_policies, with_policy_hooks};
use crate::config::{FailoverOn, ProviderKind};
use crate::policy::chain::{check_response, CallHooks};
use crate::policy::{InFlight, Outcome};
use crate::protocol::http::{strip_hop_by_hop, L7Context, ProxyBody};
use crate::protocol::ProtocolError;
use crate::telemetry::LlmCall;
use crate::upstream::FailureKind;

/// Serve one LLM call through the route's targets.
pub(crate) async fn dispatch(
    ctx: &L7Context,
    rt: &Arc<RouteRuntime>,
    det: Detected,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let t0 = Instant::now();
    let shape = det.api.shape();
    let (parts, body) = req.into_parts();
    let mut call = new_call(ctx, det.api, &parts);

    let bytes = match read_request_body(ctx, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return report_failure(ctx, shape, call, t0, e),
    };
    let Some(facts) = api::inspect_request(det.api, &bytes) else {
        let e = ProtocolError::BadRequest(format!("request body of {:?} is not a JSON object", det.api));
        return report_failure(ctx, shape, call, t0, e);
    };
    call.stream = facts.stream || det.api == Api::GeminiStreamGenerate;
    let client_model = facts.model.clone().or_else(|| det.path_model.clone());
    call.request_model = client_model.clone();
    let (mut call, bytes, hooks) = match run_policies(ctx, det.api, call, bytes, t0).await {
        Ok(admitted) => admitted,
        Err(denied) => return denied,
    };

    let hash_key: &[u8] = rt
        .hash_header
        .as_ref()
        .and_then(|h| parts.headers.get(h))
        .map_or(ctx.agent.name.as_bytes(), HeaderValue::as_bytes);
    let plan = rt.balancer.plan(client_model.as_deref(), hash_key);
    rt.budget.deposit();
    let fo = &rt.failover;
    let deadline = t0 + fo.request_timeout;
    let mut attempts = 0u32;
    let mut last: Option<(String, bool)> = None;
    // The latest failed response (429/5xx) kept to be returned if no attempt succeeds.
    let mut held: Option<(Response<Incoming>, Attempt)> = None;

    for idx in plan {
        if attempts >= fo.max_attempts {
            break;
        }
        if attempts > 0 && !rt.budget.try_withdraw() {
            tracing::debug!(route = %rt.name, "retry budget exhausted");
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            last = Some((format!("request deadline of {:?} passed", fo.request_timeout), true));
            break;
        }
        let Some(target) = rt.targets.get(idx) else { continue };
        let prov = &target.provider;
        let up_api = match prov.upstream_api(det.api) {
            Ok(a) => a,
            Err(e) => {
                last = Some((e.to_string(), false));
                continue;
            }
        };
        attempts += 1;
        let model = target.model.as_deref().or(client_model.as_deref());
        if model.is_none() && matches!(prov.kind, ProviderKind::AzureOpenai | ProviderKind::Gemini) {
            return report_failure(ctx, shape, call, t0, ProtocolError::NoModel(prov.name.to_string()));
        }
        let prepared =
            match request::prepare(det.api, up_api, &bytes, &facts, model, prov.default_max_tokens, rt.include_usage) {
                Ok(p) => p,
                Err(e) => return report_failure(ctx, shape, call, t0, e),
            };
        let query = (up_api.shape() == shape).then(|| parts.uri.query()).flatten();
        let uri = match prov.uri(up_api, model.unwrap_or_default(), query) {
            Ok(u) => u,
            Err(e) => return report_failure(ctx, shape, call, t0, e.into()),
        };
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        for h in [ACCEPT_ENCODING, HOST, http::header::EXPECT] {
            headers.remove(h);
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(prepared.body.len()));
        if up_api.shape() != shape {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        prov.authorize(&mut headers);
        propagate(&call, &mut headers);
        let mut up_req = Request::new(Either::Right(Full::new(prepared.body.clone())));
        *up_req.method_mut() = parts.method.clone();
        *up_req.uri_mut() = uri;
        *up_req.headers_mut() = headers;

        let limit = fo.attempt_timeout.min(deadline.saturating_duration_since(now));
        let attempt_start = Instant::now();
        let outcome = tokio::time::timeout(limit, async {
            let slot = prov.slot().await;
            let inflight = rt.balancer.start(idx);
            let res = if prov.http2 { ctx.upstream.send_h2(up_req).await } else { ctx.upstream.send(up_req).await };
            (res, slot, inflight)
        })
        .await;
        let (resp, slot, inflight) = match outcome {
            Err(_) => {
                if fo.on.contains(&FailoverOn::Timeout) {
                    rt.balancer.record(idx, Outcome::Failure);
                }
                attempts_metric(ctx, &rt.name, &prov.name, "timeout");
                last = Some((format!("{}: no response headers within {limit:?}", prov.name), true));
                if fo.on.contains(&FailoverOn::Timeout) {
                    continue;
                }
                break;
            }
            Ok((Err(e), _, _)) => {
                let timeout = e.kind() == FailureKind::Timeout;
                last = Some((format!("{}: {e}", prov.name), timeout));
                let class = if timeout { FailoverOn::Timeout } else { FailoverOn::Connect };
                let outcome = if timeout { "timeout" } else { "connect" };
                attempts_metric(ctx, &rt.name, &prov.name, outcome);
                if fo.on.contains(&class) {
                    rt.balancer.record(idx, Outcome::Failure);
                    continue;
                }
                break;
            }
            Ok((Ok(r), slot, inflight)) => (r, slot, inflight),
        };
        let attempt = Attempt { idx, up_api, injected_usage: prepared.injected_usage, slot, inflight, attempt_start };
        let class = failure_class(resp.status());
        let outcome = match class {
            Some(FailoverOn::RateLimited) => "rate_limited",
            Some(_) => "server_error",
            None => "ok",
        };
        attempts_metric(ctx, &rt.name, &prov.name, outcome);
        match class {
            Some(class) => {
                last = Some((format!("{}: HTTP {}", prov.name, resp.status()), false));
                if fo.on.contains(&class) {
                    rt.balancer.record(idx, Outcome::Failure);
                    held = Some((resp, attempt));
                    continue;
                }
                return respond(ctx, rt, call, t0, shape, &facts, client_model, bytes, resp, attempt, attempts, hooks)
                    .await;
            }
            None => {
                return respond(ctx, rt, call, t0, shape, &facts, client_model, bytes, resp, attempt, attempts, hooks)
                    .await;
            }
        }
    }
    if let Some((resp, attempt)) = held {
        return respond(ctx, rt, call, t0, shape, &facts, client_model, bytes, resp, attempt, attempts, hooks).await;
    }
    call.attempts = attempts;
    let (last, timeout) = last.unwrap_or_else(|| ("no target can serve this operation".to_string(), false));
    let e = if attempts == 0 {
        ProtocolError::BadRequest(last)
    } else {
        ProtocolError::Exhausted { route: rt.name.to_string(), attempts, last, timeout }
    };
    report_failure(ctx, shape, call, t0, e)
}

/// Count one gateway attempt under the calling agent's bounded label.
fn attempts_metric(ctx: &L7Context, route: &str, target: &str, outcome: &str) {
    let m = &ctx.reporter.telemetry().metrics;
    m.upstream_attempt(&m.agent_label(&ctx.agent.name), route, target, outcome);
}

/// What one attempt holds until its response ends.
struct Attempt {
    idx: usize,
    up_api: Api,
    injected_usage: bool,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    inflight: InFlight,
    attempt_start: Instant,
}

/// A status the failover rules know: 429 and 5xx.
fn failure_class(s: StatusCode) -> Option<FailoverOn> {
    if s == StatusCode::TOO_MANY_REQUESTS {
        Some(FailoverOn::RateLimited)
    } else if s.is_server_error() {
        Some(FailoverOn::ServerError)
    } else {
        None
    }
}

/// Return the chosen attempt's response to the agent, observed and (when the APIs differ)
/// translated.
#[allow(clippy::too_many_arguments)]
async fn respond(
    ctx: &L7Context,
    rt: &Arc<RouteRuntime>,
    mut call: Box<LlmCall>,
    t0: Instant,
    shape: Shape,
    facts: &RequestFacts,
    client_model: Option<String>,
    request: Bytes,
    resp: Response<Incoming>,
    attempt: Attempt,
    attempts: u32,
    mut hooks: CallHooks,
) -> Response<ProxyBody> {
    let target = &rt.targets[attempt.idx];
    let prov = &target.provider;
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    call.status = rparts.status.as_u16();
    hooks.response_headers(rparts.status, &mut rparts.headers);
    let filter = if rparts.status.is_success() { hooks.response_filter() } else { None };
    call.target = Some(prov.name.clone());
    call.provider = prov.kind;
    call.attempts = attempts;
    let (addr, port) = prov.server();
    call.server_address = Some(addr.to_string());
    call.server_port = Some(port);
    let up_api = attempt.up_api;
    let translating = up_api.shape() != shape;
    let is_sse = rparts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().get(..17).is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream")));
    let observer = Observer::new(up_api, request, prov.kind == ProviderKind::OpenaiCompatible);
    let limits = &ctx.config.limits;
    let success = rparts.status.is_success();
    // Response checks (webhook guardrails) need the whole non-streamed response: held below.
    let checks = if success && !is_sse { hooks.response_checks() } else { Vec::new() };
    let hook = finish_hook(rt.clone(), attempt.idx, success, attempt.inflight, attempt.slot, attempt.attempt_start);
    let hook = with_policy_hooks(hook, hooks);

    if (!translating || (is_sse && success)) && checks.is_empty() {
        let translator: Option<Box<dyn StreamTranslator>> = match (translating, up_api.shape(), shape) {
            (true, Shape::Anthropic, Shape::OpenAi) => {
                Some(Box::new(translate::MessagesToChatStream::new(client_model, facts.include_usage)))
            }
            (true, Shape::OpenAi, Shape::Anthropic) => {
                Some(Box::new(translate::ChatToMessagesStream::new(client_model)))
            }
            _ => None,
        };
        let drop_usage = attempt.injected_usage && is_sse && !translating;
        if drop_usage || translator.is_some() || filter.is_some() {
            rparts.headers.remove(CONTENT_LENGTH);
        }
        let (translator, filter) = match filter {
            Some(f) if is_sse => (Some(f.into_stream(translator, drop_usage)), None),
            f => (translator, f),
        };
        let mode = match (is_sse, &filter) {
            (true, _) => Mode::sse(limits.max_sse_event_bytes, drop_usage),
            (false, Some(_)) => Mode::json_held(limits.max_inspect_bytes),
            (false, None) => Mode::json(limits.max_inspect_bytes),
        };
        let obs = Observation { observer, translator, on_finish: Some(hook), filter };
        let observed = ObservedBody::new(rbody, mode, call, t0, ctx.reporter.clone(), obs);
        return Response::from_parts(rparts, ProxyBody::Observed(Box::new(observed)));
    }

    // Non-streamed (or failed) response in another API, or one to check: read it whole
    // (bounded), then convert, redact and check.
    let mut observer = observer;
    let remaining = (t0 + rt.failover.request_timeout).saturating_duration_since(Instant::now());
    let collected = tokio::time::timeout(
        remaining.max(Duration::from_millis(1)),
        crate::protocol::bounded::read_held(ctx, rbody, limits.max_inspect_bytes),
    )
    .await;
    let buf = match collected {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            hook(&mut call);
            return report_failure(ctx, shape, call, t0, e);
        }
        Err(_) => {
            hook(&mut call);
            return report_failure(ctx, shape, call, t0, ProtocolError::Deadline(rt.failover.request_timeout));
        }
    };
    call.ttft = Some(t0.elapsed());
    observer.observe(&mut call, &buf);
    observer.finish(&mut call);
    let model = client_model.as_deref();
    let converted = match (success, up_api.shape(), shape) {
        (true, Shape::Anthropic, Shape::OpenAi) => translate::messages_response_to_chat(&buf, model),
        (true, Shape::OpenAi, Shape::Anthropic) => translate::chat_response_to_messages(&buf, model),
        (false, Shape::Anthropic, Shape::OpenAi) => {
            Ok(translate::anthropic_error_to_openai(rparts.status.as_u16(), &buf))
        }
        (false, Shape::OpenAi, Shape::Anthropic) => {
            Ok(translate::openai_error_to_anthropic(rparts.status.as_u16(), &buf))
        }
        _ => Ok(buf.to_vec()),
    };
    let mut filter = filter;
    let converted = converted.map(|out| filter.as_mut().and_then(|f| f.body(&out)).unwrap_or(out));
    if let Ok(out) = &converted {
        if let Err(d) = check_response(&checks, ctx.reporter.telemetry(), &mut call, out).await {
            let resp = refusal(shape, &d, &mut call);
            call.duration = t0.elapsed();
            hook(&mut call);
            ctx.reporter.report(*call);
            return resp;
        }
    }
    call.duration = t0.elapsed();
    hook(&mut call);
    match converted {
        Ok(out) => {
            if let Some(p) = call.payload.as_deref_mut() {
                p.push_response(&out);
            }
            ctx.reporter.report(*call);
            rparts.headers.remove(CONTENT_LENGTH);
            rparts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Response::from_parts(rparts, ProxyBody::Full(Some(Bytes::from(out))))
        }
        Err(e) => {
            let e = ProtocolError::Exhausted {
                route: rt.name.to_string(),
                attempts,
                last: format!("{}: response could not be translated: {e}", prov.name),
                timeout: false,
            };
            report_failure(ctx, shape, call, t0, e)
        }
    }
}

/// Feed the balancer once the call ends and release the attempt's slot and in-flight count.
fn finish_hook(
    rt: Arc<RouteRuntime>,
    idx: usize,
    success: bool,
    inflight: InFlight,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    attempt_start: Instant,
) -> super::body::FinishHook {
    Box::new(move |c: &mut LlmCall| {
        if success && c.error.is_none() {
            let total = attempt_start.elapsed();
            rt.balancer.record(idx, Outcome::Success { ttft: c.ttft.unwrap_or(total), total, tokens: 0 });
        }
        if let Some(u) = c.usage {
            rt.balancer.add_tokens(idx, u.total);
        }
        drop(inflight);
        drop(slot);
    })
}
