//! An upstream MCP server reached over Streamable HTTP: `initialize` per client session (the
//! client's `clientInfo` goes upstream, so the server sees who it serves), requests answered
//! with JSON or an SSE stream (read incrementally until the answer to tollgate's id), and the
//! session ended with DELETE. A 404 on a session request means the server lost the session
//! (usually a restart): the caller initialises again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use serde_json::{json, Value};

use super::upstream::{result_of, Ask, CallError, InitInfo};
use crate::config::federation::FederatedServer;
use crate::protocol::llm::sse::{SseEvent, SseParser};
use crate::telemetry::federation::FederationMetrics;
use crate::upstream::{Target, Upstream};

/// One upstream session: the id the server gave (none for stateless servers) and what it
/// answered to `initialize`.
#[derive(Debug, Clone)]
pub struct UpSession {
    /// `Mcp-Session-Id` the server assigned.
    pub id: Option<HeaderValue>,
    /// Its `initialize` answer.
    pub info: InitInfo,
}

/// A Streamable HTTP upstream.
pub struct HttpServer {
    /// Server name.
    pub name: String,
    federation: Arc<str>,
    /// Path and query of the endpoint, sent on every request.
    path: String,
    target: Target,
    headers: HeaderMap,
    client: Arc<Upstream>,
    timeout: Duration,
    max_bytes: usize,
    max_event: usize,
    next_id: AtomicU64,
    metrics: Arc<FederationMetrics>,
}

/// Limits an HTTP upstream reads answers with.
pub struct Bounds {
    /// Deadline of one request.
    pub timeout: Duration,
    /// Largest JSON answer.
    pub max_bytes: usize,
    /// Largest SSE event.
    pub max_event: usize,
}

impl HttpServer {
    /// An upstream from its config (`url` set).
    pub fn new(
        federation: Arc<str>,
        cfg: &FederatedServer,
        url: &url::Url,
        client: Arc<Upstream>,
        bounds: Bounds,
        metrics: Arc<FederationMetrics>,
    ) -> Result<Self, CallError> {
        // The target names the origin only; every request carries the URL's full path.
        let mut origin = url.clone();
        origin.set_path("");
        origin.set_query(None);
        let target = Target::from_url(&origin).map_err(|e| CallError::Unavailable(e.to_string()))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            // Validated with the config.
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                headers.insert(k, v);
            }
        }
        Ok(HttpServer {
            name: cfg.name.clone(),
            federation,
            path: match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            },
            target,
            headers,
            client,
            timeout: bounds.timeout,
            max_bytes: bounds.max_bytes,
            max_event: bounds.max_event,
            next_id: AtomicU64::new(1),
            metrics,
        })
    }

    /// Count a re-initialisation after the server lost a session.
    pub fn reinitialized(&self) {
        self.metrics.reinitialized(&self.federation, &self.name);
    }

    /// Open an upstream session: `initialize` with the client's identity, then
    /// `notifications/initialized`.
    pub async fn initialize(&self, ask: &Ask<'_>) -> Result<UpSession, CallError> {
        let params = json!({"protocolVersion": ask.version, "capabilities": {}, "clientInfo": ask.client_info});
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": params});
        let (sid, answer) = self.exchange(None, None, ask, &msg, Some(id)).await?;
        let info = InitInfo::from_result(&result_of(answer.unwrap_or(Value::Null))?);
        let up = UpSession { id: sid, info };
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let version = up.info.protocol_version.clone();
        self.exchange(up.id.as_ref(), Some(&version), ask, &note, None).await?;
        self.metrics.set_up(&self.federation, &self.name, true);
        Ok(up)
    }

    /// One request on an upstream session.
    pub async fn request(
        &self,
        up: &UpSession,
        ask: &Ask<'_>,
        method: &str,
        params: Value,
    ) -> Result<Value, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let (_, answer) = self.exchange(up.id.as_ref(), Some(&up.info.protocol_version), ask, &msg, Some(id)).await?;
        result_of(answer.ok_or_else(|| CallError::Unavailable("no answer to the request".into()))?)
    }

    /// A notification on an upstream session; failures are only logged (nobody waits).
    pub async fn notify(&self, up: &UpSession, ask: &Ask<'_>, method: &str, params: Value) {
        let msg = json!({"jsonrpc": "2.0", "method": method, "params": params});
        if let Err(e) = self.exchange(up.id.as_ref(), Some(&up.info.protocol_version), ask, &msg, None).await {
            tracing::debug!(server = %self.name, method, error = %e, "federated notification failed");
        }
    }

    /// End an upstream session (best effort).
    pub async fn delete(&self, up: &UpSession) {
        let Some(id) = &up.id else { return };
        let req = match self.base(Method::DELETE, Some(id), Some(&up.info.protocol_version), None) {
            Ok(r) => r.body(Either::Right(Full::new(Bytes::new()))),
            Err(e) => return tracing::debug!(server = %self.name, error = %e, "cannot build DELETE"),
        };
        if let Ok(req) = req {
            let _ = tokio::time::timeout(self.timeout, self.client.send(req)).await;
        }
    }

    fn base(
        &self,
        method: Method,
        session: Option<&HeaderValue>,
        version: Option<&str>,
        ask: Option<&Ask<'_>>,
    ) -> Result<http::request::Builder, CallError> {
        let uri = self.target.uri_for(&self.path).map_err(|e| CallError::Unavailable(e.to_string()))?;
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(h) = self.target.host_header() {
            b = b.header(http::header::HOST, h);
        }
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        if let Some(s) = session {
            b = b.header("mcp-session-id", s);
        }
        if let Some(v) = version.filter(|v| !v.is_empty()) {
            b = b.header("mcp-protocol-version", v);
        }
        if let Some(a) = ask {
            if let Some(tp) = a.traceparent {
                b = b.header("traceparent", tp);
            }
            if let super::upstream::Bearer::Token(t) = a.bearer {
                b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
        }
        Ok(b)
    }

    /// POST one message; returns the session id the server set and, when `want` is an id,
    /// the response message carrying it.
    async fn exchange(
        &self,
        session: Option<&HeaderValue>,
        version: Option<&str>,
        ask: &Ask<'_>,
        msg: &Value,
        want: Option<u64>,
    ) -> Result<(Option<HeaderValue>, Option<Value>), CallError> {
        let body = serde_json::to_vec(msg).map_err(|e| CallError::Unavailable(e.to_string()))?;
        let req = self
            .base(Method::POST, session, version, Some(ask))?
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream")
            .body(Either::Right(Full::new(Bytes::from(body))))
            .map_err(|e| CallError::Unavailable(e.to_string()))?;
        let work = async {
            let resp = match self.client.send(req).await {
                Ok(r) => r,
                Err(e) => {
                    self.metrics.set_up(&self.federation, &self.name, false);
                    return Err(CallError::Unavailable(crate::upstream::error_chain(&e)));
                }
            };
            let status = resp.status();
            if status == StatusCode::NOT_FOUND && session.is_some() {
                return Err(CallError::SessionGone);
            }
            if !status.is_success() {
                return Err(CallError::Unavailable(format!("HTTP {}", status.as_u16())));
            }
            let sid = resp.headers().get("mcp-session-id").cloned().or_else(|| session.cloned());
            let Some(want) = want else { return Ok((sid, None)) };
            let sse = super::super::is_sse(resp.headers());
            let answer = if sse {
                self.read_sse(resp.into_body(), want, sid.as_ref(), version, ask).await?
            } else {
                self.read_json(resp.into_body(), want).await?
            };
            Ok((sid, Some(answer)))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(self.timeout)),
        }
    }

    async fn read_json(&self, body: hyper::body::Incoming, want: u64) -> Result<Value, CallError> {
        let bytes = http_body_util::Limited::new(body, self.max_bytes)
            .collect()
            .await
            .map_err(|e| CallError::Unavailable(format!("reading the answer: {e}")))?
            .to_bytes();
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| CallError::Unavailable(format!("answer is not JSON: {e}")))?;
        pick(v, want).ok_or_else(|| CallError::Unavailable("no answer with the request's id".into()))
    }

    /// Read SSE events until the one answering `want`; the rest of the stream is dropped
    /// (the server may send progress and log notifications first).
    async fn read_sse(
        &self,
        mut body: hyper::body::Incoming,
        want: u64,
        session: Option<&HeaderValue>,
        version: Option<&str>,
        ask: &Ask<'_>,
    ) -> Result<Value, CallError> {
        let mut parser = SseParser::new(self.max_event);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| CallError::Unavailable(format!("reading the stream: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            let mut found = None;
            let mut asked = Vec::new();
            parser.feed(&data, |_, ev| {
                if let (SseEvent::Data(d), None) = (ev, &found) {
                    if let Ok(v) = serde_json::from_slice::<Value>(d) {
                        if v.get("method").is_some() && v.get("id").is_some() {
                            asked.push(v);
                        } else {
                            found = pick(v, want);
                        }
                    }
                }
            });
            if let Some(v) = found {
                return Ok(v);
            }
            // The server asks the client something (sampling, elicitation, ping) before it
            // answers: no client is attached, so it gets "method not found" at once (a pong
            // for ping) instead of waiting for a reply that never comes.
            for q in asked.iter().take(16) {
                let reply = server_request_reply(q);
                Box::pin(self.exchange(session, version, ask, &reply, None)).await?;
            }
        }
        Err(CallError::Unavailable("stream ended without an answer".into()))
    }
}

