//! Model Context Protocol traffic (routes with `protocol: mcp`): JSON-RPC over the Streamable
//! HTTP and legacy HTTP+SSE transports, observed and governed per agent.
//!
//! A POST carries one JSON-RPC message or a batch: it is read (bounded by
//! `limits.max_request_body_bytes`), each message becomes an [`McpCall`], and `tools/call`
//! requests are checked against the agent's `mcp.tools` rules, then counted against its
//! `mcp.tool_limits`. A denied call is answered by tollgate with a JSON-RPC error (HTTP 200,
//! code [`jsonrpc::TOOL_DENIED_CODE`]), a call over its limit likewise (code
//! [`jsonrpc::TOOL_RATE_LIMITED_CODE`]); neither reaches the server. The response (`application/json` or `text/event-stream`) is observed as
//! it streams ([`body`]): answers are matched to requests by id, and `tools/list` results are
//! filtered to the tools the agent may call. GET streams and DELETEs pass through, observed as
//! one call each. Bodies that are not JSON-RPC pass through untouched.

pub mod body;
pub mod federation;
pub mod jsonrpc;
pub mod legacy;
mod refusal;
pub mod session;

use std::time::Instant;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use serde_json::Value;

use super::http::{forward, prepare, prepare_uri, send, L7Context, ProxyBody};
use super::llm::read_request_body;
use crate::policy::mcp_limits::ToolLimited;
use crate::telemetry::bounds::Bound;
use crate::telemetry::mcp::{McpCall, McpVerdict};
use crate::telemetry::SpanIds;
use body::{Exchange, McpBody, ToolFilter};
use jsonrpc::RequestFacts;

/// `Mcp-Session-Id` (Streamable HTTP session).
pub(crate) const SESSION: &str = "mcp-session-id";
/// `MCP-Protocol-Version` (negotiated version on every request after initialisation).
pub(crate) const VERSION: &str = "mcp-protocol-version";

