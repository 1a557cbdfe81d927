//! What the federation needs from an upstream MCP server, whatever its transport: send a
//! request and get its result (or the server's JSON-RPC error), send a notification, and know
//! what `initialize` told. HTTP servers keep one upstream session per client session; a stdio
//! server is one process, initialised once by tollgate and shared by every client session.

use std::sync::Arc;

use serde_json::{json, Value};

use super::http_server::{HttpServer, UpSession};
use super::stdio::StdioServer;

/// Protocol versions tollgate speaks, oldest first; the last is offered when a client asks
/// for one tollgate does not know.
pub const SUPPORTED_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// The version answered to a client that asked for `asked`.
pub fn negotiate(asked: Option<&str>) -> &'static str {
    let latest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    asked.and_then(|a| SUPPORTED_VERSIONS.iter().find(|v| **v == a).copied()).unwrap_or(latest)
}

/// Why an upstream request has no result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The server answered with a JSON-RPC error: relayed to the client as it is.
    #[error("server error {code}: {message}")]
    Rpc {
        /// JSON-RPC code.
        code: i64,
        /// Message.
        message: String,
        /// `data`, if any.
        data: Option<Value>,
    },
    /// The server could not be reached, broke the exchange, or is restarting.
    #[error("{0}")]
    Unavailable(String),
    /// No answer within `request_timeout`.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The server forgot the session (HTTP 404 on a session request): initialise again.
    #[error("upstream session expired")]
    SessionGone,
}

impl CallError {
    /// JSON-RPC error code answered to the client.
    pub fn code(&self) -> i64 {
        match self {
            CallError::Rpc { code, .. } => *code,
            // Implementation-defined server error: the upstream, not the request, failed.
            _ => -32603,
        }
    }

    /// The error object sent to the client for request `id`.
    pub fn to_message(&self, id: &Value, server: &str) -> Value {
        match self {
            CallError::Rpc { code, message, data } => {
                let mut err = json!({"code": code, "message": message});
                if let Some(d) = data {
                    err["data"] = d.clone();
                }
                json!({"jsonrpc": "2.0", "id": id, "error": err})
            }
            other => json!({"jsonrpc": "2.0", "id": id, "error": {
                "code": other.code(),
                "message": format!("tollgate: upstream MCP server {server}: {other}"),
                "data": {"server": server},
            }}),
        }
    }
}

/// A JSON-RPC response message into `Ok(result)` or the server's error.
pub fn result_of(msg: Value) -> Result<Value, CallError> {
    let Value::Object(mut m) = msg else { return Err(CallError::Unavailable("answer is not an object".into())) };
    if let Some(e) = m.remove("error") {
        return Err(CallError::Rpc {
            code: e.get("code").and_then(Value::as_i64).unwrap_or(-32603),
            message: e.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
            data: e.get("data").cloned(),
        });
    }
    m.remove("result").ok_or_else(|| CallError::Unavailable("answer has neither result nor error".into()))
}

/// What an upstream's `initialize` answered.
#[derive(Debug, Clone, Default)]
pub struct InitInfo {
    /// Negotiated protocol version (sent as `MCP-Protocol-Version`).
    pub protocol_version: String,
    /// Server capabilities object.
    pub capabilities: Value,
    /// `name/version` of the server.
    pub server: String,
}

impl InitInfo {
    /// From an `initialize` result.
    pub fn from_result(r: &Value) -> InitInfo {
        let info = r.get("serverInfo");
        let name = info.and_then(|i| i.get("name")).and_then(Value::as_str).unwrap_or("");
        let version = info.and_then(|i| i.get("version")).and_then(Value::as_str).unwrap_or("");
        InitInfo {
            protocol_version: r.get("protocolVersion").and_then(Value::as_str).unwrap_or("").to_string(),
            capabilities: r.get("capabilities").cloned().unwrap_or(Value::Null),
            server: if version.is_empty() { name.to_string() } else { format!("{name}/{version}") },
        }
    }

    /// Whether the server offers a capability (`tools`, `prompts`, `resources`, `logging`).
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.get(capability).is_some_and(|c| !c.is_null())
    }
}

/// One upstream server of a federation.
pub enum Server {
    /// Streamable HTTP.
    Http(Box<HttpServer>),
    /// Spawned process speaking newline-delimited JSON-RPC.
    Stdio(Arc<StdioServer>),
}

/// Per client session state of one upstream (HTTP sessions; nothing for stdio).
pub type Slot = tokio::sync::Mutex<Option<UpSession>>;

/// The token an upstream request carries.
#[derive(Debug, Clone, Default)]
pub enum Bearer {
    /// No token (stdio servers, servers without `token_audience`, endpoints without auth).
    #[default]
    None,
    /// The token obtained by RFC 8693 exchange for this server.
    Token(String),
    /// The exchange failed: requests to this server fail rather than go without a token.
    Failed,
}

