//! The Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) as the mock
//! speaks it: the `message` object with `text` or `tool_use` content and cache-aware usage, the
//! streamed events (`event:` + `data:` lines, in the order the real API sends them), and the
//! `{"type":"error",...}` error shape.
//!
//! Replies are pure functions of the request (formulas on [`reply_for`]), so tests can assert
//! exact texts and usage numbers after the SDK has parsed them.

use serde_json::{json, Value};

use crate::openai::{tool_echo_words, Tool};
use crate::wire::{self, Hasher};

/// One message of a Messages request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// Its text: a string `content`, or the blocks' text joined with newlines (`text` blocks as
    /// is, `tool_use` as `name input-json`, `tool_result` its content's text).
    pub text: String,
    /// The text of its `tool_result` blocks, when it has any.
    pub tool_result: Option<String>,
}

/// The parts of a Messages (or count_tokens) request that decide the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagesRequest {
    /// `model`.
    pub model: String,
    /// `system` (string, or text blocks joined with newlines).
    pub system: Option<String>,
    /// `messages`.
    pub messages: Vec<Message>,
    /// `max_tokens` (0 for count_tokens, which has none).
    pub max_tokens: u32,
    /// `stream`.
    pub stream: bool,
    /// `tools` with an `input_schema` (client tools), as `(name, input_schema)`.
    pub tools: Vec<Tool>,
}

impl MessagesRequest {
    /// A request with one user message.
    pub fn simple(model: &str, user: &str, max_tokens: u32) -> Self {
        MessagesRequest {
            model: model.into(),
            system: None,
            messages: vec![Message { role: "user".into(), text: user.into(), tool_result: None }],
            max_tokens,
            stream: false,
            tools: Vec::new(),
        }
    }

    /// Parse a request body; `Err` is the message of a 400 `invalid_request_error`.
    /// `count_tokens` bodies have no `max_tokens`.
    pub fn from_json(v: &Value, count_tokens: bool) -> Result<Self, String> {
        let model = v.get("model").and_then(Value::as_str).ok_or("model: Field required")?;
        let max_tokens = match v.get("max_tokens").and_then(Value::as_u64) {
            Some(n) => n.min(u64::from(u32::MAX)) as u32,
            None if count_tokens => 0,
            None => return Err("max_tokens: Field required".into()),
        };
        let msgs = v.get("messages").and_then(Value::as_array).ok_or("messages: Field required")?;
        let mut messages = Vec::new();
        for m in msgs {
            let role = m.get("role").and_then(Value::as_str).ok_or("messages.role: Field required")?;
            let (text, tool_result) = match m.get("content") {
                Some(Value::String(s)) => (s.clone(), None),
                Some(Value::Array(blocks)) => {
                    let (mut texts, mut results) = (Vec::new(), Vec::new());
                    for b in blocks {
                        match b.get("type").and_then(Value::as_str) {
                            Some("text") => texts.push(b.get("text").and_then(Value::as_str).unwrap_or("").to_string()),
                            Some("tool_use") => texts.push(format!(
                                "{} {}",
                                b.get("name").and_then(Value::as_str).unwrap_or(""),
                                b.get("input").map(Value::to_string).unwrap_or_default()
                            )),
                            Some("tool_result") => {
                                let t = wire::text_of(b.get("content"));
                                texts.push(t.clone());
                                results.push(t);
                            }
                            _ => {}
                        }
                    }
                    (texts.join("\n"), (!results.is_empty()).then(|| results.join("\n")))
                }
                _ => return Err("messages.content: Field required".into()),
            };
            messages.push(Message { role: role.into(), text, tool_result });
        }
        let tools = v
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|t| t.get("input_schema").is_some())
            .filter_map(|t| {
                Some(Tool { name: t.get("name")?.as_str()?.to_string(), parameters: t.get("input_schema").cloned() })
            })
            .collect();
        Ok(MessagesRequest {
            model: model.into(),
            system: v.get("system").filter(|s| !s.is_null()).map(|s| wire::text_of(Some(s))),
            messages,
            max_tokens,
            stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
            tools,
        })
    }

    /// All input "tokens" before the cache split: `7 + Σ(3 + words(text))` over `system` (when
    /// given) and every message, `+ 15 × tools`. This is what count_tokens answers.
    pub fn input_total(&self) -> u64 {
        7 + self.system.iter().map(|s| 3 + wire::count_words(s)).sum::<u64>()
            + self.messages.iter().map(|m| 3 + wire::count_words(&m.text)).sum::<u64>()
            + 15 * self.tools.len() as u64
    }
}

/// A `tool_use` block the mock answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolUse {
    /// `toolu_...`.
    pub id: String,
    /// Name of the first offered tool.
    pub name: String,
    /// The `input` object (from the tool's `input_schema`, see [`wire::args_for_schema`]).
    pub input: Value,
    /// `input` as compact JSON, split into `input_json_delta` fragments (after an empty one, as
    /// the real API sends).
    pub fragments: Vec<String>,
}