/// tollgate's answer to a request an upstream server sends to its (absent) client.
pub fn server_request_reply(q: &Value) -> Value {
    let id = q.get("id").cloned().unwrap_or(Value::Null);
    match q.get("method").and_then(Value::as_str) {
        Some("ping") => json!({"jsonrpc": "2.0", "id": id, "result": {}}),
        m => json!({"jsonrpc": "2.0", "id": id, "error": {
            "code": -32601,
            "message": format!("tollgate federation does not serve {} to upstream servers", m.unwrap_or("")),
        }}),
    }
}

/// The response message with id `want` in a message or batch.
fn pick(v: Value, want: u64) -> Option<Value> {
    let is = |m: &Value| m.get("id").and_then(Value::as_u64) == Some(want) && m.get("method").is_none();
    match v {
        Value::Array(a) => a.into_iter().find(is),
        m if is(&m) => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_picked_by_id_not_by_position() {
        let batch = json!([{"jsonrpc": "2.0", "method": "notifications/progress"}, {"id": 7, "result": {}}, {"id": 8, "result": 1}]);
        assert_eq!(pick(batch, 8).unwrap()["result"], 1);
        assert!(pick(json!({"id": 3, "method": "ping"}), 3).is_none(), "a server request is not an answer");
        assert!(pick(json!({"id": 2, "result": {}}), 3).is_none());
    }

    #[test]
    fn server_requests_get_an_immediate_answer() {
        let pong = server_request_reply(&json!({"jsonrpc": "2.0", "id": 4, "method": "ping"}));
        assert_eq!((pong["id"].as_i64(), pong["result"].is_object()), (Some(4), true));
        let no = server_request_reply(&json!({"jsonrpc": "2.0", "id": "e", "method": "elicitation/create"}));
        assert_eq!((no["id"].as_str(), no["error"]["code"].as_i64()), (Some("e"), Some(-32601)));
    }
}
