//! The OpenAI chat-completions wire format as the mock upstream speaks it.
//!
//! Everything the mock sends is a pure function of the request's *meaning* (model, messages,
//! `max_tokens`, stream flags), never of its bytes or of the clock, so a test that knows what it
//! asked can compute byte-for-byte what the mock answered and compare it with what its client
//! received through tollgate. SDK clients serialise requests their own way; that does not matter.

use serde_json::{json, Value};

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
        }
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
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
                }
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err("invalid message 'content'".into()),
            };
            messages.push((role.to_string(), text));
        }
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage =
            v.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
        let max_tokens = v
            .get("max_completion_tokens")
            .or_else(|| v.get("max_tokens"))
            .and_then(Value::as_u64)
            .map(|n| n.clamp(1, 8192) as u32);
        Ok(ChatRequest { model: model.into(), messages, stream, include_usage, max_tokens })
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
}

impl Reply {
    /// `usage.total_tokens`.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

const WORDS: [&str; 32] = [
    "gateway", "token", "kernel", "cgroup", "socket", "stream", "agent", "budget", "latency", "proxy", "model",
    "prompt", "answer", "trace", "metric", "splice", "cipher", "route", "packet", "buffer", "replay", "signal",
    "vector", "cache", "quota", "ledger", "beacon", "harbor", "lantern", "meadow", "orbit", "summit",
];

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// Deterministic reply for a request.
pub fn reply_for(req: &ChatRequest) -> Reply {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    fnv1a(&mut h, req.model.as_bytes());
    for (role, text) in &req.messages {
        fnv1a(&mut h, &[0]);
        fnv1a(&mut h, role.as_bytes());
        fnv1a(&mut h, &[0]);
        fnv1a(&mut h, text.as_bytes());
    }
    let n = req.max_tokens.map(u64::from).unwrap_or(8 + h % 9);
    let mut x = h;
    let mut words = Vec::with_capacity(n as usize);
    for i in 0..n {
        // xorshift64: a cheap deterministic word sequence.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        words.push(if i == 0 { w.to_string() } else { format!(" {w}") });
    }
    let content: String = words.concat();
    let prompt_tokens: u64 = 3 + req.messages.iter().map(|(_, t)| 4 + t.split_whitespace().count() as u64).sum::<u64>();
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
    }
}

fn usage_json(r: &Reply) -> Value {
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

/// Body of the non-streaming `chat.completion` response.
pub fn completion_body(r: &Reply) -> Vec<u8> {
    let v = json!({
        "id": r.id,
        "object": "chat.completion",
        "created": r.created,
        "model": r.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": r.content, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop"
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
/// `include_usage`), `[DONE]`.
pub fn stream_events(r: &Reply, include_usage: bool) -> Vec<String> {
    let mut out = Vec::with_capacity(r.words.len() + 4);
    let ev = |v: &Value| format!("data: {}\n\n", serde_json::to_string(v).expect("json"));
    out.push(ev(&chunk(r, json!({"role": "assistant", "content": "", "refusal": null}), None, include_usage)));
    for w in &r.words {
        out.push(ev(&chunk(r, json!({"content": w}), None, include_usage)));
    }
    out.push(ev(&chunk(r, json!({}), Some("stop"), include_usage)));
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
    fn parses_array_content() {
        let v = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x y"}]}]});
        assert_eq!(ChatRequest::from_json(&v).unwrap().messages[0].1, "x y");
    }
}
