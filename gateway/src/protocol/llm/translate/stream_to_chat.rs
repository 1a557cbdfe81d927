//! Anthropic stream events → OpenAI `chat.completion.chunk`s, one event at a time.
//!
//! `message_start` gives the id, model and input usage and opens the answer with a
//! `role: assistant` chunk; text deltas become `content` deltas; a `tool_use` block start
//! becomes a `tool_calls` entry (`index`, `id`, `type`, `function.name`, empty `arguments`) and
//! its `input_json_delta`s argument fragments for that index; `message_delta` carries the
//! finish reason and cumulative usage; `message_stop` ends the stream with the usage chunk (when
//! asked for) and `[DONE]`. `ping`, thinking and citation deltas are dropped; an `error` event
//! becomes an OpenAI error chunk.

use serde_json::{json, Value};

use super::common::{chat_id, finish_reason_from_stop_reason, now_secs, push_done, push_openai, text, Obj, Tokens};
use super::error_body::openai_error_object;
use super::StreamTranslator;

/// Where the translated stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// An error chunk was sent; only `[DONE]` may follow.
    Errored,
    /// `[DONE]` was sent.
    Done,
}

/// Translates an Anthropic messages stream into OpenAI chat-completion chunks, for an agent
/// speaking OpenAI served by an Anthropic target.
#[derive(Debug)]
pub struct MessagesToChatStream {
    client_model: Option<String>,
    include_usage: bool,
    id: String,
    model: String,
    created: u64,
    /// (Anthropic content-block index, OpenAI tool-call index) of every tool_use block seen.
    tools: Vec<(u64, u64)>,
    usage: Tokens,
    finish_sent: bool,
    state: State,
}

impl MessagesToChatStream {
    /// `client_model`: the model name the agent asked for, echoed in every chunk (`None` keeps
    /// the upstream's). `include_usage`: the agent asked for `stream_options.include_usage`, so
    /// a usage chunk is sent before `[DONE]` and other chunks carry `usage: null`.
    pub fn new(client_model: Option<String>, include_usage: bool) -> Self {
        MessagesToChatStream {
            model: client_model.clone().unwrap_or_default(),
            client_model,
            include_usage,
            id: chat_id(None),
            created: now_secs(),
            tools: Vec::new(),
            usage: Tokens::default(),
            finish_sent: false,
            state: State::Open,
        }
    }

    /// One chunk with a single choice.
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn push_delta(&self, out: &mut Vec<u8>, delta: Value) {
        push_openai(out, &self.chunk(delta, None));
    }

    fn message_start(&mut self, ev: &Obj, out: &mut Vec<u8>) {
        let message = ev.get("message").and_then(Value::as_object);
        if let Some(m) = message {
            self.id = chat_id(text(m, "id"));
            if self.client_model.is_none() {
                self.model = text(m, "model").unwrap_or("").to_string();
            }
            self.usage = Tokens::from_anthropic(m.get("usage").and_then(Value::as_object));
        }
        self.push_delta(out, json!({ "role": "assistant", "content": "" }));
    }

    fn block_start(&mut self, ev: &Obj, out: &mut Vec<u8>) {
        let Some(block) = ev.get("content_block").and_then(Value::as_object) else { return };
        match text(block, "type") {
            Some("text") => {
                if let Some(t) = text(block, "text").filter(|t| !t.is_empty()) {
                    self.push_delta(out, json!({ "content": t }));
                }
            }
            Some("tool_use") => {
                let block_index = ev.get("index").and_then(Value::as_u64).unwrap_or(0);
                let tool_index = self.tools.len() as u64;
                self.tools.push((block_index, tool_index));
                let call = json!({
                    "index": tool_index,
                    "id": text(block, "id").unwrap_or(""),
                    "type": "function",
                    "function": { "name": text(block, "name").unwrap_or(""), "arguments": "" },
                });
                self.push_delta(out, json!({ "tool_calls": [call] }));
            }
            // thinking, redacted_thinking, server tools: no chat-completions counterpart.
            _ => {}
        }
    }

    fn block_delta(&mut self, ev: &Obj, out: &mut Vec<u8>) {
        let Some(delta) = ev.get("delta").and_then(Value::as_object) else { return };
        match text(delta, "type") {
            Some("text_delta") => {
                if let Some(t) = text(delta, "text").filter(|t| !t.is_empty()) {
                    self.push_delta(out, json!({ "content": t }));
                }
            }
            Some("input_json_delta") => {
                let block_index = ev.get("index").and_then(Value::as_u64).unwrap_or(0);
                let Some(&(_, tool_index)) = self.tools.iter().find(|(b, _)| *b == block_index) else { return };
                if let Some(json) = text(delta, "partial_json").filter(|j| !j.is_empty()) {
                    let call = json!({ "index": tool_index, "function": { "arguments": json } });
                    self.push_delta(out, json!({ "tool_calls": [call] }));
                }
            }
            _ => {}
        }
    }

    fn message_delta(&mut self, ev: &Obj, out: &mut Vec<u8>) {
        if let Some(u) = ev.get("usage").and_then(Value::as_object) {
            self.usage.update_from_anthropic(u);
        }
        let stop_reason = ev.get("delta").and_then(Value::as_object).and_then(|d| text(d, "stop_reason"));
        if stop_reason.is_some() && !self.finish_sent {
            self.push_finish(finish_reason_from_stop_reason(stop_reason), out);
        }
    }

    fn push_finish(&mut self, reason: &str, out: &mut Vec<u8>) {
        push_openai(out, &self.chunk(json!({}), Some(reason)));
        self.finish_sent = true;
    }

    /// Finish chunk (if still owed), usage chunk (if asked for), `[DONE]`.
    fn end(&mut self, out: &mut Vec<u8>) {
        if !self.finish_sent {
            let reason = if self.tools.is_empty() { "stop" } else { "tool_calls" };
            self.push_finish(reason, out);
        }
        if self.include_usage {
            let usage = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage.to_openai(),
            });
            push_openai(out, &usage);
        }
        push_done(out);
        self.state = State::Done;
    }

    fn error(&mut self, error: Option<&Obj>, out: &mut Vec<u8>) {
        let object = match error {
            Some(e) => openai_error_object(e, None),
            None => json!({ "message": "upstream stream error", "type": "server_error", "param": null, "code": null }),
        };
        push_openai(out, &json!({ "error": object }));
        self.state = State::Errored;
    }
}

impl StreamTranslator for MessagesToChatStream {
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.state != State::Open {
            return;
        }
        let Ok(Value::Object(ev)) = serde_json::from_slice::<Value>(data) else {
            tracing::debug!("skipping a stream event that is not a JSON object");
            return;
        };
        match text(&ev, "type") {
            Some("message_start") => self.message_start(&ev, out),
            Some("content_block_start") => self.block_start(&ev, out),
            Some("content_block_delta") => self.block_delta(&ev, out),
            Some("message_delta") => self.message_delta(&ev, out),
            Some("message_stop") => self.end(out),
            Some("error") => self.error(ev.get("error").and_then(Value::as_object), out),
            // ping, content_block_stop, and event types added later.
            _ => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        match self.state {
            State::Done => {}
            State::Errored => {
                push_done(out);
                self.state = State::Done;
            }
            State::Open if self.finish_sent => self.end(out),
            State::Open => {
                let e = json!({
                    "message": "upstream stream ended before the response was complete",
                    "type": "server_error",
                    "param": null,
                    "code": null,
                });
                push_openai(out, &json!({ "error": e }));
                push_done(out);
                self.state = State::Done;
            }
        }
    }
}
