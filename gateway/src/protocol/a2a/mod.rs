//! Agent-to-agent traffic (routes with `protocol: a2a`): JSON-RPC over HTTP and agent cards,
//! traced and authorized per calling agent.
//!
//! * `GET …/.well-known/agent-card.json` (and the legacy `agent.json`) passes through; the card's
//!   `name` and skills are remembered per destination, so later hops to that destination are
//!   attributed to the callee by name (else by route name).
//! * `POST` requests are JSON-RPC hops: the request is read (bounded) for its method, id and
//!   skill, checked against `a2a.rules` (a denial is a JSON-RPC error [`DENIED_CODE`] with the
//!   caller's id, HTTP 200, never sent on), then forwarded with tollgate's span as the W3C
//!   parent. The response, JSON or an SSE stream (`message/stream`, `tasks/resubscribe`,
//!   `SendStreamingMessage`, `SubscribeToTask`), is relayed untouched and read as it passes
//!   for the task id and final state; one [`A2aHop`] is reported when it ends.
//! * Everything else is proxied transparently.

pub mod rpc;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use parking_lot::RwLock;

use super::http::{forward, prepare, prepare_uri, send, BoxError, L7Context, ProxyBody};
use super::llm::read_request_body;
use super::llm::Reporter;
use crate::policy::a2a_hops::{Denial, Hop};
use crate::telemetry::a2a::A2aHop;
use rpc::{CardInfo, ResponseReader, RpcRequest};

/// JSON-RPC error code of a hop refused by an `a2a.rules` entry: in the implementation-defined
/// server-error range (-32000..-32099) and outside the codes the A2A spec assigns
/// (-32001..-32009), so SDKs surface it as a generic JSON-RPC error carrying tollgate's message
/// (a2a-sdk raises `A2AClientError("JSON-RPC Error -32050: tollgate: …")`).
pub const DENIED_CODE: i64 = -32050;

/// Largest agent card read for its name (bigger cards pass through unread).
pub(crate) const MAX_CARD_BYTES: usize = 256 * 1024;
/// Destinations whose card is remembered (`a2a.max_cards` of the current config generation).
static MAX_CARDS: AtomicUsize = AtomicUsize::new(crate::config::a2a::DEFAULT_MAX_CARDS);

/// Bound the card cache at `n` destinations (at least 1): `a2a.max_cards`, applied by every
/// config generation. The cache is process-wide (cards outlive a reload), so the bound is too;
/// a lower bound trims the cache at the next card seen.
pub fn set_max_cards(n: usize) {
    MAX_CARDS.store(n.max(1), Ordering::Relaxed);
}