/// Serve one request of an MCP route.
pub async fn handle(ctx: &L7Context, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.method() == Method::POST {
        return post(ctx, req).await;
    }
    pass_through(ctx, req).await
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

pub(crate) fn is_sse(h: &HeaderMap) -> bool {
    h.get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().get(..17).is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream")))
}

/// An exchange of this connection's calls, reported through its reporter.
fn exchange(ctx: &L7Context, calls: Vec<(McpCall, bool)>, t0: Instant, filter: Option<ToolFilter>) -> Exchange {
    Exchange { calls, t0, reporter: ctx.reporter.clone(), filter, legacy: None, legacy_session: None }
}

/// A call record for this connection's agent and route.
fn new_call(ctx: &L7Context, http_method: &'static str, parts: &http::request::Parts, method: String) -> McpCall {
    let mut c = McpCall::new(ctx.agent.clone(), ctx.route.clone(), http_method, parts.uri.path(), method);
    c.session_id = header(&parts.headers, SESSION);
    c.protocol_version = header(&parts.headers, VERSION);
    c.traceparent = header(&parts.headers, "traceparent");
    c.server_address = Some((ctx.target.server_address.clone(), ctx.target.server_port));
    if ctx.reporter.telemetry().tracing() {
        c.span_ids = Some(SpanIds::new(c.traceparent.as_deref()));
    }
    c
}

/// Name the first call's span as the parent of the upstream request (W3C `traceparent`).
fn propagate(calls: &[(McpCall, bool)], headers: &mut HeaderMap) {
    if let Some(ids) = calls.first().and_then(|(c, _)| c.span_ids) {
        if let Ok(v) = HeaderValue::from_str(&ids.traceparent()) {
            headers.insert("traceparent", v);
        }
    }
}

/// GET (server stream), DELETE (session end) and anything else: forwarded untouched; one call
/// reported when the response (for a stream: its end) is over. Server messages on a GET
/// stream are counted as notifications.
async fn pass_through(ctx: &L7Context, req: Request<Incoming>) -> Response<ProxyBody> {
    let t0 = Instant::now();
    let http_method: &'static str = match *req.method() {
        Method::GET => "GET",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    };
    let (parts, body) = req.into_parts();
    let mut call = new_call(ctx, http_method, &parts, http_method.to_string());
    fill(&mut call, &RequestFacts::default());
    let mut calls = vec![(call, false)];
    let mut parts = parts;
    if http_method == "GET" {
        // Identity encoding: a legacy stream's events are read (and may be filtered) here.
        parts.headers.remove(ACCEPT_ENCODING);
    }
    propagate(&calls, &mut parts.headers);
    let resp = forward(ctx, Request::from_parts(parts, body)).await;
    if http_method == "DELETE" && resp.status().is_success() {
        if let Some(id) = calls.first().and_then(|(c, _)| c.session_id.as_deref()) {
            session::forget(id);
        }
    }
    let sse = is_sse(resp.headers());
    if let Some((c, _)) = calls.first_mut() {
        c.status = resp.status().as_u16();
        if c.session_id.is_none() {
            c.session_id = header(resp.headers(), SESSION);
        }
    }
    let mut ex = exchange(ctx, calls, t0, None);
    let (rparts, rbody) = resp.into_parts();
    match rbody {
        ProxyBody::Upstream(inc) if sse => {
            let rules = ctx.policies.mcp_tools().clone();
            let limited = ctx.policies.mcp_tool_limits().applies(&ctx.agent, &ctx.groups);
            let mut inject = None;
            if http_method == "GET" && (limited || rules.covers(&ctx.agent, &ctx.groups)) {
                // Possibly a legacy HTTP+SSE stream: it registers under the session its
                // `endpoint` event names, so the session's POSTs can be governed on it.
                let (stream, rx) = legacy::LegacyStream::new(ctx.agent.name.clone(), ctx.config.mcp.legacy_queue_len);
                ex.filter = Some(ToolFilter { rules, agent: ctx.agent.clone(), groups: ctx.groups.clone() });
                ex.legacy = Some(stream);
                inject = Some(rx);
            }
            let mut rparts = rparts;
            if ex.filters() {
                rparts.headers.remove(CONTENT_LENGTH);
            }
            let mut b = McpBody::sse(inc, ex, ctx.config.limits.max_sse_event_bytes);
            if let Some(rx) = inject {
                b = b.with_injection(rx);
            }
            Response::from_parts(rparts, ProxyBody::Boxed(b.boxed()))
        }
        other => {
            drop(ex);
            Response::from_parts(rparts, other)
        }
    }
}

/// Whether a POST belongs to the legacy HTTP+SSE transport (`POST /messages?sessionId=...`),
/// whose answers travel on the GET stream rather than in the POST response.
fn is_legacy(parts: &http::request::Parts) -> bool {
    parts.uri.query().is_some_and(|q| q.contains("sessionId=") || q.contains("session_id="))
}

