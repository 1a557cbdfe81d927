//! Response guardrails on streams: a [`StreamTranslator`] over the agent's events that feeds
//! each text delta through the chunk-safe redactor ([`ResponseStream`]) and puts what is safe
//! to release in its place. Held text is flushed before the event that ends the text (OpenAI
//! `finish_reason` or `[DONE]`, Anthropic `content_block_stop`), or as an extra delta when the
//! stream ends without one. A `block` finding ends the stream with an error event in the
//! agent's API. When the provider speaks another API, its events are translated first
//! (`inner`) and the translator's output is filtered.
//!
//! Covered: OpenAI chat deltas (`choices[0].delta.content`) and Anthropic `text_delta`s;
//! other events (tool arguments, Gemini streams, Responses events) pass unchanged.

use serde_json::{json, Value};

use super::guard::GuardFilter;
use crate::policy::guards::ResponseStream;
use crate::protocol::errors::{error_body, ErrorClass};
use crate::protocol::llm::api::Shape;
use crate::protocol::llm::openai::without_null_usage;
use crate::protocol::llm::sse::{SseEvent, SseParser};
use crate::protocol::llm::translate::StreamTranslator;

/// Biggest translated event re-parsed (the translators emit small events).
const MAX_EVENT: usize = 1 << 20;

/// See the module docs.
pub(super) struct GuardStream {
    filter: GuardFilter,
    inner: Option<Box<dyn StreamTranslator>>,
    drop_usage: bool,
    shape: Shape,
    redactor: Option<ResponseStream>,
    parser: SseParser,
    /// First OpenAI chunk seen: id, model, created for a synthetic flush chunk.
    template: Option<Value>,
    /// Anthropic content block the held text belongs to.
    block_index: u64,
    /// Text was pushed since the last flush.
    holding: bool,
    blocked: bool,
    reported: bool,
}

impl GuardStream {
    pub(super) fn new(filter: GuardFilter, inner: Option<Box<dyn StreamTranslator>>, drop_usage: bool) -> Self {
        let shape = filter.api.shape();
        let redactor = filter.guards.response_stream();
        GuardStream {
            filter,
            inner,
            drop_usage,
            shape,
            redactor,
            parser: SseParser::new(MAX_EVENT),
            template: None,
            block_index: 0,
            holding: false,
            blocked: false,
            reported: false,
        }
    }