/// Why an A2A exchange could not be handled (reported on the hop; the caller gets a JSON-RPC
/// error or tollgate's HTTP error).
#[derive(Debug, thiserror::Error)]
pub enum A2aError {
    /// The request body could not be read (too large, client error).
    #[error("request body: {0}")]
    Body(#[source] super::ProtocolError),
    /// The callee could not be reached.
    #[error("callee unreachable: {0}")]
    Upstream(#[source] super::ProtocolError),
}

/// Agent cards seen, by destination (`host:port`).
static CARDS: LazyLock<RwLock<HashMap<String, Arc<CardInfo>>>> = LazyLock::new(|| RwLock::new(HashMap::new()));

/// Serve one request of an A2A route.
pub async fn handle(ctx: &L7Context, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.method() == Method::GET && is_card_path(req.uri().path()) {
        return card(ctx, req).await;
    }
    if req.method() == Method::POST {
        return hop(ctx, req).await;
    }
    forward(ctx, req).await
}

/// Whether `path` is an agent-card well-known path (current or legacy name).
pub(crate) fn is_card_path(path: &str) -> bool {
    path.ends_with("/.well-known/agent-card.json") || path.ends_with("/.well-known/agent.json")
}

/// Cache key of the route's destination.
fn destination(ctx: &L7Context) -> String {
    format!("{}:{}", ctx.target.server_address, ctx.target.server_port)
}

/// The callee's name: its card's `name` when seen, else the destination pod's agent name, else
/// the route name.
fn callee(ctx: &L7Context) -> Arc<str> {
    callee_at(&destination(ctx), ctx.callee_pod.as_ref(), &ctx.route)
}

/// [`callee`] for a destination key `host:port` (shared with the uprobe observation path).
pub(crate) fn callee_at(destination: &str, pod: Option<&Arc<str>>, route: &Arc<str>) -> Arc<str> {
    match CARDS.read().get(destination) {
        Some(c) => Arc::from(c.name.as_str()),
        None => pod.cloned().unwrap_or_else(|| route.clone()),
    }
}

/// Pass an agent-card fetch through and remember the card's name for this destination.
async fn card(ctx: &L7Context, mut req: Request<Incoming>) -> Response<ProxyBody> {
    // Identity encoding, so the card can be read.
    req.headers_mut().remove(ACCEPT_ENCODING);
    let resp = forward(ctx, req).await;
    if !resp.status().is_success() {
        return resp;
    }
    let key = destination(ctx);
    if let Some(front) = ctx.config.routes.iter().find(|r| *r.name == *ctx.route).and_then(|r| r.listener) {
        return fronted_card(resp, key, &front.to_string()).await;
    }
    resp.map(|b| match b {
        ProxyBody::Upstream(inner) => ProxyBody::Boxed(CardBody { inner, buf: Vec::new(), key: Some(key) }.boxed()),
        other => other,
    })
}

/// The card of an agent tollgate fronts on an explicit listener: read whole (bounded), its
/// interface URLs pointed at the listener, so the caller's later hops come through tollgate.
/// A card too large or unreadable is refused with 502 rather than leaking the agent's address.
async fn fronted_card(resp: Response<ProxyBody>, key: String, front: &str) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let bytes = match http_body_util::Limited::new(body, MAX_CARD_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            tracing::debug!(error = %e, "a2a agent card unreadable");
            let mut r = Response::new(ProxyBody::Full(Some(Bytes::from_static(b"agent card unreadable"))));
            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
            return r;
        }
    };
    remember_card(key, &bytes);
    let out = rpc::rewrite_card(&bytes, front).map_or(bytes, Bytes::from);
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(http::header::ETAG);
    Response::from_parts(parts, ProxyBody::Full(Some(out)))
}

/// A card body on its way to the agent, kept (bounded) until it ends and then parsed.
struct CardBody {
    inner: Incoming,
    buf: Vec<u8>,
    /// Destination key; `None` once done (or over the bound).
    key: Option<String>,
}

