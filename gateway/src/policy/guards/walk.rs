//! Where the text is in each API's request and response JSON. Guards see every text field once,
//! with its normalised role and a [`Location`] that costs nothing until it is printed, so a
//! clean prompt is scanned without allocating; the few fields that must change are then
//! rewritten through [`Location::pointer`].

use std::fmt;

use serde_json::{Map, Value};

use crate::config::guards::MessageRole;
use crate::protocol::llm::api::Api;

/// Deepest path a text field can have (Gemini stream arrays, Anthropic tool results).
const MAX_SEGS: usize = 8;

/// One step of a [`Location`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

/// Where a text field sits in a body, kept as a fixed-size path so that walking a body never
/// allocates; rendered as `messages[2].content[0].text` for people ([`fmt::Display`]) or as a
/// JSON pointer for rewriting ([`Location::pointer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    segs: [Seg; MAX_SEGS],
    len: u8,
    /// Index of the message (turn) the text belongs to; `None` for system prompts.
    pub(crate) message: Option<usize>,
}

impl Location {
    fn root() -> Self {
        Location { segs: [Seg::Index(0); MAX_SEGS], len: 0, message: None }
    }

    fn key(mut self, k: &'static str) -> Self {
        self.push(Seg::Key(k));
        self
    }

    fn index(mut self, i: usize) -> Self {
        self.push(Seg::Index(i));
        self
    }

    fn in_message(mut self, i: usize) -> Self {
        self.message = Some(i);
        self
    }

    fn push(&mut self, s: Seg) {
        // The walkers below never nest deeper than MAX_SEGS; a longer path would be a bug, and
        // truncating it only makes the pointer miss (no rewrite), never panic.
        if let Some(slot) = self.segs.get_mut(usize::from(self.len)) {
            *slot = s;
            self.len += 1;
        }
    }

    fn segs(&self) -> &[Seg] {
        &self.segs[..usize::from(self.len)]
    }