/// A POSTed JSON-RPC message or batch.
async fn post(ctx: &L7Context, req: Request<Incoming>) -> Response<ProxyBody> {
    let t0 = Instant::now();
    let (mut parts, body) = req.into_parts();
    let bytes = match read_request_body(ctx, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => {
            let mut c = new_call(ctx, "POST", &parts, "unknown".into());
            let resp = e.response(super::http::shape_of(ctx.provider));
            c.status = resp.status().as_u16();
            c.error = Some(e.to_string());
            c.duration = t0.elapsed();
            ctx.reporter.telemetry().mcp_call(&c);
            return resp;
        }
    };
    let rules = ctx.policies.mcp_tools().clone();
    let limits = ctx.policies.mcp_tool_limits().clone();
    let governed = rules.covers(&ctx.agent, &ctx.groups);
    let limited = limits.applies(&ctx.agent, &ctx.groups);
    let msgs = match jsonrpc::parse_request(&bytes, ctx.config.mcp.max_batch_len) {
        Ok(m) => m,
        // Governed or not: one POST must not carry an unbounded number of messages.
        Err(jsonrpc::JsonRpcError::BatchTooLong(max)) => return batch_too_long(ctx, &parts, t0, max),
        // Servers parse more leniently than tollgate (duplicate keys, NaN, a BOM): what
        // tollgate cannot read it cannot govern or count, so such a body from an agent under
        // tool rules or limits is refused rather than passed to a server that might run a
        // denied tool, or a call over its limit.
        Err(e) if governed || limited => return unreadable(ctx, &parts, t0, &e.to_string()),
        Err(e) => {
            tracing::debug!(route = %ctx.route, error = %e, "MCP POST body is not JSON-RPC: passed through");
            return send_on(ctx, parts, bytes, exchange(ctx, Vec::new(), t0, None)).await;
        }
    };
    let mut calls = Vec::with_capacity(msgs.len());
    let mut denied = false;
    for m in &msgs {
        let mut c = new_call(ctx, "POST", &parts, m.method.clone().unwrap_or_else(|| "response".into()));
        fill(&mut c, m);
        if (governed || limited) && c.method == "tools/call" {
            let tool = m.name.as_deref().unwrap_or("");
            c.verdict = match rules.refusal(&ctx.agent, &ctx.groups, tool) {
                Some(rule) => {
                    denied = true;
                    McpVerdict::Denied(rule.to_string())
                }
                None => McpVerdict::Allowed,
            };
        }
        calls.push((c, false));
    }
    // Legacy transport: answers travel on the session's GET stream, governed there.
    let stream = match (governed || limited, parts.uri.query()) {
        (true, Some(q)) if is_legacy(&parts) => {
            legacy::session_of_query(q).and_then(|id| legacy::lookup(id, &ctx.agent.name))
        }
        _ => None,
    };
    let batch = jsonrpc::is_batch(&bytes);
    let lists = calls.iter().any(|(c, _)| c.method == "tools/list");
    if governed && lists && stream.is_none() && is_legacy(&parts) {
        // Its answer would travel on a stream tollgate does not see (opened before a restart,
        // or elsewhere), so it could not be filtered: the client must reconnect through
        // tollgate. 404 is what a server answers for a session it does not know.
        return streamless_list(ctx, calls, t0);
    }
    if denied {
        return refuse(ctx, &parts, &msgs, calls, t0, batch, stream.as_deref(), None);
    }
    // Tool-call limits count only calls the rules allow. Every call of the body is counted
    // before any is kept: one over its limit refuses the whole body, and the others' counts
    // are given back (nothing was sent).
    if limited {
        if let Some(over) = refusal::count_calls(&limits, &ctx.agent, &ctx.groups, &mut calls).await {
            return refuse(ctx, &parts, &msgs, calls, t0, batch, stream.as_deref(), Some(over));
        }
    }
    if let Some(s) = &stream {
        let lists = calls.iter().filter(|(c, _)| c.method == "tools/list").filter_map(|(c, _)| c.request_id.clone());
        let mut pending = s.list_ids.lock();
        pending.extend(lists);
        // Bounded: a session that never gets answers cannot grow it (oldest ids dropped).
        let excess = pending.len().saturating_sub(legacy::MAX_PENDING_LISTS);
        pending.drain(..excess);
    }
    let filter = governed.then(|| ToolFilter { rules, agent: ctx.agent.clone(), groups: ctx.groups.clone() });
    propagate(&calls, &mut parts.headers);
    let ex = exchange(ctx, calls, t0, filter);
    send_on(ctx, parts, bytes, ex).await
}

/// Refuse a governed legacy `tools/list` whose session has no stream through tollgate.
fn streamless_list(ctx: &L7Context, mut calls: Vec<(McpCall, bool)>, t0: Instant) -> Response<ProxyBody> {
    let msg = "tollgate: this legacy MCP session's stream was not opened through tollgate, so its \
               tools/list answer cannot be filtered by tool rules; reconnect";
    for (c, answered) in calls.iter_mut() {
        *answered = true;
        c.status = 404;
        c.error = Some(msg.to_string());
        c.duration = t0.elapsed();
    }
    drop(exchange(ctx, calls, t0, None));
    let body = serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32001, "message": msg}});
    let mut resp = Response::new(ProxyBody::Full(Some(Bytes::from(body.to_string()))));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Refuse a body tollgate cannot parse from an agent its tool rules cover: HTTP 400 with the
