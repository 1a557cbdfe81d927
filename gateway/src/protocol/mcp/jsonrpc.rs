//! JSON-RPC 2.0 as MCP uses it: reading the facts tollgate needs from a request body (one
//! message or a batch) and from each response message, building the error tollgate answers a
//! denied call with, and removing denied tools from a `tools/list` result. Only the fields
//! read are materialised (typed structs; everything else is skipped by the parser).

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::policy::mcp_limits::ToolLimited;

/// JSON-RPC "Invalid params": what MCP servers answer for an unknown tool (MCP spec, tools,
/// "Error Handling"), so clients treat a denied tool like one that does not exist. The SDK
/// clients raise it as an MCP error carrying this code and the message.
pub const TOOL_DENIED_CODE: i64 = -32602;

/// A `tools/call` refused by a tool-call limit (`mcp.tool_limits`) for now: in JSON-RPC's
/// implementation-defined server-error range (-32000..-32099), apart from the codes MCP and
/// its SDKs use there, so clients can tell "retry later" from "never allowed" (-32602). The
/// digits echo HTTP 429; `data.retry_after_secs` says when to retry.
pub const TOOL_RATE_LIMITED_CODE: i64 = -32029;

/// Why a body is not JSON-RPC tollgate can govern.
#[derive(Debug, thiserror::Error)]
pub enum JsonRpcError {
    /// Not JSON, or not JSON-RPC objects.
    #[error("not a JSON-RPC message: {0}")]
    Syntax(#[from] serde_json::Error),
    /// An empty batch.
    #[error("empty JSON-RPC batch")]
    EmptyBatch,
    /// A batch longer than the limit (`mcp.max_batch_len`, carried here).
    #[error("JSON-RPC batch of more than {0} messages (mcp.max_batch_len: {0})")]
    BatchTooLong(usize),
}

/// JSON-RPC "Invalid Request": what a batch over `mcp.max_batch_len` is answered with.
pub const INVALID_REQUEST_CODE: i64 = -32600;

/// The error answering a batch longer than `max` (id null, as for any request that cannot be
/// taken apart; `data.max_batch_len` tells the client how to split it).
pub fn batch_too_long(max: usize) -> Value {
    let message = format!("tollgate: {}; nothing was sent, split the batch", JsonRpcError::BatchTooLong(max));
    error_message(None, INVALID_REQUEST_CODE, &message, serde_json::json!({"max_batch_len": max}))
}

/// Read a batch (a JSON array) of at most `max` messages of type `T`. Parsing stops at the first
/// message past `max`, so a huge batch costs no more than `max + 1` messages' work.
pub fn read_batch<T: for<'de> Deserialize<'de>>(body: &[u8], max: usize) -> Result<Vec<T>, JsonRpcError> {
    let over = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let read = CappedSeq { max, over: &over, _t: PhantomData }.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match read {
        Err(_) if over.get() => Err(JsonRpcError::BatchTooLong(max)),
        Err(e) => Err(e.into()),
        Ok(v) if v.is_empty() => Err(JsonRpcError::EmptyBatch),
        Ok(v) => Ok(v),
    }
}

/// A sequence visitor that gives up past `max` elements (and says so in `over`).
struct CappedSeq<'a, T> {
    max: usize,
    over: &'a Cell<bool>,
    _t: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for CappedSeq<'_, T> {
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for CappedSeq<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC batch (an array of messages)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        loop {
            if out.len() == self.max {
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    self.over.set(true);
                    return Err(serde::de::Error::custom("batch too long"));
                }
                return Ok(out);
            }
            match seq.next_element::<T>()? {
                Some(m) => out.push(m),
                None => return Ok(out),
            }
        }
    }
}

/// `name`/`version` of an MCP implementation (`clientInfo`, `serverInfo`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Implementation {
    /// Implementation name.
    #[serde(default)]
    pub name: String,
    /// Version.
    #[serde(default)]
    pub version: String,
}

impl Implementation {
    /// `name/version` (or the name alone).
    pub fn label(&self) -> String {
        if self.version.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.name, self.version)
        }
    }
}