impl Body for CardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let f = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &f {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    if this.buf.len() + d.len() > MAX_CARD_BYTES {
                        this.key = None;
                        this.buf = Vec::new();
                    } else if this.key.is_some() {
                        this.buf.extend_from_slice(d);
                    }
                }
                // hyper stops polling once a sized body reports its end: no `None` follows.
                if this.inner.is_end_stream() {
                    if let Some(key) = this.key.take() {
                        remember_card(key, &this.buf);
                    }
                }
            }
            Some(Err(_)) => this.key = None,
            None => {
                if let Some(key) = this.key.take() {
                    remember_card(key, &this.buf);
                }
            }
        }
        Poll::Ready(f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Remember the card `body` fetched from destination `key` (`host:port`).
pub(crate) fn remember_card(key: String, body: &[u8]) {
    let Some(info) = rpc::parse_card(body) else { return };
    tracing::debug!(destination = %key, card = %info.name, skills = info.skills.len(), "a2a agent card seen");
    let max = MAX_CARDS.load(Ordering::Relaxed).max(1);
    let mut cards = CARDS.write();
    if !cards.contains_key(&key) {
        // Bounded: arbitrary entries make room (rules also match route names, so a forgotten
        // card changes no decision).
        while cards.len() >= max {
            let Some(k) = cards.keys().next().cloned() else { break };
            cards.remove(&k);
        }
    }
    cards.insert(key, Arc::new(info));
}

/// One JSON-RPC hop: authorize, forward with tollgate's span as parent, observe the answer.
async fn hop(ctx: &L7Context, req: Request<Incoming>) -> Response<ProxyBody> {
    let t0 = Instant::now();
    let (mut parts, body) = req.into_parts();
    let mut h = Box::new(new_hop(ctx, &parts));
    let bytes = match read_request_body(ctx, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => {
            let resp = e.response(super::http::shape_of(ctx.provider));
            return report_failure(ctx, h, t0, resp, A2aError::Body(e));
        }
    };
    let rpc = RpcRequest::parse(&bytes);
    h.method = rpc.method;
    h.request_id = rpc.id.clone();
    h.skill = rpc.skill.clone();
    h.task_id = rpc.task_id.clone();

    let rules = ctx.policies.a2a_rules();
    if !rules.is_empty() {
        let check = Hop {
            agent: &ctx.agent,
            groups: &ctx.groups,
            target: &h.target,
            route: &ctx.route,
            skill: rpc.skill.as_deref(),
            // A body tollgate cannot read (or an unknown method) may still be a message to the
            // callee's server: skill allow-lists refuse it rather than let it pass unchecked.
            is_message: rpc.is_message() || matches!(rpc.method, "invalid" | "other"),
        };
        if let Err(d) = rules.check(&check) {
            return deny(ctx, h, t0, &rpc, d);
        }
    }

    // Identity encoding, so the answer can be read.
    parts.headers.remove(ACCEPT_ENCODING);
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    if let Some(ids) = &h.span_ids {
        if let Ok(v) = HeaderValue::from_str(&ids.traceparent()) {
            parts.headers.insert("traceparent", v);
        }
    }
    prepare(ctx, &mut parts);
    if let Err(e) = prepare_uri(ctx, &mut parts) {
        let resp = e.response(super::http::shape_of(ctx.provider));
        return report_failure(ctx, h, t0, resp, A2aError::Upstream(e));
    }
    let resp = match send(ctx, Request::from_parts(parts, Either::Right(Full::new(bytes)))).await {
        Ok(r) => r,
        Err(e) => {
            let resp = e.response(super::http::shape_of(ctx.provider));
            return report_failure(ctx, h, t0, resp, A2aError::Upstream(e));
        }
    };
    let (rparts, rbody) = resp.into_parts();
    h.status = rparts.status.as_u16();
    h.stream = rparts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().get(..17).is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream")));
    let limits = &ctx.config.limits;
    let max = if h.stream { limits.max_sse_event_bytes } else { limits.max_inspect_bytes };
    let body = HopBody {
        inner: rbody,
        reader: ResponseReader::new(h.stream, max),
        hop: Some(h),
        t0,
        reporter: ctx.reporter.clone(),
    };
    Response::from_parts(rparts, ProxyBody::Boxed(body.boxed()))
}

/// The hop record for a request on this connection: who calls whom, and the trace context.
fn new_hop(ctx: &L7Context, parts: &http::request::Parts) -> A2aHop {
    let traceparent = parts.headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string);
    A2aHop::arrived(
        ctx.reporter.telemetry(),
        ctx.agent.clone(),
        ctx.route.clone(),
        callee(ctx),
        traceparent,
        (ctx.target.server_address.clone(), ctx.target.server_port),
        crate::telemetry::Capture::Intercept,
    )
}

