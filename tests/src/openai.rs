//! The OpenAI chat-completions wire format as the mock upstream speaks it (also served on Azure's
//! `/openai/deployments/{dep}/chat/completions`), with function tools; the Responses API,
//! embeddings and legacy completions live in the submodules.
//!
//! Everything the mock sends is a pure function of the request's *meaning* (model, messages,
//! `max_tokens`, tools, stream flags), never of its bytes or of the clock, so a test that knows what it
//! asked can compute byte-for-byte what the mock answered and compare it with what its client
//! received through tollgate. SDK clients serialise requests their own way; that does not matter.

use serde_json::{json, Value};

use crate::wire::{self, Hasher};

pub mod embeddings;
pub mod responses;

/// A function tool offered in a request (`tools[].function` in Chat Completions, a
/// `type: "function"` tool in Responses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// `name`.
    pub name: String,
    /// `parameters` (JSON schema), from which the mock derives the call's arguments.
    pub parameters: Option<Value>,
}

impl Tool {
    /// The `get_weather(city, unit)` tool the SDK clients offer.
    pub fn get_weather() -> Self {
        Tool {
            name: "get_weather".into(),
            parameters: Some(json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
                },
                "required": ["city", "unit"],
                "additionalProperties": false
            })),
        }
    }
}

/// A function call the mock makes instead of answering with text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_...`.
    pub id: String,
    /// Name of the first offered tool.
    pub name: String,
    /// Compact JSON arguments derived from the tool's schema ([`wire::args_for_schema`]).
    pub arguments: String,
    /// `arguments` as streamed: pieces of at most 8 characters.
    pub fragments: Vec<String>,
}

impl ToolCall {
    /// The call for `tool` in a request hashed to `h`.
    pub fn new(prefix: &str, tool: &Tool, h: u64) -> Self {
        let arguments = wire::args_for_schema(tool.parameters.as_ref(), h).to_string();
        ToolCall {
            id: format!("{prefix}{h:016x}"),
            name: tool.name.clone(),
            fragments: wire::fragments(&arguments, 8),
            arguments,
        }
    }
}

/// The text the mock answers after a tool result: `"The tool returned: " + result`, with
/// whitespace runs collapsed to one space.
pub fn tool_echo_words(result: &str) -> Vec<String> {
    wire::split_words(&format!("The tool returned: {result}"))
}

/// The parts of a `POST /v1/chat/completions` body that decide the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// `model`.
    pub model: String,
    /// `(role, text)` per message; array content parts are joined.
    pub messages: Vec<(String, String)>,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `max_completion_tokens` or `max_tokens`: number of words the mock produces.
    pub max_tokens: Option<u32>,
    /// Function tools offered (`tools`); empty when none.
    pub tools: Vec<Tool>,
}

impl ChatRequest {
    /// A non-streaming request with one user message.
    pub fn simple(model: &str, user: &str) -> Self {
        ChatRequest {
            model: model.into(),
            messages: vec![("user".into(), user.into())],
            stream: false,
            include_usage: false,
            max_tokens: None,
            tools: Vec::new(),
        }
    }

    /// A non-streaming request with one user message offering [`Tool::get_weather`].
    pub fn with_weather_tool(model: &str, user: &str) -> Self {
        ChatRequest { tools: vec![Tool::get_weather()], ..ChatRequest::simple(model, user) }
    }

    /// Parse a request body; `Err` is the message of a 400 response.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let model = v.get("model").and_then(Value::as_str).ok_or("missing required parameter: 'model'")?;
        let msgs = v.get("messages").and_then(Value::as_array).ok_or("missing required parameter: 'messages'")?;
        if msgs.is_empty() {
            return Err("'messages' must contain at least one message".into());
        }
        let mut messages = Vec::new();
        for m in msgs {
            let role = m.get("role").and_then(Value::as_str).ok_or("message without 'role'")?;
            let text = match m.get("content") {
                Some(c @ (Value::String(_) | Value::Array(_))) => wire::text_of(Some(c)),
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err("invalid message 'content'".into()),
            };
            messages.push((role.to_string(), text));
        }
        let mut tools = Vec::new();
        for t in v.get("tools").and_then(Value::as_array).into_iter().flatten() {
            if let Some(f) = t.get("function").filter(|_| t.get("type").and_then(Value::as_str) == Some("function")) {
                let name = f.get("name").and_then(Value::as_str).ok_or("tool function without 'name'")?;
                tools.push(Tool { name: name.into(), parameters: f.get("parameters").cloned() });
            }
        }
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage =
            v.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
        let max_tokens = v
            .get("max_completion_tokens")
            .or_else(|| v.get("max_tokens"))
            .and_then(Value::as_u64)
            .map(|n| n.clamp(1, 8192) as u32);
        Ok(ChatRequest { model: model.into(), messages, stream, include_usage, max_tokens, tools })
    }

    /// The request body a client would send for this request.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "model": self.model,
            "messages": self.messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>(),
        });
        if self.stream {
            v["stream"] = json!(true);
            if self.include_usage {
                v["stream_options"] = json!({"include_usage": true});
            }
        }
        if let Some(n) = self.max_tokens {
            v["max_tokens"] = json!(n);
        }
        if !self.tools.is_empty() {
            v["tools"] = self
                .tools
                .iter()
                .map(|t| {
                    let mut f = json!({"name": t.name});
                    if let Some(p) = &t.parameters {
                        f["parameters"] = p.clone();
                    }
                    json!({"type": "function", "function": f})
                })
                .collect();
        }
        v
    }
}

