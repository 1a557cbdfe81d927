//! OpenAI `chat.completion.chunk`s → Anthropic stream events, one chunk at a time.
//!
//! The first chunk opens the message (`message_start`, usage still unknown so zero); `content`
//! (and `refusal`) deltas go to a text block; `tool_calls` deltas go to one `tool_use` block per
//! tool-call index, opened by the fragment that carries the call's id and name; a block is
//! closed as soon as the kind (or the tool call) changes, as Anthropic blocks never interleave.
//! The finish reason is held until the usage-only chunk (the upstream was asked for
//! `include_usage`) or `[DONE]`, then `message_delta` (stop reason, usage) and `message_stop`
//! are sent. An error chunk becomes an `error` event.

use serde_json::{json, Value};

use super::common::{message_id, push_anthropic, stop_reason_from_finish_reason, text, Obj, Tokens};
use super::error_body::anthropic_error_object;
use super::StreamTranslator;

/// The content block currently open on the Anthropic side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    None,
    Text { index: u64 },
    Tool { index: u64, call: u64 },
}

/// Where the translated stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing sent yet.
    Idle,
    /// `message_start` sent.
    Started,
    /// `message_stop` sent (possibly after an `error` event).
    Done,
    /// An `error` event was sent; `message_stop` still owed.
    Errored,
}

/// Translates an OpenAI chat-completions stream (requested with `include_usage`) into
/// Anthropic message events, for an agent speaking Anthropic served by an OpenAI target.
#[derive(Debug)]
pub struct ChatToMessagesStream {
    client_model: Option<String>,
    state: State,
    block: Block,
    next_block: u64,
    /// OpenAI tool-call indices whose block was already closed (late fragments are dropped).
    closed_calls: Vec<u64>,
    saw_tool: bool,
    stop_reason: Option<&'static str>,
    usage: Option<Tokens>,
}

impl ChatToMessagesStream {
    /// `client_model`: the model name the agent asked for, echoed in `message_start` (`None`
    /// keeps the upstream's).
    pub fn new(client_model: Option<String>) -> Self {
        ChatToMessagesStream {
            client_model,
            state: State::Idle,
            block: Block::None,
            next_block: 0,
            closed_calls: Vec::new(),
            saw_tool: false,
            stop_reason: None,
            usage: None,
        }
    }

    fn start(&mut self, chunk: Option<&Obj>, out: &mut Vec<u8>) {
        if self.state != State::Idle {
            return;
        }
        let model = self.client_model.as_deref().or_else(|| chunk.and_then(|c| text(c, "model"))).unwrap_or("");
        let usage = self.usage.unwrap_or_default();
        let ev = json!({
            "type": "message_start",
            "message": {
                "id": message_id(chunk.and_then(|c| text(c, "id"))),
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": model,
                "stop_reason": null,
                "stop_sequence": null,
                "usage": { "input_tokens": usage.input, "output_tokens": usage.output },
            },
        });
        push_anthropic(out, &ev);
        self.state = State::Started;
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        let index = match self.block {
            Block::None => return,
            Block::Text { index } => index,
            Block::Tool { index, call } => {
                self.closed_calls.push(call);
                index
            }
        };
        push_anthropic(out, &json!({ "type": "content_block_stop", "index": index }));
        self.block = Block::None;
    }

    fn open_block(&mut self, block: Value, out: &mut Vec<u8>) -> u64 {
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        push_anthropic(out, &json!({ "type": "content_block_start", "index": index, "content_block": block }));
        index
    }

    fn text(&mut self, t: &str, out: &mut Vec<u8>) {
        let index = match self.block {
            Block::Text { index } => index,
            _ => {
                let index = self.open_block(json!({ "type": "text", "text": "" }), out);
                self.block = Block::Text { index };
                index
            }
        };
        let ev = json!({ "type": "content_block_delta", "index": index, "delta": { "type": "text_delta", "text": t } });
        push_anthropic(out, &ev);
    }

