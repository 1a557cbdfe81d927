//! Transparent HTTP/1.1 forwarding for L7 connections, and the pieces the LLM path shares with
//! it: request preparation (hop-by-hop headers, upstream URI, `Host`), the response body type,
//! and OpenAI-shaped error responses.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue, HOST};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::llm::api::{self, Shape};
use super::llm::dispatch::{self, RouteRuntime};
use super::llm::{self, ObservedBody, Reporter};
use super::ProtocolError;
use crate::capture::Agent;
use crate::config::{Config, ProviderKind, RouteProtocol};
use crate::policy::chain::Policies;
use crate::upstream::{ReqBody, Target, Upstream};

/// Boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything a request on one L7 connection needs; built once per connection, and again with
/// the newest policies when a reload replaced them (see [`L7Context::with_policies`]).
#[derive(Clone)]
pub struct L7Context {
    /// Who is calling.
    pub agent: Arc<Agent>,
    /// Route name (metrics, logs).
    pub route: Arc<str>,
    /// What the route's destination speaks (LLM APIs, MCP, A2A).
    pub protocol: RouteProtocol,
    /// Route API shape: decides which requests are inspected.
    pub provider: ProviderKind,
    /// Where requests go.
    pub target: Target,
    /// Pooled upstream client.
    pub upstream: Arc<Upstream>,
    /// Limits and the rest of the config.
    pub config: Arc<Config>,
    /// Where finished LLM calls go.
    pub reporter: Arc<Reporter>,
    /// Targets, balancer and failover when the route dispatches to providers.
    pub gateway: Option<Arc<RouteRuntime>>,
    /// Route `include_usage`.
    pub include_usage: bool,
    /// Route `log_payloads.max_bytes` when payload logging is on.
    pub log_payloads: Option<usize>,
    /// Route `match.paths` (empty: all).
    pub paths: Arc<[String]>,
    /// Requests that are not LLM calls can go to the original destination (false on explicit
    /// listeners, which have none).
    pub has_origin: bool,
    /// Governance policies of the newest config generation when the request started (empty:
    /// none configured).
    pub policies: Arc<Policies>,
    /// The agent's groups under `policies`.
    pub groups: Arc<[String]>,
    /// Agent name of the destination pod (A2A routes on Kubernetes nodes), when the destination
    /// address is a pod of this node.
    pub callee_pod: Option<Arc<str>>,
    /// The federation this route serves (`routes[].federation`), when it is one.
    pub federation: Option<Arc<super::mcp::federation::Federation>>,
}

impl L7Context {
    /// This connection's context judged by `policies` (a newer generation's): access rules,
    /// guardrails, token and tool limits and agent groups change; the route, its targets and
    /// the rest of the connection's settings do not.
    pub fn with_policies(&self, policies: Arc<Policies>) -> L7Context {
        let groups = policies.groups_of(&self.agent.name);
        L7Context { policies, groups, ..self.clone() }
    }

    /// Whether `path` is handled by the route (else it is passed through untouched).
    fn path_matches(&self, path: &str) -> bool {
        path_matches(&self.paths, path)
    }
}

/// Route `match.paths`: empty matches every path; otherwise a path matches a prefix (an exact
/// path is its own prefix).
fn path_matches(paths: &[String], path: &str) -> bool {
    paths.is_empty() || paths.iter().any(|p| path.starts_with(p.as_str()))
}

/// The error shape of a route's configured API, for failures outside a recognised call.
pub fn shape_of(kind: ProviderKind) -> Shape {
    match kind {
        ProviderKind::Anthropic => Shape::Anthropic,
        ProviderKind::Gemini => Shape::Gemini,
        _ => Shape::OpenAi,
    }
}

/// Response body returned to the agent: upstream bytes (observed or not) or tollgate's own.
pub enum ProxyBody {
    /// A body tollgate generated (errors).
    Full(Option<Bytes>),
    /// Upstream body passed through.
    Upstream(Incoming),
    /// Upstream body of a recognised LLM call, observed as it streams.
    Observed(Box<ObservedBody>),
    /// A body another protocol module observes as it streams (A2A, MCP).
    Boxed(http_body_util::combinators::BoxBody<Bytes, BoxError>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Observed(b) => Pin::new(b.as_mut()).poll_frame(cx).map_err(Into::into),
            ProxyBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Observed(b) => b.is_end_stream(),
            ProxyBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Observed(b) => b.size_hint(),
            ProxyBody::Boxed(b) => b.size_hint(),
        }
    }
}