/// What the mock answers to a [`ChatRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `chatcmpl-...`.
    pub id: String,
    /// Unix seconds (derived from the request, not the clock).
    pub created: u64,
    /// Echo of the requested model.
    pub model: String,
    /// Assistant message text.
    pub content: String,
    /// The words of `content`, each one streamed as one chunk.
    pub words: Vec<String>,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// `usage.completion_tokens_details.reasoning_tokens`.
    pub reasoning_tokens: u64,
    /// Set when the mock calls a tool instead of answering (`content` is then empty).
    pub tool_call: Option<ToolCall>,
}

impl Reply {
    /// `usage.total_tokens`.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// `choices[0].finish_reason`.
    pub fn finish_reason(&self) -> &'static str {
        if self.tool_call.is_some() {
            "tool_calls"
        } else {
            "stop"
        }
    }
}

/// Deterministic reply for a request.
///
/// * `h` = FNV-1a of the model, then per message `\0 role \0 text`, then (only when tools are
///   offered) per tool `\0 "tool" \0 name`.
/// * `prompt_tokens = 3 + Σ(4 + words(text)) + 10 × tools`, `cached_tokens = prompt / 3`.
/// * Tool call (tools offered and the last message is `user`): call the first tool with
///   [`wire::args_for_schema`] arguments; `completion_tokens = 10 + len(arguments) / 4`.
/// * Tool echo (last message is `tool`): text [`tool_echo_words`]; `completion_tokens` = its words.
/// * Otherwise: `max_tokens` (else `8 + h % 9`) words; `completion_tokens` = that count.
/// * `reasoning_tokens = completion / 4`, `total = prompt + completion`.
pub fn reply_for(req: &ChatRequest) -> Reply {
    let mut hasher = Hasher::default();
    hasher.bytes(req.model.as_bytes());
    for (role, text) in &req.messages {
        hasher.message(role, text);
    }
    for t in &req.tools {
        hasher.message("tool", &t.name);
    }
    let h = hasher.finish();
    let last_role = req.messages.last().map(|(r, _)| r.as_str());
    let (words, tool_call) = match (req.tools.first(), last_role) {
        (Some(t), Some("user")) => (Vec::new(), Some(ToolCall::new("call_", t, h))),
        (_, Some("tool")) => (tool_echo_words(&req.messages.last().expect("last").1), None),
        _ => (wire::words(h, req.max_tokens.map(u64::from).unwrap_or(wire::natural_len(h))), None),
    };
    let n = match &tool_call {
        Some(c) => wire::tool_call_tokens(&c.arguments),
        None => words.len() as u64,
    };
    let content: String = words.concat();
    let prompt_tokens: u64 =
        3 + req.messages.iter().map(|(_, t)| 4 + wire::count_words(t)).sum::<u64>() + 10 * req.tools.len() as u64;
    Reply {
        id: format!("chatcmpl-mock{h:016x}"),
        created: 1_700_000_000 + h % 10_000_000,
        model: req.model.clone(),
        content,
        words,
        prompt_tokens,
        completion_tokens: n,
        cached_tokens: prompt_tokens / 3,
        reasoning_tokens: n / 4,
        tool_call,
    }
}

/// `usage` object of a chat completion (also the usage chunk of a stream).
pub fn usage_json(r: &Reply) -> Value {
    json!({
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.total_tokens(),
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": r.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

fn message_json(r: &Reply) -> Value {
    match &r.tool_call {
        None => json!({"role": "assistant", "content": r.content, "refusal": null, "annotations": []}),
        Some(c) => json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}],
            "refusal": null,
            "annotations": []
        }),
    }
}

/// Body of the non-streaming `chat.completion` response.
pub fn completion_body(r: &Reply) -> Vec<u8> {
    let v = json!({
        "id": r.id,
        "object": "chat.completion",
        "created": r.created,
        "model": r.model,
        "choices": [{
            "index": 0,
            "message": message_json(r),
            "logprobs": null,
            "finish_reason": r.finish_reason()
        }],
        "usage": usage_json(r),
        "service_tier": "default",
        "system_fingerprint": "fp_mock0001"
    });
    let mut b = serde_json::to_vec(&v).expect("json");
    b.push(b'\n');
    b
}

fn chunk(r: &Reply, delta: Value, finish: Option<&str>, include_usage: bool) -> Value {
    let mut v = json!({
        "id": r.id,
        "object": "chat.completion.chunk",
        "created": r.created,
        "model": r.model,
        "service_tier": "default",
        "system_fingerprint": "fp_mock0001",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
    });
    if include_usage {
        v["usage"] = Value::Null;
    }
    v
}