/// What the mock answers to a [`MessagesRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `msg_...`.
    pub id: String,
    /// Echo of the model.
    pub model: String,
    /// Text of the single `text` block (empty for a tool call).
    pub text: String,
    /// `text` as streamed, one `text_delta` per word.
    pub words: Vec<String>,
    /// Set when the mock answers with a `tool_use` block.
    pub tool_use: Option<ToolUse>,
    /// `end_turn`, `max_tokens` or `tool_use`.
    pub stop_reason: &'static str,
    /// `usage.input_tokens` (uncached part).
    pub input_tokens: u64,
    /// `usage.cache_read_input_tokens`.
    pub cache_read_input_tokens: u64,
    /// `usage.cache_creation_input_tokens`.
    pub cache_creation_input_tokens: u64,
    /// `usage.output_tokens` (final; `message_start` reports 1).
    pub output_tokens: u64,
}

/// Deterministic reply.
///
/// * `h` = FNV-1a salted `"anthropic"`, then the model, `\0 system \0 text` when given, per message
///   `\0 role \0 text`, per tool `\0 tool \0 name`.
/// * `base` = [`MessagesRequest::input_total`]; `cache_read_input_tokens = base / 4`,
///   `cache_creation_input_tokens = base / 8`, `input_tokens = base - read - creation`.
/// * Visible output `v`: `tool_use` (tools offered and the last message has no `tool_result`) →
///   `10 + len(input json) / 4`, `stop_reason: tool_use`; after a `tool_result` → words of the
///   echo text of the results; otherwise `min(max_tokens, 8 + h % 9)` words, `stop_reason`
///   `max_tokens` when `max_tokens` cut it short, else `end_turn`.
/// * `output_tokens = v + 1`.
pub fn reply_for(req: &MessagesRequest) -> Reply {
    let mut hs = Hasher::salted("anthropic");
    hs.bytes(req.model.as_bytes());
    if let Some(s) = &req.system {
        hs.message("system", s);
    }
    for m in &req.messages {
        hs.message(&m.role, &m.text);
    }
    for t in &req.tools {
        hs.message("tool", &t.name);
    }
    let h = hs.finish();
    let last = req.messages.last();
    let result = last.and_then(|m| m.tool_result.as_deref());
    let (words, tool_use, stop_reason) = match (req.tools.first(), result) {
        (Some(t), None) if last.is_some_and(|m| m.role == "user") => {
            let input = wire::args_for_schema(t.parameters.as_ref(), h);
            let mut fragments = vec![String::new()];
            fragments.extend(wire::fragments(&input.to_string(), 8));
            let tu = ToolUse { id: format!("toolu_mock{h:016x}"), name: t.name.clone(), input, fragments };
            (Vec::new(), Some(tu), "tool_use")
        }
        (_, Some(r)) => (tool_echo_words(r), None, "end_turn"),
        _ => {
            let natural = wire::natural_len(h);
            let n = natural.min(u64::from(req.max_tokens.max(1)));
            (wire::words(h, n), None, if n < natural { "max_tokens" } else { "end_turn" })
        }
    };
    let visible = match &tool_use {
        Some(t) => wire::tool_call_tokens(&t.input.to_string()),
        None => words.len() as u64,
    };
    let base = req.input_total();
    let (read, creation) = (base / 4, base / 8);
    Reply {
        id: format!("msg_mock{h:016x}"),
        model: req.model.clone(),
        text: words.concat(),
        words,
        tool_use,
        stop_reason,
        input_tokens: base - read - creation,
        cache_read_input_tokens: read,
        cache_creation_input_tokens: creation,
        output_tokens: visible + 1,
    }
}

fn usage_json(r: &Reply, output_tokens: u64) -> Value {
    json!({
        "input_tokens": r.input_tokens,
        "cache_creation_input_tokens": r.cache_creation_input_tokens,
        "cache_read_input_tokens": r.cache_read_input_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": r.cache_creation_input_tokens, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard"
    })
}

/// The `message` object: complete (non-streaming body), or as `message_start` carries it (no
/// content, `stop_reason: null`, `output_tokens: 1`).
pub fn message_json(r: &Reply, done: bool) -> Value {
    let content = match (&r.tool_use, done) {
        (_, false) => json!([]),
        (Some(t), true) => json!([{"type": "tool_use", "id": t.id, "name": t.name, "input": t.input}]),
        (None, true) => json!([{"type": "text", "text": r.text}]),
    };
    json!({
        "id": r.id,
        "type": "message",
        "role": "assistant",
        "model": r.model,
        "content": content,
        "stop_reason": if done { json!(r.stop_reason) } else { Value::Null },
        "stop_sequence": null,
        "usage": usage_json(r, if done { r.output_tokens } else { 1 })
    })
}