/// Serve one request from an L7 connection. Never fails: tollgate's own failures become
/// OpenAI-shaped error responses.
pub async fn handle(ctx: Arc<L7Context>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    match ctx.protocol {
        RouteProtocol::Llm => {}
        RouteProtocol::Mcp => {
            return Ok(match &ctx.federation {
                Some(f) => super::mcp::federation::handle(&ctx, f, req).await,
                None => super::mcp::handle(&ctx, req).await,
            })
        }
        RouteProtocol::A2a => return Ok(super::a2a::handle(&ctx, req).await),
    }
    if ctx.path_matches(req.uri().path()) {
        if let Some(det) = api::detect(ctx.provider, req.method(), req.uri().path()) {
            return Ok(match &ctx.gateway {
                Some(rt) => dispatch::dispatch(&ctx, rt, det, req).await,
                None => llm::observe_call(&ctx, det, req).await,
            });
        }
    }
    Ok(forward(&ctx, req).await)
}

/// Proxy one request to the route's destination unchanged but for hop-by-hop headers (the path
/// of everything that is not a recognised call; also what the MCP and A2A handlers use to
/// reach their servers).
pub(crate) async fn forward(ctx: &L7Context, req: Request<Incoming>) -> Response<ProxyBody> {
    if !ctx.has_origin {
        let e = ProtocolError::NotFound(format!("{} {}", req.method(), req.uri().path()));
        return e.response(shape_of(ctx.provider));
    }
    let (mut parts, body) = req.into_parts();
    // WebSocket & co: hop-by-hop headers are dropped below, so the upgrade is re-requested
    // explicitly and the two upgraded connections are joined when the upstream agrees.
    let upgrade = upgrade_protocol(&parts.headers);
    let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<OnUpgrade>());
    prepare(ctx, &mut parts);
    if let Some(p) = &upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, p.clone());
    }
    let resp = match prepare_uri(ctx, &mut parts) {
        Ok(()) => send(ctx, Request::from_parts(parts, Either::Left(body))).await,
        Err(e) => Err(e),
    };
    match resp {
        Ok(mut r) => {
            if r.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let (Some(p), Some(client)) = (upgrade, client_upgrade) {
                    let server = hyper::upgrade::on(&mut r);
                    tokio::spawn(tunnel(client, server));
                    let h = r.headers_mut();
                    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    h.insert(header::UPGRADE, p);
                }
            }
            r.map(ProxyBody::Upstream)
        }
        Err(e) => {
            tracing::debug!(route = %ctx.route, error = %e, "proxied request failed");
            e.response(shape_of(ctx.provider))
        }
    }
}

/// The `Upgrade` value of a request that asks for one (`Connection: upgrade`).
fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| h.get(header::UPGRADE).cloned()).flatten()
}

/// Copy bytes between the agent's and the upstream's upgraded connections until both close.
async fn tunnel(client: OnUpgrade, server: OnUpgrade) {
    match tokio::try_join!(client, server) {
        Ok((c, s)) => {
            let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut s).await {
                tracing::debug!(error = %e, "upgraded tunnel ended with error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

/// Make a client request fit to send upstream: drop hop-by-hop headers, set `Host` when the
/// target dictates one, speak HTTP/1.1.
pub(crate) fn prepare(ctx: &L7Context, parts: &mut http::request::Parts) {
    strip_hop_by_hop(&mut parts.headers);
    // hyper already answered any `Expect: 100-continue` on the agent side.
    parts.headers.remove(header::EXPECT);
    if let Some(h) = ctx.target.host_header() {
        parts.headers.insert(HOST, h.clone());
    }
    parts.version = Version::HTTP_11;
}

/// Point the request at the target (absolute URI for the pooled client).
pub(crate) fn prepare_uri(ctx: &L7Context, parts: &mut http::request::Parts) -> Result<(), ProtocolError> {
    parts.uri = ctx.target.uri_for_path(parts.uri.path_and_query())?;
    Ok(())
}

/// Send upstream and clean the response's hop-by-hop headers.
pub(crate) async fn send(ctx: &L7Context, req: Request<ReqBody>) -> Result<Response<Incoming>, ProtocolError> {
    let mut resp = ctx.upstream.send(req).await?;
    strip_hop_by_hop(resp.headers_mut());
    Ok(resp)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) removed in both directions, besides those named in
/// `Connection`.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(n: &HeaderName) -> bool {
    HOP_BY_HOP.contains(n) || n == "keep-alive" || n == "proxy-connection"
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Usually there are none: one pass over the few names present is cheaper than a hashed
    // removal per hop-by-hop name.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_paths_narrow_what_is_handled() {
        assert!(path_matches(&[], "/anything"));
        let p = vec!["/v1/chat/".to_string(), "/v1/messages".to_string()];
        assert!(path_matches(&p, "/v1/chat/completions"));
        assert!(path_matches(&p, "/v1/messages"));
        assert!(!path_matches(&p, "/v1/embeddings"));
        assert!(!path_matches(&p, "/v2/chat/completions"));
    }

    #[test]
    fn hop_by_hop_headers_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::AUTHORIZATION));
    }

    #[tokio::test]
    async fn error_body_is_openai_shaped() {
        use http_body_util::BodyExt;
        let r = ProtocolError::BodyTooLarge { limit: 10 }.response(Shape::OpenAi);
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let b = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "request_too_large");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["message"].as_str().unwrap().contains("10 bytes"));
    }
}