    /// JSON pointer (RFC 6901) of the field, for `serde_json::Value::pointer_mut`. Keys here
    /// are fixed API names without `~` or `/`, so no escaping is needed.
    pub fn pointer(&self) -> String {
        let mut p = String::new();
        for s in self.segs() {
            p.push('/');
            match s {
                Seg::Key(k) => p.push_str(k),
                Seg::Index(i) => p.push_str(&i.to_string()),
            }
        }
        p
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, s) in self.segs().iter().enumerate() {
            match s {
                Seg::Key(k) if n == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// Callback of the walkers: one text field, its role and where it is.
pub(crate) type Visit<'v> = dyn FnMut(Location, MessageRole, &str) + 'v;

/// Visit every text field of a request body of `api`, in document order. Fields tollgate does
/// not read as text (images, tool-call arguments, tool definitions) are skipped.
pub(crate) fn request(api: Api, body: &Value, f: &mut Visit<'_>) {
    let Value::Object(top) = body else { return };
    let root = Location::root();
    match api {
        Api::OpenAiChat => openai_messages(top, root, f),
        Api::OpenAiResponses => {
            if let Some(Value::String(s)) = top.get("instructions") {
                f(root.key("instructions"), MessageRole::System, s);
            }
            match top.get("input") {
                Some(Value::String(s)) => f(root.key("input").in_message(0), MessageRole::User, s),
                Some(Value::Array(items)) => responses_items(items, root.key("input"), f),
                _ => {}
            }
        }
        Api::OpenAiCompletions => plain(top, "prompt", root, f),
        Api::OpenAiEmbeddings => plain(top, "input", root, f),
        Api::AnthropicMessages | Api::AnthropicCountTokens => {
            match top.get("system") {
                Some(Value::String(s)) => f(root.key("system"), MessageRole::System, s),
                Some(Value::Array(blocks)) => text_blocks(blocks, root.key("system"), MessageRole::System, f),
                _ => {}
            }
            anthropic_messages(top, root, f);
        }
        Api::GeminiGenerate | Api::GeminiStreamGenerate | Api::GeminiCountTokens => {
            for key in ["systemInstruction", "system_instruction"] {
                if let Some(Value::Object(c)) = top.get(key) {
                    gemini_parts(c, root.key(key), MessageRole::System, f);
                }
            }
            if let Some(Value::Array(contents)) = top.get("contents") {
                for (i, c) in contents.iter().enumerate() {
                    let Value::Object(c) = c else { continue };
                    let role = match c.get("role").and_then(Value::as_str) {
                        Some("model") => MessageRole::Assistant,
                        Some("function" | "tool") => MessageRole::Tool,
                        _ => MessageRole::User,
                    };
                    gemini_parts(c, root.key("contents").index(i).in_message(i), role, f);
                }
            }
        }
        Api::GeminiEmbed => {
            if let Some(Value::Object(c)) = top.get("content") {
                gemini_parts(c, root.key("content").in_message(0), MessageRole::User, f);
            }
        }
    }
}

/// Visit every text field of a (non-streamed) response body of `api`; all of it is the
/// model's, so the role is always `assistant`.
pub(crate) fn response(api: Api, body: &Value, f: &mut Visit<'_>) {
    let root = Location::root();
    if let Value::Array(items) = body {
        // Gemini streamGenerateContent without `alt=sse`: a JSON array of responses.
        for (k, item) in items.iter().enumerate() {
            if let Value::Object(top) = item {
                response_object(api, top, root.index(k), f);
            }
        }
    } else if let Value::Object(top) = body {
        response_object(api, top, root, f);
    }
}

fn response_object(api: Api, top: &Map<String, Value>, root: Location, f: &mut Visit<'_>) {
    let a = MessageRole::Assistant;
    match api {
        Api::OpenAiChat | Api::OpenAiCompletions => {
            let Some(Value::Array(choices)) = top.get("choices") else { return };
            for (i, c) in choices.iter().enumerate() {
                let at = root.key("choices").index(i).in_message(i);
                match c.get("message").and_then(|m| m.get("content")) {
                    Some(Value::String(s)) => f(at.key("message").key("content"), a, s),
                    _ => {
                        if let Some(Value::String(s)) = c.get("text") {
                            f(at.key("text"), a, s);
                        }
                    }
                }
            }
        }
        Api::OpenAiResponses => {
            let Some(Value::Array(out)) = top.get("output") else { return };
            for (i, item) in out.iter().enumerate() {
                if let Some(Value::Array(parts)) = item.get("content") {
                    text_blocks(parts, root.key("output").index(i).in_message(i).key("content"), a, f);
                }
            }
        }
        Api::AnthropicMessages => {
            if let Some(Value::Array(blocks)) = top.get("content") {
                text_blocks(blocks, root.key("content").in_message(0), a, f);
            }
        }
        Api::GeminiGenerate | Api::GeminiStreamGenerate => {
            let Some(Value::Array(cands)) = top.get("candidates") else { return };
            for (i, c) in cands.iter().enumerate() {
                if let Some(Value::Object(content)) = c.get("content") {
                    gemini_parts(content, root.key("candidates").index(i).in_message(i).key("content"), a, f);
                }
            }
        }
        Api::OpenAiEmbeddings | Api::AnthropicCountTokens | Api::GeminiCountTokens | Api::GeminiEmbed => {}
    }
}

/// Role of an OpenAI-style `role` string.
fn openai_role(role: Option<&str>) -> MessageRole {
    match role {
        Some("system" | "developer") => MessageRole::System,
        Some("assistant") => MessageRole::Assistant,
        Some("tool" | "function") => MessageRole::Tool,
        _ => MessageRole::User,
    }
}

fn openai_messages(top: &Map<String, Value>, root: Location, f: &mut Visit<'_>) {
    let Some(Value::Array(messages)) = top.get("messages") else { return };
    for (i, m) in messages.iter().enumerate() {
        let role = openai_role(m.get("role").and_then(Value::as_str));
        let at = root.key("messages").index(i).in_message(i).key("content");
        match m.get("content") {
            Some(Value::String(s)) => f(at, role, s),
            Some(Value::Array(parts)) => text_blocks(parts, at, role, f),
            _ => {}
        }
    }
}

fn responses_items(items: &[Value], at: Location, f: &mut Visit<'_>) {
    for (i, item) in items.iter().enumerate() {
        let Value::Object(item) = item else { continue };
        let here = at.index(i).in_message(i);
        match item.get("type").and_then(Value::as_str) {
            None | Some("message") => {
                let role = openai_role(item.get("role").and_then(Value::as_str));
                match item.get("content") {
                    Some(Value::String(s)) => f(here.key("content"), role, s),
                    Some(Value::Array(parts)) => text_blocks(parts, here.key("content"), role, f),
                    _ => {}
                }
            }
            Some("function_call_output") => {
                if let Some(Value::String(s)) = item.get("output") {
                    f(here.key("output"), MessageRole::Tool, s);
                }
            }
            Some(_) => {}
        }
    }
}

/// `blocks[j].text` of every block whose `type` is a text type (`text`, `input_text`,
/// `output_text`), or that has no type but a `text` string.
fn text_blocks(blocks: &[Value], at: Location, role: MessageRole, f: &mut Visit<'_>) {
    for (j, b) in blocks.iter().enumerate() {
        let Value::Object(b) = b else { continue };
        let is_text =
            matches!(b.get("type").and_then(Value::as_str), None | Some("text" | "input_text" | "output_text"));
        if let (true, Some(Value::String(s))) = (is_text, b.get("text")) {
            f(at.index(j).key("text"), role, s);
        }
    }
}

fn anthropic_messages(top: &Map<String, Value>, root: Location, f: &mut Visit<'_>) {
    let Some(Value::Array(messages)) = top.get("messages") else { return };
    for (i, m) in messages.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("assistant") => MessageRole::Assistant,
            _ => MessageRole::User,
        };
        let at = root.key("messages").index(i).in_message(i).key("content");
        match m.get("content") {
            Some(Value::String(s)) => f(at, role, s),
            Some(Value::Array(blocks)) => {
                for (j, b) in blocks.iter().enumerate() {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            if let Some(Value::String(s)) = b.get("text") {
                                f(at.index(j).key("text"), role, s);
                            }
                        }
                        Some("tool_result") => {
                            let inner = at.index(j).key("content");
                            match b.get("content") {
                                Some(Value::String(s)) => f(inner, MessageRole::Tool, s),
                                Some(Value::Array(bs)) => text_blocks(bs, inner, MessageRole::Tool, f),
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}

fn gemini_parts(content: &Map<String, Value>, at: Location, role: MessageRole, f: &mut Visit<'_>) {
    let Some(Value::Array(parts)) = content.get("parts") else { return };
    for (j, p) in parts.iter().enumerate() {
        if let Some(Value::String(s)) = p.get("text") {
            f(at.key("parts").index(j).key("text"), role, s);
        }
    }
}

/// Completion prompts and embedding inputs: a string or an array of strings (token-id arrays
/// are not text).
fn plain(top: &Map<String, Value>, key: &'static str, root: Location, f: &mut Visit<'_>) {
    match top.get(key) {
        Some(Value::String(s)) => f(root.key(key).in_message(0), MessageRole::User, s),
        Some(Value::Array(items)) => {
            for (i, v) in items.iter().enumerate() {
                if let Value::String(s) = v {
                    f(root.key(key).index(i).in_message(i), MessageRole::User, s);
                }
            }
        }
        _ => {}
    }
}