    fn tool_call(&mut self, position: usize, call: &Obj, out: &mut Vec<u8>) {
        let call_index = call.get("index").and_then(Value::as_u64).unwrap_or(position as u64);
        let function = call.get("function").and_then(Value::as_object);
        let index = match self.block {
            Block::Tool { index, call } if call == call_index => index,
            _ => {
                if self.closed_calls.contains(&call_index) {
                    tracing::debug!(index = call_index, "dropping a fragment of an already closed tool call");
                    return;
                }
                let id = match text(call, "id") {
                    Some(id) => id.to_string(),
                    None => format!("toolu_{call_index}"),
                };
                let name = function.and_then(|f| text(f, "name")).unwrap_or("");
                let block = json!({ "type": "tool_use", "id": id, "name": name, "input": {} });
                let index = self.open_block(block, out);
                self.block = Block::Tool { index, call: call_index };
                self.saw_tool = true;
                index
            }
        };
        if let Some(args) = function.and_then(|f| text(f, "arguments")).filter(|a| !a.is_empty()) {
            let delta = json!({ "type": "input_json_delta", "partial_json": args });
            push_anthropic(out, &json!({ "type": "content_block_delta", "index": index, "delta": delta }));
        }
    }

    fn choice(&mut self, choice: &Obj, out: &mut Vec<u8>) {
        if let Some(delta) = choice.get("delta").and_then(Value::as_object) {
            for key in ["content", "refusal"] {
                if let Some(t) = text(delta, key).filter(|t| !t.is_empty()) {
                    self.text(t, out);
                }
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for (k, call) in calls.iter().enumerate() {
                    if let Some(call) = call.as_object() {
                        self.tool_call(k, call, out);
                    }
                }
            }
        }
        if let Some(reason) = text(choice, "finish_reason") {
            self.close_block(out);
            self.stop_reason = Some(stop_reason_from_finish_reason(Some(reason)));
        }
    }

    /// Close the open block and send `message_delta` + `message_stop`.
    fn end(&mut self, out: &mut Vec<u8>) {
        self.start(None, out);
        self.close_block(out);
        let fallback = if self.saw_tool { "tool_use" } else { "end_turn" };
        let ev = json!({
            "type": "message_delta",
            "delta": { "stop_reason": self.stop_reason.unwrap_or(fallback), "stop_sequence": null },
            "usage": self.usage.unwrap_or_default().to_anthropic(),
        });
        push_anthropic(out, &ev);
        push_anthropic(out, &json!({ "type": "message_stop" }));
        self.state = State::Done;
    }

    fn error(&mut self, error: Value, out: &mut Vec<u8>) {
        self.close_block(out);
        push_anthropic(out, &json!({ "type": "error", "error": error }));
        self.state = State::Errored;
    }
}

impl StreamTranslator for ChatToMessagesStream {
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if matches!(self.state, State::Done | State::Errored) {
            return;
        }
        if super::common::is_done(data) {
            self.end(out);
            return;
        }
        let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(data) else {
            tracing::debug!("skipping a stream chunk that is not a JSON object");
            return;
        };
        if let Some(e) = chunk.get("error").filter(|e| !e.is_null()) {
            let object = match e {
                Value::Object(o) => anthropic_error_object(o, None),
                Value::String(s) => json!({ "type": "api_error", "message": s }),
                _ => json!({ "type": "api_error", "message": "upstream stream error" }),
            };
            self.error(object, out);
            return;
        }
        if let Some(u) = chunk.get("usage").and_then(Value::as_object) {
            self.usage = Some(Tokens::from_openai(Some(u)));
        }
        self.start(Some(&chunk), out);
        let choices = chunk.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        let first = choices
            .iter()
            .filter_map(Value::as_object)
            .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0);
        if let Some(choice) = first {
            self.choice(choice, out);
        }
        if self.stop_reason.is_some() && self.usage.is_some() {
            self.end(out);
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        match self.state {
            State::Done => {}
            State::Errored => {
                push_anthropic(out, &json!({ "type": "message_stop" }));
                self.state = State::Done;
            }
            State::Idle | State::Started if self.stop_reason.is_some() => self.end(out),
            State::Idle | State::Started => {
                let e = json!({
                    "type": "api_error",
                    "message": "upstream stream ended before the response was complete",
                });
                self.error(e, out);
                push_anthropic(out, &json!({ "type": "message_stop" }));
                self.state = State::Done;
            }
        }
    }
}
