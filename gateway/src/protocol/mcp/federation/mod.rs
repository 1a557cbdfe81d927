//! MCP federation endpoint: tollgate itself is the MCP server (Streamable HTTP) for routes with
//! `federation: <name>`, and serves the tools, prompts and resources of the federation's
//! upstream servers as one. `initialize` opens a client session and is fanned out to every HTTP
//! upstream (one upstream session each, carrying the client's identity); stdio upstreams are
//! processes tollgate spawns, initialises and restarts. Lists are merged under the federation's
//! naming rule, calls are routed back by name (or URI), and the same tool rules as on
//! transparent MCP routes apply to the names clients see.
//!
//! Not served: server-to-client requests and notifications (sampling, elicitation, list
//! changes) — the endpoint answers GET with 405, as the transport allows for servers that
//! offer no stream.

pub mod http_server;
mod methods;
pub mod names;
pub mod session;
pub mod stdio;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::super::http::{L7Context, ProxyBody};
use super::super::llm::read_request_body;
use super::jsonrpc::{self, JsonRpcError};
use crate::capture::Agent;
use crate::config::federation::FederationConfig;
use crate::config::Config;
use crate::policy::mcp_auth::{Authenticator, Grant};
use crate::telemetry::bounds::Bound;
use crate::telemetry::federation::FederationMetrics;
use crate::telemetry::Telemetry;
use crate::upstream::Upstream;
use http_server::{Bounds, HttpServer};
use session::{SessionError, Sessions};
use stdio::StdioServer;
use upstream::Server;

/// Why a federation could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// An HTTP server's URL cannot be addressed.
    #[error("mcp.federations[{federation}].servers[{server}]: {message}")]
    Server {
        /// Federation name.
        federation: String,
        /// Server name.
        server: String,
        /// What is wrong.
        message: String,
    },
    /// The OAuth settings could not be used.
    #[error("mcp.federations[{federation}].auth: {message}")]
    Auth {
        /// Federation name.
        federation: String,
        /// What is wrong.
        message: String,
    },
}

/// One federation's runtime: its servers (stdio processes running) and client sessions.
pub struct Federation {
    /// Federation name.
    pub name: Arc<str>,
    cfg: FederationConfig,
    servers: Vec<Server>,
    server_names: Vec<String>,
    sessions: Sessions,
    metrics: Arc<FederationMetrics>,
    auth: Option<Authenticator>,
    /// Limits the HTTP servers read answers with: a reload reuses the federation only when
    /// these are unchanged too.
    bounds: (usize, usize),
}

impl Federation {
    fn build(
        cfg: &FederationConfig,
        config: &Config,
        client: &Arc<Upstream>,
        metrics: &Arc<FederationMetrics>,
    ) -> Result<Federation, FederationError> {
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let mut servers = Vec::with_capacity(cfg.servers.len());
        for s in &cfg.servers {
            let server = match &s.url {
                Some(url) => {
                    let bounds = Bounds {
                        timeout: cfg.request_timeout,
                        max_bytes: config.limits.max_inspect_bytes,
                        max_event: config.limits.max_sse_event_bytes,
                    };
                    let h = HttpServer::new(name.clone(), s, url, client.clone(), bounds, metrics.clone()).map_err(
                        |e| FederationError::Server {
                            federation: cfg.name.clone(),
                            server: s.name.clone(),
                            message: e.to_string(),
                        },
                    )?;
                    Server::Http(Box::new(h))
                }
                None => Server::Stdio(StdioServer::start(
                    name.clone(),
                    s,
                    cfg.request_timeout,
                    config.limits.max_sse_event_bytes,
                    metrics.clone(),
                )),
            };
            servers.push(server);
        }
        metrics.set_sessions(&cfg.name, 0);
        let auth = match &cfg.auth {
            Some(a) => Some(
                Authenticator::new(a, client.clone())
                    .map_err(|e| FederationError::Auth { federation: cfg.name.clone(), message: e.to_string() })?,
            ),
            None => None,
        };
        Ok(Federation {
            auth,
            bounds: (config.limits.max_inspect_bytes, config.limits.max_sse_event_bytes),
            name,
            cfg: cfg.clone(),
            server_names: cfg.servers.iter().map(|s| s.name.clone()).collect(),
            servers,
            sessions: Sessions::new(cfg.max_sessions, cfg.session_idle_timeout),
            metrics: metrics.clone(),
        })
    }