    /// Filter the client-shaped events in `bytes` (output of the inner translator).
    fn reparse(&mut self, bytes: &[u8], last: bool, out: &mut Vec<u8>) {
        let mut events: Vec<Vec<u8>> = Vec::new();
        let mut take = |_: usize, ev: SseEvent<'_>| {
            if let SseEvent::Data(d) = ev {
                events.push(d.to_vec());
            }
        };
        self.parser.feed(bytes, &mut take);
        if last {
            self.parser.finish(&mut take);
        }
        for d in events {
            self.client_event(&d, out);
        }
    }

    fn client_event(&mut self, d: &[u8], out: &mut Vec<u8>) {
        if self.blocked {
            return;
        }
        if d.trim_ascii() == b"[DONE]" {
            self.flush(out);
            write_event(out, None, d);
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(d) else {
            write_event(out, None, d);
            return;
        };
        match self.shape {
            Shape::OpenAi => self.openai(d, v, out),
            Shape::Anthropic => self.anthropic(d, v, out),
            Shape::Gemini => write_event(out, None, d),
        }
    }

    /// Push `text`; returns what may be released now (and notes a block).
    fn push(&mut self, text: &str) -> String {
        let Some(r) = self.redactor.as_mut() else { return text.to_string() };
        self.holding = true;
        let s = r.push(text).to_string();
        self.blocked = r.blocked().is_some();
        s
    }

    fn take_rest(&mut self) -> String {
        self.holding = false;
        let Some(r) = self.redactor.as_mut() else { return String::new() };
        let s = r.finish().to_string();
        self.blocked = r.blocked().is_some();
        s
    }

    fn openai(&mut self, d: &[u8], mut v: Value, out: &mut Vec<u8>) {
        let choices_empty = v.get("choices").and_then(Value::as_array).is_some_and(|c| c.is_empty());
        if self.drop_usage && choices_empty && v.get("usage").is_some_and(|u| !u.is_null()) {
            return;
        }
        // The `"usage": null` of every chunk is tollgate's doing too: the agent never sees it.
        let stripped;
        let d = match v.as_object_mut().filter(|_| self.drop_usage).and_then(|o| o.remove_entry("usage")) {
            Some((_, Value::Null)) => {
                stripped = without_null_usage(d).unwrap_or_else(|| serde_json::to_vec(&v).unwrap_or_default());
                &stripped[..]
            }
            Some((k, u)) => {
                if let Some(o) = v.as_object_mut() {
                    o.insert(k, u);
                }
                d
            }
            None => d,
        };
        if self.template.is_none() && v.get("choices").is_some() {
            self.template = Some(v.clone());
        }
        let Some(choice) = v.get_mut("choices").and_then(|c| c.get_mut(0)) else {
            return write_event(out, None, d);
        };
        let text = choice.pointer("/delta/content").and_then(Value::as_str).map(str::to_string);
        let finish = choice.get("finish_reason").is_some_and(|f| !f.is_null());
        if text.is_none() && !(finish && self.holding) {
            return write_event(out, None, d);
        }
        let mut new = text.as_deref().map(|t| self.push(t)).unwrap_or_default();
        if finish && !self.blocked {
            new.push_str(&self.take_rest());
        }
        if text.as_deref() == Some(new.as_str()) && !self.blocked {
            return write_event(out, None, d);
        }
        if let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) {
            delta.insert("content".into(), Value::String(new));
        }
        if self.blocked {
            if let Some(c) = choice.as_object_mut() {
                c.insert("finish_reason".into(), Value::Null);
            }
        }
        write_json(out, None, &v);
        if self.blocked {
            self.end_blocked(out);
        }
    }

    fn anthropic(&mut self, d: &[u8], mut v: Value, out: &mut Vec<u8>) {
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("").to_string();
        match kind.as_str() {
            "content_block_delta" if v.pointer("/delta/type").and_then(Value::as_str) == Some("text_delta") => {
                self.block_index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let text = v.pointer("/delta/text").and_then(Value::as_str).unwrap_or("").to_string();
                let new = self.push(&text);
                if new == text && !self.blocked {
                    return write_event(out, Some(&kind), d);
                }
                if let Some(delta) = v.get_mut("delta").and_then(Value::as_object_mut) {
                    delta.insert("text".into(), Value::String(new));
                }
                write_json(out, Some(&kind), &v);
                if self.blocked {
                    self.end_blocked(out);
                }
            }
            "content_block_stop" | "message_delta" | "message_stop" => {
                self.flush(out);
                if !self.blocked {
                    write_event(out, Some(&kind), d);
                }
            }
            _ => write_event(out, Some(&kind), d),
        }
    }

    /// Release held text as one extra text delta.
    fn flush(&mut self, out: &mut Vec<u8>) {
        if !self.holding || self.blocked {
            return;
        }
        let rest = self.take_rest();
        if !rest.is_empty() {
            match self.shape {
                Shape::OpenAi => {
                    let mut v = self.template.clone().unwrap_or_else(|| json!({"object": "chat.completion.chunk"}));
                    v["choices"] = json!([{ "index": 0, "delta": { "content": rest }, "finish_reason": null }]);
                    if let Some(o) = v.as_object_mut() {
                        o.remove("usage");
                    }
                    write_json(out, None, &v);
                }
                Shape::Anthropic => {
                    let v = json!({ "type": "content_block_delta", "index": self.block_index,
                        "delta": { "type": "text_delta", "text": rest } });
                    write_json(out, Some("content_block_delta"), &v);
                }
                Shape::Gemini => {}
            }
        }
        if self.blocked {
            self.end_blocked(out);
        }
    }

    /// A `block` value was found: an error event, then the end of the stream.
    fn end_blocked(&mut self, out: &mut Vec<u8>) {
        let guard = self.redactor.as_ref().and_then(|r| r.blocked());
        let (name, kind) = guard.as_ref().map_or(("?".into(), "?"), |v| (v.guard.to_string(), v.kind.as_str()));
        let msg = format!("response blocked by guardrail {name:?} ({kind})");
        let st = http::StatusCode::OK;
        let body = error_body(self.shape, st, ErrorClass::Permission, "guardrail_blocked", &msg);
        match self.shape {
            Shape::Anthropic => write_event(out, Some("error"), &body),
            _ => {
                write_event(out, None, &body);
                write_event(out, None, b"[DONE]");
            }
        }
        self.report();
    }

    fn report(&mut self) {
        if self.reported {
            return;
        }
        self.reported = true;
        if let Some(r) = &self.redactor {
            self.filter.report(r.verdicts());
        }
    }
}

impl StreamTranslator for GuardStream {
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        match self.inner.as_mut() {
            Some(inner) => {
                let mut tmp = Vec::new();
                inner.event(data, &mut tmp);
                self.reparse(&tmp, false, out);
            }
            None => self.client_event(data, out),
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(inner) = self.inner.as_mut() {
            let mut tmp = Vec::new();
            inner.finish(&mut tmp);
            self.reparse(&tmp, true, out);
        }
        self.flush(out);
        self.report();
    }
}

fn write_event(out: &mut Vec<u8>, event: Option<&str>, data: &[u8]) {
    if let Some(e) = event.filter(|e| !e.is_empty()) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
}

fn write_json(out: &mut Vec<u8>, event: Option<&str>, v: &Value) {
    let data = serde_json::to_vec(v).unwrap_or_default();
    write_event(out, event, &data);
}
