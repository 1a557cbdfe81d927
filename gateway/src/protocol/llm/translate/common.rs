//! Helpers shared by every translation direction: typed access to `serde_json` objects with
//! field paths in errors, the stop-reason and usage mappings, id derivation and SSE framing.
//! Kept in one place so both directions of each mapping stay next to each other.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::TranslateError;

/// A JSON object.
pub(super) type Obj = Map<String, Value>;

/// Parse a whole body that must be a JSON object.
pub(super) fn parse_object(body: &[u8]) -> Result<Obj, TranslateError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(TranslateError::WrongType { field: "body".into(), expected: "a JSON object" }),
        Err(e) => Err(TranslateError::Json(e.to_string())),
    }
}

/// Serialise a JSON value (cannot fail for a `Value`).
pub(super) fn encode(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// `path.key`, or `key` at the top level.
pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// `path[i]`.
pub(super) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// `obj[key]`, with JSON `null` treated as absent (both protocols use the two interchangeably).
pub(super) fn field<'a>(obj: &'a Obj, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn wrong(path: &str, key: &str, expected: &'static str) -> TranslateError {
    TranslateError::WrongType { field: join(path, key), expected }
}

fn missing(path: &str, key: &str) -> TranslateError {
    TranslateError::Missing { field: join(path, key) }
}

/// Optional string field.
pub(super) fn opt_str<'a>(obj: &'a Obj, key: &str, path: &str) -> Result<Option<&'a str>, TranslateError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong(path, key, "a string")),
    }
}

/// Required string field.
pub(super) fn req_str<'a>(obj: &'a Obj, key: &str, path: &str) -> Result<&'a str, TranslateError> {
    opt_str(obj, key, path)?.ok_or_else(|| missing(path, key))
}

/// Optional array field.
pub(super) fn opt_array<'a>(obj: &'a Obj, key: &str, path: &str) -> Result<Option<&'a Vec<Value>>, TranslateError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(wrong(path, key, "an array")),
    }
}

/// Required array field.
pub(super) fn req_array<'a>(obj: &'a Obj, key: &str, path: &str) -> Result<&'a Vec<Value>, TranslateError> {
    opt_array(obj, key, path)?.ok_or_else(|| missing(path, key))
}

/// Optional object field.
pub(super) fn opt_object<'a>(obj: &'a Obj, key: &str, path: &str) -> Result<Option<&'a Obj>, TranslateError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(wrong(path, key, "an object")),
    }
}

/// Optional boolean field.
pub(super) fn opt_bool(obj: &Obj, key: &str, path: &str) -> Result<Option<bool>, TranslateError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(wrong(path, key, "a boolean")),
    }
}

/// Optional number field (kept as the JSON number so integers stay integers).
pub(super) fn opt_number<'a>(obj: &'a Obj, key: &str, path: &str) -> Result<Option<&'a Value>, TranslateError> {
    match field(obj, key) {
        None => Ok(None),
        Some(v @ Value::Number(_)) => Ok(Some(v)),
        Some(_) => Err(wrong(path, key, "a number")),
    }
}

/// Optional non-negative integer field.
pub(super) fn opt_u64(obj: &Obj, key: &str, path: &str) -> Result<Option<u64>, TranslateError> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| wrong(path, key, "a non-negative integer")),
    }
}

/// An array element that must be an object.
pub(super) fn as_object<'a>(v: &'a Value, path: &str) -> Result<&'a Obj, TranslateError> {
    v.as_object().ok_or_else(|| TranslateError::WrongType { field: path.to_string(), expected: "an object" })
}

/// Lenient number read for responses and stream events (missing or malformed counts as 0: a
/// response is never rejected over a usage counter).
pub(super) fn count(obj: Option<&Obj>, key: &str) -> u64 {
    obj.and_then(|o| o.get(key)).and_then(Value::as_u64).unwrap_or(0)
}

/// Lenient string read for responses and stream events.
pub(super) fn text<'a>(obj: &'a Obj, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

/// Tool-call arguments (a JSON text) → a JSON object; empty means no arguments.
pub(super) fn parse_arguments(args: &str, path: &str) -> Result<Value, TranslateError> {
    if args.trim().is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_str::<Value>(args) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(TranslateError::Invalid { field: path.to_string(), reason: "not a JSON object".into() }),
        Err(e) => Err(TranslateError::Invalid { field: path.to_string(), reason: format!("not valid JSON: {e}") }),
    }
}

/// Anthropic `stop_reason` → OpenAI `finish_reason`.
pub(super) fn finish_reason_from_stop_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") | Some("model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, and anything newer.
        _ => "stop",
    }
}