/// `_meta` keys of the 2026-07-28 protocol, where `server/discover` and every request carry
/// the client's identity and version instead of an `initialize` handshake.
#[derive(Debug, Default, Deserialize)]
struct Meta {
    #[serde(rename = "io.modelcontextprotocol/clientInfo")]
    client_info: Option<Implementation>,
    #[serde(rename = "io.modelcontextprotocol/serverInfo")]
    server_info: Option<Implementation>,
    #[serde(rename = "io.modelcontextprotocol/protocolVersion")]
    protocol_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    name: Option<String>,
    uri: Option<String>,
    protocol_version: Option<String>,
    client_info: Option<Implementation>,
    #[serde(rename = "_meta")]
    meta: Option<Meta>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResultFacts {
    protocol_version: Option<String>,
    server_info: Option<Implementation>,
    #[serde(rename = "_meta")]
    meta: Option<Meta>,
}

#[derive(Debug, Deserialize)]
struct ErrorFacts {
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct Wire {
    #[serde(default)]
    id: Option<Value>,
    method: Option<String>,
    #[serde(default)]
    params: Option<Params>,
    #[serde(default)]
    result: Option<ResultFacts>,
    #[serde(default)]
    error: Option<ErrorFacts>,
}

/// What tollgate reads from one message an agent sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// Request id as JSON text; `None` for a notification (or a response the client sends).
    pub id: Option<String>,
    /// The id as sent, to echo in an error response.
    pub raw_id: Option<Value>,
    /// Method (`tools/call`, ...); `None` for a response to a server request.
    pub method: Option<String>,
    /// `params.name`: the tool of `tools/call`, the prompt of `prompts/get`.
    pub name: Option<String>,
    /// `params.uri` of `resources/*`.
    pub uri: Option<String>,
    /// Protocol version the client asks for (`initialize` params or `_meta`).
    pub protocol_version: Option<String>,
    /// Client implementation (`initialize` params or `_meta`).
    pub client: Option<Implementation>,
}

/// What tollgate reads from one message the server sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseFacts {
    /// Id as JSON text of the request this answers; `None` for server notifications.
    pub id: Option<String>,
    /// Method, when the server sent a notification or request rather than a response.
    pub method: Option<String>,
    /// JSON-RPC error code and message.
    pub error: Option<(i64, String)>,
    /// Negotiated protocol version (`initialize` result).
    pub protocol_version: Option<String>,
    /// Server implementation (`initialize` result or `_meta`).
    pub server: Option<Implementation>,
}

/// The messages of a body: a single object or a batch array of at most `max_batch` messages.
fn messages(body: &[u8], max_batch: usize) -> Result<Vec<Wire>, JsonRpcError> {
    if is_batch(body) {
        read_batch(body, max_batch)
    } else {
        Ok(vec![serde_json::from_slice(body)?])
    }
}

/// Whether a body is a batch (an array), so answers must be one too.
pub fn is_batch(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

fn id_text(id: &Option<Value>) -> Option<String> {
    id.as_ref().filter(|v| !v.is_null()).map(Value::to_string)
}

/// The messages of a POST body, in order; a batch of more than `max_batch` messages
/// (`mcp.max_batch_len`) is [`JsonRpcError::BatchTooLong`].
pub fn parse_request(body: &[u8], max_batch: usize) -> Result<Vec<RequestFacts>, JsonRpcError> {
    Ok(messages(body, max_batch)?
        .into_iter()
        .map(|w| {
            let p = w.params.unwrap_or_default();
            let meta = p.meta.unwrap_or_default();
            RequestFacts {
                id: id_text(&w.id),
                raw_id: w.id,
                method: w.method,
                name: p.name,
                uri: p.uri,
                protocol_version: p.protocol_version.or(meta.protocol_version),
                client: p.client_info.or(meta.client_info),
            }
        })
        .collect())
}

/// The messages of a response body or SSE event.
pub fn parse_response(body: &[u8]) -> Result<Vec<ResponseFacts>, JsonRpcError> {
    // Not capped: a server answers the batches tollgate let through, and its answers are
    // observed as they stream, bounded by `limits.max_inspect_bytes`.
    Ok(messages(body, usize::MAX)?
        .into_iter()
        .map(|w| {
            let r = w.result.unwrap_or_default();
            let meta = r.meta.unwrap_or_default();
            ResponseFacts {
                id: if w.method.is_some() { None } else { id_text(&w.id) },
                method: w.method,
                error: w.error.map(|e| (e.code, e.message)),
                protocol_version: r.protocol_version,
                server: r.server_info.or(meta.server_info),
            }
        })
        .collect())
}

/// The JSON-RPC error object answering request `id` (serialised).
pub fn error_message(id: Option<&Value>, code: i64, message: &str, data: Value) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": {"code": code, "message": message, "data": data},
    })
}

/// The answer to `tools/call` request `id` of `tool` that tool rule `rule` refused for `agent`
/// (code [`TOOL_DENIED_CODE`], `data: {tool, rule, agent}`), as every tollgate listener sends it.
pub fn tool_denied(id: Option<&Value>, tool: &str, rule: &str, agent: &str) -> Value {
    let message = format!("tollgate: tool {tool} denied by rule {rule}");
    error_message(id, TOOL_DENIED_CODE, &message, serde_json::json!({"tool": tool, "rule": rule, "agent": agent}))
}