    /// Close the upstream sessions of ended client sessions, in the background.
    fn close_sessions(self: &Arc<Self>, ended: Vec<Arc<session::Session>>) {
        self.metrics.set_sessions(&self.name, self.sessions.len());
        if ended.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            for s in ended {
                for (server, slot) in me.servers.iter().zip(&s.slots) {
                    server.close(slot).await;
                }
            }
        });
    }
}

/// The federations of one config generation, by name. Built once per generation; a reload
/// keeps the runtime (stdio processes, sessions) of every federation whose config is unchanged.
#[derive(Default)]
pub struct Federations {
    map: HashMap<String, Arc<Federation>>,
}

impl Federations {
    /// Build `mcp.federations`, reusing unchanged ones from `previous`. Spawns stdio servers:
    /// call on the runtime.
    pub fn build(
        config: &Config,
        client: &Arc<Upstream>,
        telemetry: &Telemetry,
        previous: Option<&Federations>,
    ) -> Result<Federations, FederationError> {
        let mut map = HashMap::new();
        for f in &config.mcp.federations {
            let bounds = (config.limits.max_inspect_bytes, config.limits.max_sse_event_bytes);
            let kept = previous.and_then(|p| p.map.get(&f.name)).filter(|p| p.cfg == *f && p.bounds == bounds);
            let fed = match kept {
                Some(k) => k.clone(),
                None => {
                    let fed = Arc::new(Federation::build(f, config, client, &telemetry.federation)?);
                    tokio::spawn(sweep(Arc::downgrade(&fed)));
                    fed
                }
            };
            map.insert(f.name.clone(), fed);
        }
        Ok(Federations { map })
    }

    /// The runtime of federation `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Federation>> {
        self.map.get(name).cloned()
    }
}

/// End idle client sessions (and their upstream sessions) every minute, while the federation
/// lives.
async fn sweep(fed: std::sync::Weak<Federation>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(fed) = fed.upgrade() else { return };
        let ended = fed.sessions.sweep();
        fed.close_sessions(ended);
    }
}

/// Who a request is from: the kernel's agent, or (on an explicit listener, where the kernel
/// names nobody) the token's `agent_claim`; the OAuth grant when the endpoint asks for one.
pub(super) struct Caller {
    agent: Arc<Agent>,
    groups: Arc<[String]>,
    grant: Option<Grant>,
    /// The token's subject: sessions are bound to it as well as to the agent, so two users
    /// behind one agent (or one `agent_claim` value) cannot use each other's sessions.
    owner: Option<String>,
}

/// Serve one request on a federation route.
pub async fn handle(ctx: &L7Context, fed: &Arc<Federation>, req: Request<Incoming>) -> Response<ProxyBody> {
    if let Some(auth) = &fed.auth {
        if req.method() == Method::GET && auth.is_metadata_path(req.uri().path(), &fed.cfg.path) {
            return auth.metadata_response().map(|b| ProxyBody::Full(Some(b)));
        }
    }
    if req.uri().path() != fed.cfg.path {
        let msg = format!("no MCP endpoint at {}; this federation serves {}", req.uri().path(), fed.cfg.path);
        return plain(StatusCode::NOT_FOUND, &msg);
    }
    if let Some(o) = req.headers().get(http::header::ORIGIN) {
        let allowed = o.to_str().is_ok_and(|o| fed.cfg.allowed_origins.iter().any(|a| a.eq_ignore_ascii_case(o)));
        if !allowed {
            tracing::info!(target: "audit", federation = %fed.name, agent = %ctx.agent.name, origin = ?o, "mcp request from a browser origin refused");
            return plain(StatusCode::FORBIDDEN, "origin not allowed (mcp.federations[].allowed_origins)");
        }
    }
    if let Some(v) = req.headers().get("mcp-protocol-version") {
        if !v.to_str().is_ok_and(|v| upstream::SUPPORTED_VERSIONS.contains(&v)) {
            return rpc_error(StatusCode::BAD_REQUEST, -32600, "tollgate: unsupported MCP-Protocol-Version");
        }
    }
    let mut caller = Caller { agent: ctx.agent.clone(), groups: ctx.groups.clone(), grant: None, owner: None };
    if let Some(auth) = &fed.auth {
        match auth.authenticate(req.headers()).await {
            Ok(grant) => {
                // pid 0: no kernel record (explicit listener); the token names the caller.
                if let (0, Some(name)) = (ctx.agent.pid, grant.agent.as_deref()) {
                    caller.agent = Arc::new(Agent::unknown(name));
                    caller.groups = ctx.policies.groups_of(name);
                }
                caller.owner = grant.subject.clone();
                caller.grant = Some(grant);
            }
            Err(refusal) => {
                fed.metrics.auth_refused(&fed.name, refusal.reason());
                tracing::info!(target: "audit", federation = %fed.name, agent = %ctx.agent.name, reason = refusal.reason(), "mcp bearer token refused");
                return refusal.response(&metadata_url(fed, auth, req.headers())).map(|b| ProxyBody::Full(Some(b)));
            }
        }
    }
    match *req.method() {
        Method::POST => post(ctx, fed, &caller, req).await,
        Method::DELETE => delete(fed, &caller, &req),
        _ => {
            // No server-initiated stream: the transport lets a server answer GET with 405.
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "this MCP endpoint offers no server stream; use POST");
            r.headers_mut().insert(ALLOW, HeaderValue::from_static("POST, DELETE"));
            r
        }
    }
}