/// Context of one upstream request: the client's identity for an HTTP `initialize`, the trace
/// parent, and the token for the upstream (RFC 8693 exchange).
pub struct Ask<'a> {
    /// The client's `clientInfo` (sent on per-session HTTP initialisation).
    pub client_info: &'a Value,
    /// The protocol version the client negotiated with tollgate.
    pub version: &'a str,
    /// W3C `traceparent` of tollgate's span for the call.
    pub traceparent: Option<&'a str>,
    /// Token for the upstream.
    pub bearer: &'a Bearer,
}

impl Server {
    /// Server name (metric label, prefix).
    pub fn name(&self) -> &str {
        match self {
            Server::Http(h) => &h.name,
            Server::Stdio(s) => s.name(),
        }
    }

    /// Send `method` and wait for its result. HTTP: initialises the session's upstream session
    /// first when needed, and once more if the server lost it (restart): the request is then
    /// sent again, since the server never saw it.
    pub async fn request(&self, slot: &Slot, ask: &Ask<'_>, method: &str, params: Value) -> Result<Value, CallError> {
        exchanged(ask)?;
        match self {
            Server::Stdio(s) => s.request(method, params).await,
            Server::Http(h) => {
                let mut guard = slot.lock().await;
                if guard.is_none() {
                    *guard = Some(h.initialize(ask).await?);
                }
                let up = guard.clone();
                drop(guard);
                let Some(up) = up else { return Err(CallError::Unavailable("no session".into())) };
                match h.request(&up, ask, method, params.clone()).await {
                    Err(CallError::SessionGone) => {
                        let mut guard = slot.lock().await;
                        // Another request of the session may have re-initialised already.
                        let fresh = match guard.as_ref() {
                            Some(cur) if cur.id != up.id => cur.clone(),
                            _ => {
                                h.reinitialized();
                                let s = h.initialize(ask).await?;
                                *guard = Some(s.clone());
                                s
                            }
                        };
                        drop(guard);
                        h.request(&fresh, ask, method, params).await
                    }
                    other => other,
                }
            }
        }
    }

    /// Fire a notification (stdio: to the shared process; HTTP: on the session's upstream
    /// session, if it has one).
    pub async fn notify(&self, slot: &Slot, ask: &Ask<'_>, method: &str, params: Value) {
        if exchanged(ask).is_err() {
            return;
        }
        match self {
            Server::Stdio(s) => s.notify(method, params).await,
            Server::Http(h) => {
                let up = slot.lock().await.clone();
                if let Some(up) = up {
                    h.notify(&up, ask, method, params).await;
                }
            }
        }
    }

    /// What the server's `initialize` answered (HTTP: this session's; stdio: the process's),
    /// initialising an HTTP session if needed.
    pub async fn init_info(&self, slot: &Slot, ask: &Ask<'_>) -> Result<InitInfo, CallError> {
        exchanged(ask)?;
        match self {
            Server::Stdio(s) => s.wait_ready().await,
            Server::Http(h) => {
                let mut guard = slot.lock().await;
                if guard.is_none() {
                    *guard = Some(h.initialize(ask).await?);
                }
                guard.as_ref().map(|u| u.info.clone()).ok_or_else(|| CallError::Unavailable("no session".into()))
            }
        }
    }

    /// End the session's upstream session (HTTP DELETE), if it has one.
    pub async fn close(&self, slot: &Slot) {
        if let Server::Http(h) = self {
            if let Some(up) = slot.lock().await.take() {
                h.delete(&up).await;
            }
        }
    }
}

/// Refuse a request whose token exchange failed.
fn exchanged(ask: &Ask<'_>) -> Result<(), CallError> {
    match ask.bearer {
        Bearer::Failed => Err(CallError::Unavailable("token exchange for this server failed".into())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_negotiate_down_to_known_ones() {
        assert_eq!(negotiate(Some("2025-03-26")), "2025-03-26");
        assert_eq!(negotiate(Some("2099-01-01")), "2025-11-25");
        assert_eq!(negotiate(None), "2025-11-25");
    }

    #[test]
    fn results_and_errors_are_told_apart() {
        assert_eq!(result_of(json!({"jsonrpc": "2.0", "id": 1, "result": {"a": 1}})).unwrap()["a"], 1);
        let e = result_of(json!({"id": 1, "error": {"code": -32602, "message": "Unknown tool", "data": 5}}));
        let e = e.unwrap_err();
        assert_eq!(e.code(), -32602);
        let m = e.to_message(&json!("x"), "calc");
        assert_eq!(
            (m["id"].as_str(), m["error"]["message"].as_str(), m["error"]["data"].as_i64()),
            (Some("x"), Some("Unknown tool"), Some(5))
        );
        let m = CallError::Unavailable("down".into()).to_message(&json!(2), "calc");
        assert_eq!(m["error"]["code"], -32603);
        assert!(m["error"]["message"].as_str().unwrap().contains("calc: down"));
        assert!(result_of(json!({"id": 1})).is_err());
    }
}