/// Body of the non-streaming response.
pub fn message_body(r: &Reply) -> Vec<u8> {
    serde_json::to_vec(&message_json(r, true)).expect("json")
}

/// One server-sent event exactly as Anthropic frames it.
fn event(ty: &str, data: &Value) -> String {
    format!("event: {ty}\ndata: {}\n\n", serde_json::to_string(data).expect("json"))
}

/// The streamed events: `message_start`, `content_block_start`, `ping`, one `content_block_delta`
/// per word (`text_delta`) or per argument fragment (`input_json_delta`, the first empty),
/// `content_block_stop`, `message_delta` (stop reason, `usage.output_tokens` only),
/// `message_stop`.
pub fn stream_events(r: &Reply) -> Vec<String> {
    let mut out = vec![event("message_start", &json!({"type": "message_start", "message": message_json(r, false)}))];
    let block = match &r.tool_use {
        Some(t) => json!({"type": "tool_use", "id": t.id, "name": t.name, "input": {}}),
        None => json!({"type": "text", "text": ""}),
    };
    out.push(event("content_block_start", &json!({"type": "content_block_start", "index": 0, "content_block": block})));
    out.push(event("ping", &json!({"type": "ping"})));
    let deltas: Vec<Value> = match &r.tool_use {
        Some(t) => t.fragments.iter().map(|f| json!({"type": "input_json_delta", "partial_json": f})).collect(),
        None => r.words.iter().map(|w| json!({"type": "text_delta", "text": w})).collect(),
    };
    for d in deltas {
        out.push(event("content_block_delta", &json!({"type": "content_block_delta", "index": 0, "delta": d})));
    }
    out.push(event("content_block_stop", &json!({"type": "content_block_stop", "index": 0})));
    out.push(event(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": r.stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": r.output_tokens}
        }),
    ));
    out.push(event("message_stop", &json!({"type": "message_stop"})));
    out
}

/// Body of a count_tokens response.
pub fn count_tokens_body(req: &MessagesRequest) -> Vec<u8> {
    serde_json::to_vec(&json!({"input_tokens": req.input_total()})).expect("json")
}

/// The Anthropic error `type` for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An Anthropic error body: `{"type":"error","error":{"type":..,"message":..}}`.
pub fn error_body(kind: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"type": "error", "error": {"type": kind, "message": message}})).expect("json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_reply_usage_and_stream_order() {
        let q = MessagesRequest::simple("claude", "hello there", 1024);
        let r = reply_for(&q);
        let base = 7 + 3 + 2;
        assert_eq!(q.input_total(), base);
        assert_eq!(r.input_tokens + r.cache_read_input_tokens + r.cache_creation_input_tokens, base);
        assert_eq!(r.output_tokens, r.words.len() as u64 + 1);
        assert_eq!(r.stop_reason, "end_turn");
        let ev = stream_events(&r);
        let kinds: Vec<&str> = ev.iter().map(|e| e.lines().next().unwrap().strip_prefix("event: ").unwrap()).collect();
        assert_eq!(&kinds[..3], &["message_start", "content_block_start", "ping"]);
        assert_eq!(&kinds[kinds.len() - 3..], &["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(ev.len(), r.words.len() + 6);
        let short = reply_for(&MessagesRequest::simple("claude", "hello there", 2));
        assert_eq!((short.words.len(), short.stop_reason), (2, "max_tokens"));
    }

    #[test]
    fn tool_use_then_result_echo() {
        let t = Tool::get_weather();
        let v = json!({"model": "c", "max_tokens": 100, "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"name": t.name, "input_schema": t.parameters}]});
        let q = MessagesRequest::from_json(&v, false).unwrap();
        let r = reply_for(&q);
        let tu = r.tool_use.clone().expect("tool_use");
        assert_eq!(r.stop_reason, "tool_use");
        assert_eq!(tu.fragments[0], "");
        assert_eq!(tu.fragments.concat(), tu.input.to_string());
        let mut v2 = v.clone();
        v2["messages"].as_array_mut().unwrap().extend([
            json!({"role": "assistant", "content": [
                {"type": "tool_use", "id": tu.id, "name": tu.name, "input": tu.input}
            ]}),
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tu.id, "content": "sunny"}]}),
        ]);
        let r2 = reply_for(&MessagesRequest::from_json(&v2, false).unwrap());
        assert_eq!((r2.text.as_str(), r2.stop_reason), ("The tool returned: sunny", "end_turn"));
        assert!(MessagesRequest::from_json(&json!({"model": "c", "messages": []}), false).is_err());
        assert!(MessagesRequest::from_json(&json!({"model": "c", "messages": []}), true).is_ok());
    }
}