/// `resource_metadata` of the challenges: from the configured resource, else from the request's
/// own host and path.
fn metadata_url(fed: &Federation, auth: &Authenticator, headers: &http::HeaderMap) -> String {
    auth.resource_metadata_url().unwrap_or_else(|| {
        let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
        format!("http://{host}{}{}", crate::policy::mcp_auth::METADATA_PREFIX, fed.cfg.path)
    })
}

/// A JSON body response.
fn json_response(status: StatusCode, v: &Value) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Full(Some(Bytes::from(v.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A JSON-RPC error not tied to a request (id null), with an HTTP status.
fn rpc_error(status: StatusCode, code: i64, message: &str) -> Response<ProxyBody> {
    json_response(status, &json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}}))
}

fn plain(status: StatusCode, message: &str) -> Response<ProxyBody> {
    json_response(status, &json!({"error": message}))
}

async fn post(ctx: &L7Context, fed: &Arc<Federation>, caller: &Caller, req: Request<Incoming>) -> Response<ProxyBody> {
    let t0 = Instant::now();
    let (parts, body) = req.into_parts();
    let bytes = match read_request_body(ctx, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => {
            let shaped = e.response(super::super::http::shape_of(ctx.provider));
            let mut r = rpc_error(shaped.status(), -32600, &format!("tollgate: {e}"));
            if let Some(v) = shaped.headers().get(http::header::RETRY_AFTER) {
                r.headers_mut().insert(http::header::RETRY_AFTER, v.clone());
            }
            return r;
        }
    };
    let max_batch = ctx.config.mcp.max_batch_len;
    let parsed = if jsonrpc::is_batch(&bytes) {
        jsonrpc::read_batch::<Value>(&bytes, max_batch).map(Value::Array)
    } else {
        serde_json::from_slice::<Value>(&bytes).map_err(Into::into)
    };
    let (msgs, batch) = match parsed {
        Ok(Value::Array(a)) if a.iter().all(Value::is_object) => (a, true),
        Ok(m @ Value::Object(_)) => (vec![m], false),
        Err(JsonRpcError::BatchTooLong(max)) => {
            // Each message may be a call to an upstream server: one POST carries a bounded number.
            ctx.reporter.telemetry().bounds.refused(Bound::McpBatchLen);
            return json_response(StatusCode::BAD_REQUEST, &jsonrpc::batch_too_long(max));
        }
        Ok(_) | Err(JsonRpcError::EmptyBatch) => {
            return rpc_error(StatusCode::BAD_REQUEST, -32600, "tollgate: not a JSON-RPC message or batch")
        }
        Err(e) => return rpc_error(StatusCode::BAD_REQUEST, -32700, &format!("tollgate: parse error: {e}")),
    };
    let sid = parts.headers.get("mcp-session-id").and_then(|v| v.to_str().ok());
    let traceparent = parts.headers.get("traceparent").and_then(|v| v.to_str().ok());
    let init = msgs.iter().position(|m| m.get("method").and_then(Value::as_str) == Some("initialize"));
    if let Some(i) = init {
        if batch {
            return rpc_error(StatusCode::BAD_REQUEST, -32600, "tollgate: initialize must be sent alone");
        }
        let bearers = bearers(fed, caller).await;
        return methods::initialize(ctx, fed, caller, &bearers, &msgs[i], parts.uri.path(), traceparent, t0).await;
    }
    let first = msgs.first().and_then(|m| m.get("method")).and_then(Value::as_str);
    if sid.is_none() && !batch && first == Some("server/discover") {
        // The 2026 stateless handshake is not offered: clients that probe it fall back to
        // initialize on "method not found".
        let id = msgs[0].get("id").cloned().unwrap_or(Value::Null);
        let m = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "Method not found: server/discover (this endpoint uses initialize)"}});
        return json_response(StatusCode::OK, &m);
    }
    let session = match fed.sessions.get(sid, &caller.agent.name, caller.owner.as_deref()) {
        Ok(s) => s,
        Err(e @ SessionError::Missing) => return rpc_error(StatusCode::BAD_REQUEST, -32600, &format!("tollgate: {e}")),
        Err(e @ SessionError::Unknown) => return rpc_error(StatusCode::NOT_FOUND, -32001, &format!("tollgate: {e}")),
    };
    // Scopes first: a call the token does not grant refuses the whole POST with the step-up
    // challenge (403 insufficient_scope), before anything is sent.
    if let (Some(grant), Some(auth)) = (&caller.grant, &fed.auth) {
        for m in msgs.iter().filter(|m| m.get("method").and_then(Value::as_str) == Some("tools/call")) {
            let tool = m.pointer("/params/name").and_then(Value::as_str).unwrap_or("");
            if let Err(missing) = grant.allows_tool(tool) {
                fed.metrics.auth_refused(&fed.name, "tool_scope");
                tracing::info!(target: "audit", federation = %fed.name, agent = %caller.agent.name, tool, "mcp tool call outside the token's scopes");
                return missing.response(&metadata_url(fed, auth, &parts.headers)).map(|b| ProxyBody::Full(Some(b)));
            }
        }
    }
    let bearers = bearers(fed, caller).await;
    let mut answers = Vec::new();
    for m in &msgs {
        let call = methods::Call {
            ctx,
            fed,
            caller,
            bearers: &bearers,
            session: &session,
            path: parts.uri.path(),
            traceparent,
        };
        if let Some(a) = call.dispatch(m).await {
            answers.push(a);
        }
    }
    let mut resp = match (answers.len(), batch) {
        (0, _) => {
            let mut r = Response::new(ProxyBody::Full(None));
            *r.status_mut() = StatusCode::ACCEPTED;
            r
        }
        (_, true) => json_response(StatusCode::OK, &Value::Array(answers)),
        (_, false) => json_response(StatusCode::OK, &answers.swap_remove(0)),
    };
    if let Ok(v) = HeaderValue::from_str(&session.id) {
        resp.headers_mut().insert("mcp-session-id", v);
    }
    resp
}