/// Refuse a hop: a JSON-RPC error with the caller's id, reported with the rule.
fn deny(ctx: &L7Context, mut h: Box<A2aHop>, t0: Instant, rpc: &RpcRequest, d: Denial) -> Response<ProxyBody> {
    let message = format!("tollgate: a2a hop to {:?} denied: {}", &*h.target, d.message);
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": rpc.id.as_deref().and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok()),
        "error": {
            "code": DENIED_CODE,
            "message": message,
            "data": {"policy": "a2a", "rule": d.rule, "target": &*h.target},
        },
    });
    h.outcome = "denied";
    h.status = 200;
    h.error_code = Some(DENIED_CODE);
    h.error = Some(d.message);
    h.denied_by = Some(d.rule);
    h.duration = t0.elapsed();
    ctx.reporter.telemetry().a2a_hop(&h);
    let mut resp = Response::new(ProxyBody::Full(Some(Bytes::from(body.to_string()))));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Report a hop that failed on tollgate's side and return tollgate's error response.
fn report_failure(
    ctx: &L7Context,
    mut h: Box<A2aHop>,
    t0: Instant,
    resp: Response<ProxyBody>,
    e: A2aError,
) -> Response<ProxyBody> {
    tracing::debug!(route = %ctx.route, error = %e, "a2a hop failed before a response");
    h.status = resp.status().as_u16();
    h.outcome = "upstream_error";
    h.error = Some(e.to_string());
    h.duration = t0.elapsed();
    ctx.reporter.telemetry().a2a_hop(&h);
    resp
}

/// The callee's answer on its way to the caller, read as it passes; reports the hop once when
/// it ends, fails, or is dropped (caller gone).
struct HopBody {
    inner: Incoming,
    reader: ResponseReader,
    hop: Option<Box<A2aHop>>,
    t0: Instant,
    reporter: Arc<Reporter>,
}

impl HopBody {
    fn finish(&mut self, error: Option<String>) {
        let Some(mut h) = self.hop.take() else { return };
        settle(&mut h, &mut self.reader, self.t0, error);
        self.reporter.telemetry().a2a_hop(&h);
    }
}

/// Fill a hop from the answer read so far, once its body ended (`error`: how it failed).
/// Shared with the uprobe observation path, so both report the same hop.
pub(crate) fn settle(h: &mut A2aHop, reader: &mut ResponseReader, t0: Instant, error: Option<String>) {
    {
        reader.finish();
        let o = std::mem::take(&mut reader.outcome);
        h.outcome = match (o.outcome, h.status) {
            (Some(x), _) => x,
            (None, s) if s >= 400 => "http_error",
            (None, _) if error.is_some() => "upstream_error",
            (None, _) => "incomplete",
        };
        if o.task_id.is_some() {
            h.task_id = o.task_id;
        }
        h.context_id = o.context_id;
        if let Some((code, msg)) = o.error {
            h.error_code = Some(code);
            h.error = Some(msg);
        }
        if error.is_some() {
            h.error = error;
        }
        h.events = reader.events;
        h.duration = t0.elapsed();
    }
}

impl Body for HopBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let f = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &f {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.reader.feed(d);
                }
                // hyper stops polling once a sized body reports its end: no `None` follows.
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
            }
            Some(Err(e)) => this.finish(Some(format!("response body: {e}"))),
            None => this.finish(None),
        }
        Poll::Ready(f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for HopBody {
    fn drop(&mut self) {
        if self.hop.is_some() {
            let ended = self.inner.is_end_stream();
            self.finish((!ended).then(|| "caller went away before the response ended".to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_paths() {
        assert!(is_card_path("/.well-known/agent-card.json"));
        assert!(is_card_path("/a2a/booking/.well-known/agent.json"));
        assert!(!is_card_path("/.well-known/openid-configuration"));
    }

    #[test]
    fn cards_are_remembered_per_destination() {
        remember_card("10.0.0.9:9999".into(), br#"{"name":"booking-agent","skills":[{"id":"refund"}]}"#);
        remember_card("10.0.0.9:9998".into(), b"not a card");
        let cards = CARDS.read();
        assert_eq!(cards.get("10.0.0.9:9999").map(|c| c.name.as_str()), Some("booking-agent"));
        assert!(!cards.contains_key("10.0.0.9:9998"));
    }
}