/// The answer to `tools/call` request `id` of `tool` that a tool-call limit refused for
/// `agent` (code [`TOOL_RATE_LIMITED_CODE`], `data: {tool, rule, agent, retry_after_secs}`,
/// plus `unavailable: true` when the shared counters could not be reached), as every tollgate
/// listener sends it.
pub fn tool_rate_limited(id: Option<&Value>, tool: &str, agent: &str, limited: &ToolLimited) -> Value {
    let mut data = serde_json::json!({
        "tool": tool,
        "rule": limited.rule,
        "agent": agent,
        "retry_after_secs": limited.retry_after_secs,
    });
    if limited.unavailable {
        data["unavailable"] = Value::Bool(true);
    }
    error_message(id, TOOL_RATE_LIMITED_CODE, &limited.message(tool), data)
}

/// Remove from the `tools/list` results among `body` (one message or a batch) the tools
/// `allowed` refuses, for responses whose id is in `ids`. Returns the rewritten body and how
/// many tools were removed, or `None` when nothing changed (the original bytes stand).
pub fn filter_tools_list(
    body: &[u8],
    ids: &[&str],
    allowed: &dyn Fn(&str) -> bool,
) -> Result<Option<(Vec<u8>, u32)>, JsonRpcError> {
    let mut v: Value = serde_json::from_slice(body)?;
    let mut removed = 0u32;
    let mut one = |m: &mut Value| {
        let id = m.get("id").map(Value::to_string);
        if !id.as_deref().is_some_and(|id| ids.contains(&id)) {
            return;
        }
        if let Some(tools) = m.pointer_mut("/result/tools").and_then(Value::as_array_mut) {
            let before = tools.len();
            tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(allowed));
            removed += (before - tools.len()) as u32;
        }
    };
    match &mut v {
        Value::Array(a) => a.iter_mut().for_each(&mut one),
        m => one(m),
    }
    if removed == 0 {
        return Ok(None);
    }
    Ok(Some((serde_json::to_vec(&v)?, removed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tools_call_initialize_discover_and_batches() {
        let r = parse_request(
            br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#,
            64,
        )
        .unwrap();
        assert_eq!(r[0].id.as_deref(), Some("3"));
        assert_eq!((r[0].method.as_deref(), r[0].name.as_deref()), (Some("tools/call"), Some("add")));
        let init = br#"{"jsonrpc":"2.0","id":"a","method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"cli","version":"1.0"}}}"#;
        let r = parse_request(init, 64).unwrap();
        assert_eq!(r[0].id.as_deref(), Some("\"a\""));
        assert_eq!(r[0].protocol_version.as_deref(), Some("2025-06-18"));
        assert_eq!(r[0].client.as_ref().map(Implementation::label).as_deref(), Some("cli/1.0"));
        let disc = br#"{"jsonrpc":"2.0","id":1,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"}}}}"#;
        let r = parse_request(disc, 64).unwrap();
        assert_eq!(r[0].protocol_version.as_deref(), Some("2026-07-28"));
        assert_eq!(r[0].client.as_ref().map(|c| c.name.as_str()), Some("mcp"));
        let batch = br#" [{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":2,"method":"tools/list"}]"#;
        assert!(is_batch(batch));
        let r = parse_request(batch, 64).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].id.as_deref(), r[1].id.as_deref()), (None, Some("2")));
        assert!(parse_request(b"[]", 64).is_err());
        assert!(parse_request(b"not json", 64).is_err());
    }

    /// A batch longer than the limit is refused whatever its messages, and parsing stops past
    /// the limit (the garbage after message 3 is never looked at).
    #[test]
    fn batches_past_the_limit_are_refused() {
        let msg = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        let batch = |n: usize| format!("[{}]", vec![msg; n].join(","));
        assert_eq!(parse_request(batch(3).as_bytes(), 3).unwrap().len(), 3);
        let e = parse_request(batch(4).as_bytes(), 3).unwrap_err();
        assert!(matches!(e, JsonRpcError::BatchTooLong(3)), "{e:?}");
        assert_eq!(e.to_string(), "JSON-RPC batch of more than 3 messages (mcp.max_batch_len: 3)");
        let cut = format!("[{msg},{msg},{msg},{msg},{{not json at all");
        assert!(matches!(parse_request(cut.as_bytes(), 3), Err(JsonRpcError::BatchTooLong(3))));
        assert!(matches!(parse_request(cut.as_bytes(), 10), Err(JsonRpcError::Syntax(_))));
        assert!(parse_request(msg.as_bytes(), 1).is_ok(), "a single message is no batch");
        assert!(matches!(read_batch::<Value>(b"[]", 3), Err(JsonRpcError::EmptyBatch)));
        assert!(matches!(read_batch::<Value>(b"[1,2] x", 3), Err(JsonRpcError::Syntax(_))), "trailing bytes");
        let v = batch_too_long(64);
        assert_eq!((v["id"].clone(), v["error"]["code"].as_i64()), (Value::Null, Some(INVALID_REQUEST_CODE)));
        assert_eq!(v["error"]["data"]["max_batch_len"], 64);
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.starts_with("tollgate: ") && m.contains("mcp.max_batch_len: 64"), "{m}");
    }

    #[test]
    fn reads_results_errors_and_server_messages() {
        let r = parse_response(br#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-11-25","serverInfo":{"name":"s","version":"2"}}}"#).unwrap();
        assert_eq!(r[0].server.as_ref().map(Implementation::label).as_deref(), Some("s/2"));
        assert_eq!(r[0].protocol_version.as_deref(), Some("2025-11-25"));
        let r = parse_response(br#"{"jsonrpc":"2.0","id":4,"error":{"code":-32601,"message":"nope"}}"#).unwrap();
        assert_eq!(r[0].error, Some((-32601, "nope".into())));
        let r = parse_response(br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{}}"#).unwrap();
        assert_eq!((r[0].id.as_deref(), r[0].method.as_deref()), (None, Some("notifications/progress")));
    }

    #[test]
    fn tools_list_filtered_by_id() {
        let body = br#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"get_weather"},{"name":"delete_file"},{"name":"add"}]}}"#;
        let deny = |t: &str| t != "delete_file";
        let (out, n) = filter_tools_list(body, &["2"], &deny).unwrap().unwrap();
        assert_eq!(n, 1);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let names: Vec<&str> =
            v["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["get_weather", "add"]);
        assert!(filter_tools_list(body, &["3"], &deny).unwrap().is_none(), "other ids untouched");
        let all_ok = |_: &str| true;
        assert!(filter_tools_list(body, &["2"], &all_ok).unwrap().is_none());
        let batch = format!("[{}]", String::from_utf8_lossy(body));
        assert_eq!(filter_tools_list(batch.as_bytes(), &["2"], &deny).unwrap().unwrap().1, 1);
    }

    #[test]
    fn error_echoes_the_id() {
        let v = error_message(Some(&Value::from("x")), TOOL_DENIED_CODE, "m", Value::Null);
        assert_eq!(v["id"], "x");
        assert_eq!(v["error"]["code"], -32602);
        assert_eq!(error_message(None, 1, "m", Value::Null)["id"], Value::Null);
    }

    /// Found by the `jsonrpc` fuzz target: an integer id past u64 is a float; the reply
    /// tollgate builds for it must read back as the same id.
    #[test]
    fn an_id_past_u64_reads_back_from_the_reply() {
        let r = parse_request(br#"{"jsonrpc": "2.0", "id": 2222222222222226222222222221}"#, 64).expect("parse");
        let reply = serde_json::to_vec(&tool_denied(r[0].raw_id.as_ref(), "t", "r", "a")).expect("json");
        let back = parse_request(&reply, 64).expect("reply parses");
        assert_eq!(back[0].id, r[0].id);
    }

    #[test]
    fn tool_refusals_name_tool_rule_agent_and_retry_time() {
        let v = tool_denied(Some(&Value::from(4)), "delete_file", "no-delete", "bot");
        assert_eq!(v["error"]["message"], "tollgate: tool delete_file denied by rule no-delete");
        assert_eq!(v["error"]["data"], serde_json::json!({"tool": "delete_file", "rule": "no-delete", "agent": "bot"}));
        let mut l = ToolLimited { rule: "budget".into(), retry_after_secs: 42, unavailable: false };
        let v = tool_rate_limited(Some(&Value::from("q")), "search", "bot", &l);
        assert_eq!((v["id"].as_str(), v["error"]["code"].as_i64()), (Some("q"), Some(TOOL_RATE_LIMITED_CODE)));
        let data = serde_json::json!({"tool": "search", "rule": "budget", "agent": "bot", "retry_after_secs": 42});
        assert_eq!(v["error"]["data"], data);
        assert_eq!(v["error"]["message"], "tollgate: tool search rate limited by rule budget; retry after 42 s");
        l.unavailable = true;
        assert_eq!(tool_rate_limited(None, "search", "bot", &l)["error"]["data"]["unavailable"], true);
    }
}
