//! The MCP methods a federation answers: `initialize` (fanned out), `ping`, the list methods
//! (fanned out and merged), the routed ones (`tools/call`, `prompts/get`, `resources/read`,
//! `completion/complete`, ...), and `logging/setLevel` (sent to every server). Each client
//! message is reported as one MCP call with the verdict of the tool rules.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use http::{HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use super::names::{merge_named, merge_uris, split_prefixed, Listed, Merged, Route};
use super::session::{new_id, Session};
use super::upstream::{negotiate, Ask, Bearer, CallError};
use super::{json_response, Caller, Federation};
use crate::config::federation::ToolNaming;
use crate::protocol::http::{L7Context, ProxyBody};
use crate::protocol::mcp::jsonrpc::{error_message, tool_denied, tool_rate_limited};
use crate::telemetry::mcp::{McpCall, McpVerdict};
use crate::telemetry::SpanIds;

/// Pages followed per server and list call at most (a server whose cursors never end cannot
/// hold the request forever).
const MAX_PAGES: usize = 100;

/// JSON-RPC "Method not found".
const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC "Invalid params" (unknown tool or prompt, missing name).
const INVALID_PARAMS: i64 = -32602;
/// MCP "Resource not found".
const RESOURCE_NOT_FOUND: i64 = -32002;

/// Named list kinds.
#[derive(Clone, Copy)]
enum Kind {
    Tools,
    Prompts,
}

impl Kind {
    fn list_method(self) -> &'static str {
        match self {
            Kind::Tools => "tools/list",
            Kind::Prompts => "prompts/list",
        }
    }
    fn field(self) -> &'static str {
        match self {
            Kind::Tools => "tools",
            Kind::Prompts => "prompts",
        }
    }
}

fn call_record(
    ctx: &L7Context,
    fed: &Federation,
    caller: &Caller,
    path: &str,
    method: &str,
    traceparent: Option<&str>,
) -> McpCall {
    let mut c = McpCall::new(caller.agent.clone(), ctx.route.clone(), "POST", path, method.to_string());
    c.server = Some(format!("tollgate-federation-{}", fed.name));
    c.traceparent = traceparent.map(str::to_string);
    if ctx.reporter.telemetry().tracing() {
        c.span_ids = Some(SpanIds::new(traceparent));
    }
    c
}