/// The server-sent events of a streaming response, each a complete `data: ...\n\n` event, in
/// order: role chunk, one chunk per word, finish chunk, usage chunk (`choices: []`, only when
/// `include_usage`), `[DONE]`. For a tool call the role chunk also opens the call (id, name,
/// empty arguments) and one chunk per argument fragment replaces the words.
pub fn stream_events(r: &Reply, include_usage: bool) -> Vec<String> {
    let mut out = Vec::with_capacity(r.words.len() + 4);
    let ev = |v: &Value| format!("data: {}\n\n", serde_json::to_string(v).expect("json"));
    match &r.tool_call {
        None => {
            out.push(ev(&chunk(r, json!({"role": "assistant", "content": "", "refusal": null}), None, include_usage)));
            for w in &r.words {
                out.push(ev(&chunk(r, json!({"content": w}), None, include_usage)));
            }
        }
        Some(c) => {
            let open = json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "index": 0,
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": ""}
                }],
                "refusal": null
            });
            out.push(ev(&chunk(r, open, None, include_usage)));
            for f in &c.fragments {
                let d = json!({"tool_calls": [{"index": 0, "function": {"arguments": f}}]});
                out.push(ev(&chunk(r, d, None, include_usage)));
            }
        }
    }
    out.push(ev(&chunk(r, json!({}), Some(r.finish_reason()), include_usage)));
    if include_usage {
        let mut u = chunk(r, json!({}), None, false);
        u["choices"] = json!([]);
        u["usage"] = usage_json(r);
        out.push(ev(&u));
    }
    out.push("data: [DONE]\n\n".to_string());
    out
}

/// The whole streaming body.
pub fn stream_body(r: &Reply, include_usage: bool) -> Vec<u8> {
    stream_events(r, include_usage).concat().into_bytes()
}

/// An OpenAI-style error body.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))
        .expect("json")
}

/// Body of `GET /` on the mock (used as an ordinary HTTPS origin in splice tests).
pub const ORIGIN_BODY: &str = "hello from the mock origin\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_request_dependent() {
        let a = ChatRequest::simple("gpt-4o-mini", "hello there");
        let b = ChatRequest::simple("gpt-4o-mini", "hello there!");
        assert_eq!(reply_for(&a), reply_for(&a));
        assert_ne!(reply_for(&a).content, reply_for(&b).content);
        let r = reply_for(&a);
        assert_eq!(r.completion_tokens as usize, r.content.split(' ').count());
        assert_eq!(r.prompt_tokens, 3 + 4 + 2);
    }

    #[test]
    fn roundtrip_and_stream_shape() {
        let mut q = ChatRequest::simple("m", "a b c");
        q.stream = true;
        q.include_usage = true;
        q.max_tokens = Some(5);
        assert_eq!(ChatRequest::from_json(&q.to_json()).unwrap(), q);
        let r = reply_for(&q);
        let ev = stream_events(&r, true);
        assert_eq!(ev.len(), 5 + 4);
        assert_eq!(ev.last().unwrap(), "data: [DONE]\n\n");
        let usage: Value = serde_json::from_str(ev[ev.len() - 2].strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 5);
        let streamed: String = ev[1..6]
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap().trim()).unwrap();
                v["choices"][0]["delta"]["content"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(streamed, r.content);
        assert_eq!(stream_events(&r, false).len(), 5 + 3);
    }

    #[test]
    fn tool_call_then_echo() {
        let mut q = ChatRequest::with_weather_tool("m", "weather in Paris?");
        q.stream = true;
        q.include_usage = true;
        assert_eq!(ChatRequest::from_json(&q.to_json()).unwrap(), q);
        let r = reply_for(&q);
        let c = r.tool_call.clone().expect("tool call");
        assert_eq!(c.name, "get_weather");
        let args: Value = serde_json::from_str(&c.arguments).unwrap();
        assert_eq!(args["unit"], "celsius");
        assert!(c.fragments.len() > 2);
        assert_eq!(r.completion_tokens, wire::tool_call_tokens(&c.arguments));
        assert_eq!(r.prompt_tokens, 3 + 4 + 3 + 10);
        let ev = stream_events(&r, true);
        assert_eq!(ev.len(), c.fragments.len() + 4);
        let body: Value = serde_json::from_slice(&completion_body(&r)).unwrap();
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], json!(c.arguments));

        q.messages.push(("assistant".into(), String::new()));
        q.messages.push(("tool".into(), "{\"temp\": 21}".into()));
        let r2 = reply_for(&q);
        assert!(r2.tool_call.is_none());
        assert_eq!(r2.content, "The tool returned: {\"temp\": 21}");
        assert_eq!(r2.completion_tokens, 5);
        assert_eq!(r2.finish_reason(), "stop");
    }

    #[test]
    fn parses_array_content() {
        let v = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x y"}]}]});
        assert_eq!(ChatRequest::from_json(&v).unwrap().messages[0].1, "x y");
    }
}