/// The token each server gets: an RFC 8693 exchange for servers with `token_audience`, none
/// for the rest (the caller's own token is never passed on). A failed exchange fails only the
/// requests to that server (lists leave it out), not the whole POST; exchanges are cached by
/// the authenticator, so this is a lookup after the first.
async fn bearers(fed: &Federation, caller: &Caller) -> Vec<upstream::Bearer> {
    let mut out = vec![upstream::Bearer::None; fed.cfg.servers.len()];
    let (Some(auth), Some(grant)) = (&fed.auth, &caller.grant) else { return out };
    for (i, s) in fed.cfg.servers.iter().enumerate() {
        let Some(aud) = &s.token_audience else { continue };
        out[i] = match auth.exchange(grant, aud, s.token_scope.as_deref()).await {
            Ok(Some(t)) => upstream::Bearer::Token(t),
            Ok(None) => upstream::Bearer::None,
            Err(e) => {
                tracing::warn!(federation = %fed.name, server = %s.name, error = %e, "token exchange failed");
                upstream::Bearer::Failed
            }
        };
    }
    out
}

/// End a client session and its upstream sessions.
fn delete(fed: &Arc<Federation>, caller: &Caller, req: &Request<Incoming>) -> Response<ProxyBody> {
    let sid = req.headers().get("mcp-session-id").and_then(|v| v.to_str().ok());
    match sid.and_then(|id| fed.sessions.remove(id, &caller.agent.name, caller.owner.as_deref())) {
        Some(s) => {
            fed.close_sessions(vec![s]);
            Response::new(ProxyBody::Full(None))
        }
        None => plain(StatusCode::NOT_FOUND, "unknown or expired session"),
    }
}