/// `initialize`: open a session, initialise every upstream for it (concurrently; a server that
/// fails is left out until a later request reaches it), answer with the merged capabilities.
#[allow(clippy::too_many_arguments)]
pub(super) async fn initialize(
    ctx: &L7Context,
    fed: &Arc<Federation>,
    caller: &Caller,
    bearers: &[Bearer],
    msg: &Value,
    path: &str,
    traceparent: Option<&str>,
    t0: Instant,
) -> Response<ProxyBody> {
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let version = negotiate(params.get("protocolVersion").and_then(Value::as_str));
    let client_info = params.get("clientInfo").cloned().unwrap_or_else(|| json!({"name": "unknown"}));
    let owner = caller.owner.clone();
    let session =
        Arc::new(Session::new(new_id(), caller.agent.name.clone(), owner, client_info, version, fed.servers.len()));
    let ended = fed.sessions.insert(session.clone());
    fed.close_sessions(ended);
    let mut call = call_record(ctx, fed, caller, path, "initialize", traceparent);
    call.request_id = msg.get("id").map(Value::to_string);
    call.session_id = Some(session.id.clone());
    call.client = Some(session.client_label.clone());
    call.protocol_version = Some(version.to_string());
    let tp = call.span_ids.map(|s| s.traceparent());
    let asks: Vec<Ask> = (0..fed.servers.len())
        .map(|i| Ask {
            client_info: &session.client_info,
            version,
            traceparent: tp.as_deref(),
            bearer: bearers.get(i).unwrap_or(&Bearer::None),
        })
        .collect();
    let infos =
        join_all(fed.servers.iter().zip(&session.slots).zip(&asks).map(|((s, slot), ask)| s.init_info(slot, ask)))
            .await;
    let mut caps = serde_json::Map::new();
    for (server, info) in fed.servers.iter().zip(&infos) {
        match info {
            Ok(i) => {
                for cap in ["tools", "prompts", "resources", "logging", "completions"] {
                    if i.has(cap) {
                        let v =
                            if matches!(cap, "tools" | "prompts") { json!({"listChanged": false}) } else { json!({}) };
                        caps.insert(cap.to_string(), v);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(federation = %fed.name, server = server.name(), error = %e, "upstream MCP server not initialised for a new session")
            }
        }
    }
    caps.entry("tools").or_insert_with(|| json!({"listChanged": false}));
    let sep = &fed.cfg.separator;
    let naming = match fed.cfg.tool_names {
        ToolNaming::Prefix => format!("Tool and prompt names are prefixed with their server's name and {sep:?}."),
        _ => "Tool and prompt names are the servers' own.".to_string(),
    };
    let result = json!({
        "protocolVersion": version,
        "capabilities": caps,
        "serverInfo": {"name": format!("tollgate-federation-{}", fed.name), "version": env!("CARGO_PKG_VERSION")},
        "instructions": format!("One MCP endpoint for the servers {}. {naming}", fed.server_names.join(", ")),
    });
    let answer = json!({"jsonrpc": "2.0", "id": msg.get("id").cloned().unwrap_or(Value::Null), "result": result});
    call.status = 200;
    call.duration = t0.elapsed();
    ctx.reporter.telemetry().mcp_call(&call);
    let mut r = json_response(StatusCode::OK, &answer);
    if let Ok(v) = HeaderValue::from_str(&session.id) {
        r.headers_mut().insert("mcp-session-id", v);
    }
    r
}

/// One client message in a session.
pub(super) struct Call<'a> {
    pub ctx: &'a L7Context,
    pub fed: &'a Arc<Federation>,
    pub caller: &'a Caller,
    /// Token per server (index as in the federation), from the RFC 8693 exchange.
    pub bearers: &'a [Bearer],
    pub session: &'a Arc<Session>,
    pub path: &'a str,
    pub traceparent: Option<&'a str>,
}

type Answer = Result<Value, Value>;

impl Call<'_> {
    /// Answer one message; `None` for notifications and client responses.
    pub async fn dispatch(&self, msg: &Value) -> Option<Value> {
        let t0 = Instant::now();
        let method = msg.get("method").and_then(Value::as_str)?;
        let Some(id) = msg.get("id").cloned() else {
            // Notifications: `initialized` was sent upstream at initialisation; cancellations
            // and progress have no upstream request to name (tollgate's ids differ).
            return None;
        };
        let params = msg.get("params").cloned().unwrap_or_else(|| json!({}));
        let mut call = call_record(self.ctx, self.fed, self.caller, self.path, method, self.traceparent);
        call.request_id = Some(id.to_string());
        call.session_id = Some(self.session.id.clone());
        call.client = Some(self.session.client_label.clone());
        call.protocol_version = Some(self.session.version.to_string());
        let answer = self.answer(method, &id, params, &mut call).await;
        let msg = match answer {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err(err) => err,
        };
        call.error_code = msg.pointer("/error/code").and_then(Value::as_i64);
        if call.error_code.is_some() && call.error.is_none() {
            call.error = msg.pointer("/error/message").and_then(Value::as_str).map(str::to_string);
        }
        call.status = 200;
        call.duration = t0.elapsed();
        self.ctx.reporter.telemetry().mcp_call(&call);
        Some(msg)
    }

    /// What a request to server `i` carries.
    fn ask<'b>(&'b self, i: usize, tp: &'b Option<String>) -> Ask<'b> {
        Ask {
            client_info: &self.session.client_info,
            version: self.session.version,
            traceparent: tp.as_deref(),
            bearer: self.bearers.get(i).unwrap_or(&Bearer::None),
        }
    }

    fn asks<'b>(&'b self, tp: &'b Option<String>) -> Vec<Ask<'b>> {
        (0..self.fed.servers.len()).map(|i| self.ask(i, tp)).collect()
    }

    async fn answer(&self, method: &str, id: &Value, params: Value, call: &mut McpCall) -> Answer {
        let tp = call.span_ids.map(|s| s.traceparent());
        match method {
            "ping" => Ok(json!({})),
            "tools/list" => {
                let (items, hidden) = self.list_named(Kind::Tools, &tp).await;
                call.tools_hidden = hidden;
                Ok(json!({ "tools": items }))
            }
            "prompts/list" => Ok(json!({ "prompts": self.list_named(Kind::Prompts, &tp).await.0 })),
            "resources/list" => {
                Ok(json!({ "resources": self.list_uris("resources/list", "resources", "uri", &tp).await }))
            }
            "resources/templates/list" => {
                let items = self.list_uris("resources/templates/list", "resourceTemplates", "uriTemplate", &tp).await;
                Ok(json!({ "resourceTemplates": items }))
            }
            "tools/call" => self.call_tool(id, params, call, &tp).await,
            "prompts/get" => {
                let name = params.get("name").and_then(Value::as_str).unwrap_or("").to_string();
                call.target = Some(name.clone());
                let route = self.route_named(Kind::Prompts, &name, &tp).await;
                let Some(route) = route else { return Err(invalid(id, &format!("Unknown prompt: {name}"))) };
                self.forward(&route, id, method, renamed(params, "name", &route.original), &tp).await
            }
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                let uri = params.get("uri").and_then(Value::as_str).unwrap_or("").to_string();
                call.target = Some(uri.clone());
                let Some(route) = self.route_uri(&uri, &tp).await else {
                    let m = error_message(Some(id), RESOURCE_NOT_FOUND, "Resource not found", json!({"uri": uri}));
                    return Err(m);
                };
                self.forward(&route, id, method, params, &tp).await
            }
            "completion/complete" => self.complete(id, params, &tp).await,
            "logging/setLevel" => {
                let asks = self.asks(&tp);
                let sends = self.fed.servers.iter().zip(&self.session.slots).zip(&asks);
                join_all(sends.map(|((s, slot), ask)| s.request(slot, ask, method, params.clone()))).await;
                Ok(json!({}))
            }
            other => Err(error_message(Some(id), METHOD_NOT_FOUND, &format!("Method not found: {other}"), Value::Null)),
        }
    }

    /// `tools/call`: the tool rules first (a denied call never reaches a server), then the
    /// route of the exposed name.
    async fn call_tool(&self, id: &Value, params: Value, call: &mut McpCall, tp: &Option<String>) -> Answer {
        let Some(name) = params.get("name").and_then(Value::as_str).map(str::to_string) else {
            return Err(invalid(id, "tools/call needs a tool name"));
        };
        call.tool = Some(name.clone());
        let who = self.caller;
        let rules = self.ctx.policies.mcp_tools();
        if rules.covers(&who.agent, &who.groups) {
            if let Some(rule) = rules.refusal(&who.agent, &who.groups, &name) {
                call.verdict = McpVerdict::Denied(rule.to_string());
                return Err(tool_denied(Some(id), &name, rule, &who.agent.name));
            }
            call.verdict = McpVerdict::Allowed;
        }
        let Some(route) = self.route_named(Kind::Tools, &name, tp).await else {
            return Err(invalid(id, &format!("Unknown tool: {name}")));
        };
        // Call-rate limits count only calls the rules let through, to tools that exist (unknown
        // names must not create counters).
        let limits = self.ctx.policies.mcp_tool_limits();
        if limits.applies(&who.agent, &who.groups) {
            if let Err(l) = limits.admit(&who.agent, &who.groups, &name).await {
                call.verdict = McpVerdict::RateLimited(l.rule.clone());
                return Err(tool_rate_limited(Some(id), &name, &who.agent.name, &l));
            }
            call.verdict = McpVerdict::Allowed;
        }
        self.forward(&route, id, "tools/call", renamed(params, "name", &route.original), tp).await
    }

    /// `completion/complete`: routed by the prompt or resource its `ref` names.
    async fn complete(&self, id: &Value, params: Value, tp: &Option<String>) -> Answer {
        let r = params.get("ref").cloned().unwrap_or(Value::Null);
        let route = match r.get("type").and_then(Value::as_str) {
            Some("ref/prompt") => {
                let name = r.get("name").and_then(Value::as_str).unwrap_or("");
                self.route_named(Kind::Prompts, name, tp).await.map(|route| {
                    let mut p = params.clone();
                    p["ref"]["name"] = Value::String(route.original.clone());
                    (route, p)
                })
            }
            Some("ref/resource") => {
                let uri = r.get("uri").and_then(Value::as_str).unwrap_or("");
                self.route_uri(uri, tp).await.map(|route| (route, params.clone()))
            }
            _ => None,
        };
        match route {
            Some((route, p)) => self.forward(&route, id, "completion/complete", p, tp).await,
            None => Err(invalid(id, "completion/complete: unknown ref")),
        }
    }

    async fn forward(&self, route: &Route, id: &Value, method: &str, params: Value, tp: &Option<String>) -> Answer {
        let (Some(server), Some(slot)) = (self.fed.servers.get(route.server), self.session.slots.get(route.server))
        else {
            return Err(invalid(id, "no such server"));
        };
        let ask = self.ask(route.server, tp);
        server.request(slot, &ask, method, params).await.map_err(|e| e.to_message(id, server.name()))
    }

    /// Every server's full list (pages followed), one entry per server that answered.
    async fn fan_out(&self, method: &str, field: &str, capability: &str, tp: &Option<String>) -> Vec<Listed> {
        let asks = self.asks(tp);
        let each = self.fed.servers.iter().zip(&self.session.slots).zip(&asks).enumerate();
        let lists = each.map(|(i, ((server, slot), ask))| async move {
            let info = server.init_info(slot, ask).await?;
            if !info.has(capability) {
                return Ok::<_, CallError>(Listed { server: i, items: Vec::new() });
            }
            let mut items = Vec::new();
            let mut cursor: Option<String> = None;
            for _ in 0..MAX_PAGES {
                let params = match &cursor {
                    Some(c) => json!({ "cursor": c }),
                    None => json!({}),
                };
                let mut page = server.request(slot, ask, method, params).await?;
                if let Some(Value::Array(a)) = page.get_mut(field).map(Value::take) {
                    items.extend(a);
                }
                cursor = page.get("nextCursor").and_then(Value::as_str).map(str::to_string);
                if cursor.is_none() {
                    break;
                }
            }
            Ok(Listed { server: i, items })
        });
        let mut out = Vec::new();
        for (i, r) in join_all(lists).await.into_iter().enumerate() {
            match r {
                Ok(l) => out.push(l),
                Err(e) => {
                    tracing::warn!(federation = %self.fed.name, server = self.fed.server_names[i], method, error = %e, "federated list left a server out")
                }
            }
        }
        out
    }

    /// Merged tools or prompts, filtered by the agent's tool rules (tools); remembers the
    /// routes for later calls. Returns the items and how many the rules hid.
    async fn list_named(&self, kind: Kind, tp: &Option<String>) -> (Vec<Value>, u32) {
        let lists = self.fan_out(kind.list_method(), kind.field(), kind.field(), tp).await;
        let m = merge_named(self.fed.cfg.tool_names, &self.fed.cfg.separator, &self.fed.server_names, lists, "name");
        self.collided(&m);
        let Merged { mut items, routes, .. } = m;
        let mut hidden = 0;
        if let Kind::Tools = kind {
            let (who, rules) = (self.caller, self.ctx.policies.mcp_tools());
            let governed = rules.covers(&who.agent, &who.groups);
            let before = items.len();
            // The agent's tool rules and the token's scopes both decide what is listed.
            items.retain(|t| {
                let n = t.get("name").and_then(Value::as_str).unwrap_or("");
                (!governed || rules.refusal(&who.agent, &who.groups, n).is_none())
                    && who.grant.as_ref().is_none_or(|g| g.allows_tool(n).is_ok())
            });
            hidden = (before - items.len()) as u32;
        }
        let mut r = self.session.routes.lock();
        match kind {
            Kind::Tools => r.tools = routes,
            Kind::Prompts => r.prompts = routes,
        }
        (items, hidden)
    }

    async fn list_uris(&self, method: &str, field: &str, key: &str, tp: &Option<String>) -> Vec<Value> {
        let lists = self.fan_out(method, field, "resources", tp).await;
        let m = merge_uris(lists, key);
        self.collided(&m);
        self.session.routes.lock().resources.extend(m.routes);
        m.items
    }

    fn collided(&self, m: &Merged) {
        for (name, server) in &m.hidden {
            let s = self.fed.server_names.get(*server).map_or("", String::as_str);
            tracing::debug!(federation = %self.fed.name, name, hidden_server = s, "federated name collision");
        }
        self.fed.metrics.collided(&self.fed.name, m.hidden.len());
    }

    /// Route of an exposed tool or prompt name: the session's latest list, the prefix itself,
    /// or a fresh list when the client calls before listing.
    async fn route_named(&self, kind: Kind, name: &str, tp: &Option<String>) -> Option<Route> {
        let known = |s: &Self| {
            let r = s.session.routes.lock();
            match kind {
                Kind::Tools => r.tools.get(name).cloned(),
                Kind::Prompts => r.prompts.get(name).cloned(),
            }
        };
        if let Some(r) = known(self) {
            return Some(r);
        }
        if self.fed.cfg.tool_names == ToolNaming::Prefix {
            return split_prefixed(&self.fed.cfg.separator, &self.fed.server_names, name);
        }
        if !self.session.routes.lock().may_relist(kind.field()) {
            return None;
        }
        self.list_named(kind, tp).await;
        known(self)
    }

    async fn route_uri(&self, uri: &str, tp: &Option<String>) -> Option<Route> {
        if let Some(r) = self.session.routes.lock().resources.get(uri).cloned() {
            return Some(r);
        }
        if self.session.routes.lock().may_relist("resources") {
            self.list_uris("resources/list", "resources", "uri", tp).await;
        }
        if let Some(r) = self.session.routes.lock().resources.get(uri).cloned() {
            return Some(r);
        }
        // A URI no list names (e.g. under a template) can only be routed when one server
        // serves everything.
        (self.fed.servers.len() == 1).then(|| Route { server: 0, original: uri.to_string() })
    }
}

fn invalid(id: &Value, message: &str) -> Value {
    error_message(Some(id), INVALID_PARAMS, message, Value::Null)
}

/// `params` with `key` set to the server's own name.
fn renamed(mut params: Value, key: &str, original: &str) -> Value {
    if let Some(o) = params.as_object_mut() {
        o.insert(key.to_string(), Value::String(original.to_string()));
    }
    params
}