/// JSON-RPC parse error (-32700), as a server answers malformed JSON.
fn unreadable(ctx: &L7Context, parts: &http::request::Parts, t0: Instant, why: &str) -> Response<ProxyBody> {
    let msg = format!("tollgate: request is not JSON-RPC tollgate can check against tool rules: {why}");
    let body = serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": msg}});
    let mut c = new_call(ctx, "POST", parts, "unknown".into());
    c.status = 400;
    c.error = Some(msg);
    c.duration = t0.elapsed();
    ctx.reporter.telemetry().mcp_call(&c);
    let mut resp = Response::new(ProxyBody::Full(Some(Bytes::from(body.to_string()))));
    *resp.status_mut() = http::StatusCode::BAD_REQUEST;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Refuse a batch longer than `mcp.max_batch_len`: HTTP 400 with JSON-RPC "Invalid Request"
/// (-32600) naming the limit; nothing is sent to the server.
fn batch_too_long(ctx: &L7Context, parts: &http::request::Parts, t0: Instant, max: usize) -> Response<ProxyBody> {
    let answer = jsonrpc::batch_too_long(max);
    let mut c = new_call(ctx, "POST", parts, "unknown".into());
    c.status = 400;
    c.error = answer["error"]["message"].as_str().map(str::to_string);
    c.duration = t0.elapsed();
    ctx.reporter.telemetry().mcp_call(&c);
    ctx.reporter.telemetry().bounds.refused(Bound::McpBatchLen);
    let mut resp = Response::new(ProxyBody::Full(Some(Bytes::from(answer.to_string()))));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Copy a message's facts into its call (shared with the uprobe observation path, so an
/// observed call carries what an intercepted one does).
pub(crate) fn fill(c: &mut McpCall, m: &RequestFacts) {
    c.request_id = m.id.clone();
    if let Some(s) = c.session_id.as_deref().and_then(session::get) {
        c.client.clone_from(&s.client);
        c.server.clone_from(&s.server);
        if c.protocol_version.is_none() {
            c.protocol_version.clone_from(&s.protocol_version);
        }
    }
    if c.method == "tools/call" {
        c.tool = m.name.clone();
    } else if c.method == "prompts/get" {
        c.target = m.name.clone();
    } else if c.method.starts_with("resources/") {
        c.target = m.uri.clone();
    }
    if let Some(v) = &m.protocol_version {
        c.protocol_version = Some(v.clone());
    }
    if let Some(client) = &m.client {
        c.client = Some(client.label());
    }
}

/// Answer a message (or batch) with a refused `tools/call` (denied by a tool rule, or over the
/// tool-call limit `limited` names by message index) without contacting the server: the
/// refused call gets the error naming its rule; in a batch, the other requests get an error
/// saying they were not sent (the batch is refused whole, so nothing runs half-governed).
#[allow(clippy::too_many_arguments)]
fn refuse(
    ctx: &L7Context,
    parts: &http::request::Parts,
    msgs: &[RequestFacts],
    mut calls: Vec<(McpCall, bool)>,
    t0: Instant,
    batch: bool,
    stream: Option<&legacy::LegacyStream>,
    limited: Option<(usize, ToolLimited)>,
) -> Response<ProxyBody> {
    let legacy = is_legacy(parts);
    // On a legacy session with an open stream the answers go there and the POST is accepted,
    // as the server would; without one, a 403 carries them.
    let status = match (legacy, stream) {
        (true, Some(_)) => StatusCode::ACCEPTED,
        (true, None) => StatusCode::FORBIDDEN,
        _ => StatusCode::OK,
    };
    let answers = refusal::answers(&ctx.agent.name, msgs, &mut calls, limited.as_ref(), status.as_u16());
    for (c, _) in calls.iter_mut() {
        c.duration = t0.elapsed();
    }
    let mut status = status;
    let mut retry_after = false;
    let queued = match stream {
        Some(s) if legacy => {
            let jsons: Vec<Vec<u8>> = answers.iter().map(|a| serde_json::to_vec(a).unwrap_or_default()).collect();
            match s.send_messages(&jsons) {
                // A stream that ended has no reader to answer: nothing more to do.
                Ok(()) | Err(legacy::InjectError::Closed) => true,
                Err(legacy::InjectError::Full) => {
                    // The agent is not reading its stream: rather than queue without bound,
                    // the POST carries the answers with a 503 the client can retry.
                    ctx.reporter.telemetry().bounds.refused(Bound::McpLegacyQueue);
                    status = StatusCode::SERVICE_UNAVAILABLE;
                    retry_after = true;
                    for (c, _) in calls.iter_mut() {
                        c.status = status.as_u16();
                        c.error = Some("legacy stream queue full (mcp.legacy_queue_len)".into());
                    }
                    false
                }
            }
        }
        _ => false,
    };
    drop(exchange(ctx, calls, t0, None));
    let bytes = if queued {
        Vec::new()
    } else {
        let mut answers = answers;
        let body = if batch { Value::Array(answers) } else { answers.pop().unwrap_or(Value::Null) };
        serde_json::to_vec(&body).unwrap_or_default()
    };
    let mut resp = Response::new(ProxyBody::Full(Some(Bytes::from(bytes))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if retry_after {
        resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(1u32));
    }
    if let Some(s) = parts.headers.get(SESSION) {
        resp.headers_mut().insert(SESSION, s.clone());
    }
    resp
}

/// Send the (admitted) body upstream and observe the answer.
async fn send_on(
    ctx: &L7Context,
    mut parts: http::request::Parts,
    body: Bytes,
    mut ex: Exchange,
) -> Response<ProxyBody> {
    // Identity encoding, so the response can be read and filtered.
    parts.headers.remove(ACCEPT_ENCODING);
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    prepare(ctx, &mut parts);
    let sent = match prepare_uri(ctx, &mut parts) {
        Ok(()) => send(ctx, Request::from_parts(parts, Either::Right(Full::new(body)))).await,
        Err(e) => Err(e),
    };
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            let resp = e.response(super::http::shape_of(ctx.provider));
            for (c, _) in ex.calls.iter_mut() {
                c.status = resp.status().as_u16();
            }
            ex.finish(Some(e.to_string()));
            return resp;
        }
    };
    let (mut rparts, rbody) = resp.into_parts();
    let session = header(&rparts.headers, SESSION);
    for (c, _) in ex.calls.iter_mut() {
        c.status = rparts.status.as_u16();
        if c.session_id.is_none() {
            c.session_id = session.clone();
        }
    }
    let limits = &ctx.config.limits;
    let observed = if !rparts.status.is_success() || rparts.status == StatusCode::ACCEPTED {
        // Notifications and client responses (202), and HTTP errors: nothing to correlate.
        if !rparts.status.is_success() {
            for (c, _) in ex.calls.iter_mut() {
                c.error = Some(format!("HTTP {}", rparts.status.as_u16()));
            }
        }
        for (_, answered) in ex.calls.iter_mut() {
            *answered = true;
        }
        ex.finish(None);
        return Response::from_parts(rparts, ProxyBody::Upstream(rbody));
    } else if is_sse(&rparts.headers) {
        if ex.filters() {
            // Filtered events change length.
            rparts.headers.remove(CONTENT_LENGTH);
        }
        McpBody::sse(rbody, ex, limits.max_sse_event_bytes)
    } else {
        if ex.filters() {
            rparts.headers.remove(CONTENT_LENGTH);
        }
        McpBody::json(rbody, ex, limits.max_inspect_bytes)
    };
    Response::from_parts(rparts, ProxyBody::Boxed(observed.boxed()))
}