/// OpenAI `finish_reason` → Anthropic `stop_reason`.
pub(super) fn stop_reason_from_finish_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls") | Some("function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Token counts in Anthropic's split form (`input` excludes cached tokens); converted to and
/// from OpenAI's form (`prompt_tokens` includes them) so totals survive either direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Tokens {
    /// Prompt tokens neither read from nor written to the cache.
    pub input: u64,
    /// Prompt tokens read from the cache.
    pub cache_read: u64,
    /// Prompt tokens written to the cache.
    pub cache_creation: u64,
    /// Generated tokens.
    pub output: u64,
}

impl Tokens {
    /// From an Anthropic `usage` object (`Usage` or the cumulative `MessageDeltaUsage`).
    pub fn from_anthropic(usage: Option<&Obj>) -> Tokens {
        Tokens {
            input: count(usage, "input_tokens"),
            cache_read: count(usage, "cache_read_input_tokens"),
            cache_creation: count(usage, "cache_creation_input_tokens"),
            output: count(usage, "output_tokens"),
        }
    }

    /// Overwrite with the counters present in a cumulative `message_delta` usage (absent ones
    /// keep their `message_start` value).
    pub fn update_from_anthropic(&mut self, usage: &Obj) {
        let get = |k: &str| usage.get(k).and_then(Value::as_u64);
        if let Some(n) = get("input_tokens") {
            self.input = n;
        }
        if let Some(n) = get("cache_read_input_tokens") {
            self.cache_read = n;
        }
        if let Some(n) = get("cache_creation_input_tokens") {
            self.cache_creation = n;
        }
        if let Some(n) = get("output_tokens") {
            self.output = n;
        }
    }

    /// From an OpenAI `CompletionUsage`: cached (and cache-written) tokens are taken out of
    /// `prompt_tokens`.
    pub fn from_openai(usage: Option<&Obj>) -> Tokens {
        let details = usage.and_then(|u| u.get("prompt_tokens_details")).and_then(Value::as_object);
        let cache_read = count(details, "cached_tokens");
        let cache_creation = count(details, "cache_write_tokens");
        Tokens {
            input: count(usage, "prompt_tokens").saturating_sub(cache_read).saturating_sub(cache_creation),
            cache_read,
            cache_creation,
            output: count(usage, "completion_tokens"),
        }
    }

    /// Total prompt tokens, cached or not.
    pub fn prompt(&self) -> u64 {
        self.input.saturating_add(self.cache_read).saturating_add(self.cache_creation)
    }

    /// OpenAI `CompletionUsage`.
    pub fn to_openai(self) -> Value {
        let prompt = self.prompt();
        let mut details = json!({ "cached_tokens": self.cache_read });
        if self.cache_creation > 0 {
            details["cache_write_tokens"] = json!(self.cache_creation);
        }
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output,
            "total_tokens": prompt.saturating_add(self.output),
            "prompt_tokens_details": details,
        })
    }

    /// Anthropic `Usage` (also valid as a `MessageDeltaUsage`).
    pub fn to_anthropic(self) -> Value {
        json!({
            "input_tokens": self.input,
            "output_tokens": self.output,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
        })
    }
}

fn random_suffix() -> String {
    format!("{:016x}{:08x}", rand::random::<u64>(), rand::random::<u32>())
}

/// OpenAI completion id derived from the upstream Anthropic message id (`msg_X` →
/// `chatcmpl-X`), so a client-side id can be matched to upstream logs; random when absent.
pub(super) fn chat_id(upstream: Option<&str>) -> String {
    match upstream.filter(|s| !s.is_empty()) {
        Some(id) => format!("chatcmpl-{}", id.strip_prefix("msg_").unwrap_or(id)),
        None => format!("chatcmpl-{}", random_suffix()),
    }
}

/// Anthropic message id derived from the upstream OpenAI completion id (`chatcmpl-X` → `msg_X`).
pub(super) fn message_id(upstream: Option<&str>) -> String {
    match upstream.filter(|s| !s.is_empty()) {
        Some(id) => format!("msg_{}", id.strip_prefix("chatcmpl-").unwrap_or(id)),
        None => format!("msg_{}", random_suffix()),
    }
}

/// Seconds since the Unix epoch, for OpenAI's `created`.
pub(super) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Append one OpenAI SSE event: `data: {json}\n\n`.
pub(super) fn push_openai(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&encode(v));
    out.extend_from_slice(b"\n\n");
}

/// Append OpenAI's end-of-stream sentinel.
pub(super) fn push_done(out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: [DONE]\n\n");
}

/// Append one Anthropic SSE event: `event: {type}\ndata: {json}\n\n`; the event name is the
/// payload's `type`, as the Anthropic API sends it.
pub(super) fn push_anthropic(out: &mut Vec<u8>, v: &Value) {
    let name = v.get("type").and_then(Value::as_str).unwrap_or("message");
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(&encode(v));
    out.extend_from_slice(b"\n\n");
}

/// Is this SSE payload OpenAI's `[DONE]` sentinel?
pub(super) fn is_done(data: &[u8]) -> bool {
    data.trim_ascii() == b"[DONE]"
}
