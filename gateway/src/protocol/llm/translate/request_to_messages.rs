//! OpenAI chat request → Anthropic messages request.
//!
//! `system`/`developer` messages are hoisted into the top-level `system`; `tool` messages
//! become `tool_result` blocks in a user turn; consecutive same-role turns are merged because
//! Anthropic wants alternating roles, with `tool_result` blocks first in a user turn as
//! Anthropic requires.

use serde_json::{json, Value};

use super::common::{
    as_object, encode, field, index, join, opt_array, opt_bool, opt_number, opt_object, opt_str, opt_u64,
    parse_arguments, parse_object, req_array, req_str, Obj,
};
use super::TranslateError;

/// Image media types the Anthropic API accepts in a base64 source.
const IMAGE_MEDIA_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Translate an OpenAI chat-completions request body into an Anthropic messages request body.
/// `model` replaces the request's model; `default_max_tokens` fills Anthropic's required
/// `max_tokens` when the request has neither `max_tokens` nor `max_completion_tokens`.
pub fn chat_request_to_messages(body: &[u8], model: &str, default_max_tokens: u32) -> Result<Vec<u8>, TranslateError> {
    let req = parse_object(body)?;
    reject_unsupported(&req)?;

    let mut out = Obj::new();
    out.insert("model".into(), json!(model));
    let max_tokens = match opt_u64(&req, "max_completion_tokens", "")? {
        Some(n) => n,
        None => opt_u64(&req, "max_tokens", "")?.unwrap_or(u64::from(default_max_tokens)),
    };
    out.insert("max_tokens".into(), json!(max_tokens));

    let (system, messages) = convert_messages(req_array(&req, "messages", "")?)?;
    if let Some(system) = system {
        out.insert("system".into(), system);
    }
    out.insert("messages".into(), Value::Array(messages));

    if let Some(t) = opt_number(&req, "temperature", "")? {
        // OpenAI allows 0..=2, Anthropic 0..=1: clamp rather than have the upstream reject it.
        let t = t.as_f64().unwrap_or(1.0).clamp(0.0, 1.0);
        out.insert("temperature".into(), json!(t));
    }
    if let Some(p) = opt_number(&req, "top_p", "")? {
        out.insert("top_p".into(), p.clone());
    }
    if let Some(stop) = stop_sequences(&req)? {
        out.insert("stop_sequences".into(), stop);
    }
    if let Some(stream) = opt_bool(&req, "stream", "")? {
        out.insert("stream".into(), json!(stream));
    }
    let user = match opt_str(&req, "user", "")? {
        Some(u) => Some(u),
        None => opt_str(&req, "safety_identifier", "")?,
    };
    if let Some(user) = user {
        out.insert("metadata".into(), json!({ "user_id": user }));
    }
    convert_tools(&req, &mut out)?;
    Ok(encode(&Value::Object(out)))
}

fn unsupported(field: &str, what: impl Into<String>) -> TranslateError {
    TranslateError::Unsupported { field: field.to_string(), what: what.into() }
}

/// Reject request fields whose meaning cannot be kept on an Anthropic target.
fn reject_unsupported(req: &Obj) -> Result<(), TranslateError> {
    if let Some(n) = opt_u64(req, "n", "")? {
        if n != 1 {
            return Err(unsupported("n", format!("value `{n}` (only one choice can be translated)")));
        }
    }
    if opt_bool(req, "logprobs", "")? == Some(true) {
        return Err(unsupported("logprobs", "value `true` (no log probabilities on this target)"));
    }
    for key in ["top_logprobs", "audio", "functions", "function_call", "web_search_options"] {
        if field(req, key).is_some() {
            return Err(unsupported(key, "field"));
        }
    }
    if let Some(modalities) = opt_array(req, "modalities", "")? {
        if modalities.iter().any(|m| m.as_str() != Some("text")) {
            return Err(unsupported("modalities", "output modality (only `text`)"));
        }
    }
    if let Some(format) = opt_object(req, "response_format", "")? {
        let kind = opt_str(format, "type", "response_format")?.unwrap_or("text");
        if kind != "text" {
            return Err(unsupported("response_format.type", format!("value `{kind}`")));
        }
    }
    Ok(())
}

/// `stop` (string or array) → `stop_sequences`.
fn stop_sequences(req: &Obj) -> Result<Option<Value>, TranslateError> {
    match field(req, "stop") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(json!([s]))),
        Some(Value::Array(a)) => {
            for (i, s) in a.iter().enumerate() {
                if !s.is_string() {
                    return Err(TranslateError::WrongType { field: index("stop", i), expected: "a string" });
                }
            }
            Ok(Some(Value::Array(a.clone())))
        }
        Some(_) => Err(TranslateError::WrongType { field: "stop".into(), expected: "a string or an array" }),
    }
}

/// Anthropic turns under construction: consecutive same-role messages are merged.
#[derive(Default)]
struct Turns {
    turns: Vec<(&'static str, Vec<Value>)>,
}

impl Turns {
    fn push(&mut self, role: &'static str, blocks: Vec<Value>) {
        if blocks.is_empty() {
            return;
        }
        match self.turns.last_mut() {
            Some((r, existing)) if *r == role => existing.extend(blocks),
            _ => self.turns.push((role, blocks)),
        }
    }

    fn into_messages(self) -> Vec<Value> {
        self.turns
            .into_iter()
            .map(|(role, mut blocks)| {
                if role == "user" {
                    // Stable: tool results first, everything else after, each in original order.
                    blocks.sort_by_key(|b| b.get("type").and_then(Value::as_str) != Some("tool_result"));
                }
                let content = match blocks.as_slice() {
                    [only] if only.get("type").and_then(Value::as_str) == Some("text") => {
                        only.get("text").cloned().unwrap_or_else(|| json!(""))
                    }
                    _ => Value::Array(blocks),
                };
                json!({ "role": role, "content": content })
            })
            .collect()
    }
}

fn text_block(text: &str) -> Value {
    json!({ "type": "text", "text": text })
}

/// Convert the message list; returns the hoisted system prompt and the Anthropic messages.
fn convert_messages(messages: &[Value]) -> Result<(Option<Value>, Vec<Value>), TranslateError> {
    let mut system: Vec<String> = Vec::new();
    let mut turns = Turns::default();
    for (i, m) in messages.iter().enumerate() {
        let path = index("messages", i);
        let m = as_object(m, &path)?;
        let role = req_str(m, "role", &path)?;
        let content_path = join(&path, "content");
        match role {
            "system" | "developer" => {
                for t in text_parts(field(m, "content"), &content_path, true)? {
                    if !t.is_empty() {
                        system.push(t);
                    }
                }
            }
            "user" => turns.push("user", user_blocks(field(m, "content"), &content_path)?),
            "assistant" => turns.push("assistant", assistant_blocks(m, &path)?),
            "tool" => {
                let id = req_str(m, "tool_call_id", &path)?;
                let mut parts = text_parts(field(m, "content"), &content_path, false)?;
                parts.retain(|t| !t.is_empty());
                let mut block = json!({ "type": "tool_result", "tool_use_id": id });
                match parts.as_slice() {
                    [] => {}
                    [only] => block["content"] = json!(only),
                    many => block["content"] = Value::Array(many.iter().map(|t| text_block(t)).collect()),
                }
                turns.push("user", vec![block]);
            }
            "function" => return Err(unsupported(&join(&path, "role"), "role `function` (use tools)")),
            other => {
                return Err(TranslateError::Invalid {
                    field: join(&path, "role"),
                    reason: format!("unknown role `{other}`"),
                })
            }
        }
    }
    let system = match system.len() {
        0 => None,
        1 => system.pop().map(Value::String),
        _ => Some(Value::Array(system.iter().map(|t| text_block(t)).collect())),
    };
    Ok((system, turns.into_messages()))
}

/// Content that may only hold text: a string or an array of `text` parts. Empty strings are
/// kept so the caller decides; `required` makes a missing content an error.
fn text_parts(content: Option<&Value>, path: &str, required: bool) -> Result<Vec<String>, TranslateError> {
    match content {
        None if required => Err(TranslateError::Missing { field: path.to_string() }),
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let ppath = index(path, j);
                let part = as_object(part, &ppath)?;
                match req_str(part, "type", &ppath)? {
                    "text" => out.push(req_str(part, "text", &ppath)?.to_string()),
                    other => return Err(unsupported(&ppath, format!("part type `{other}`"))),
                }
            }
            Ok(out)
        }
        Some(_) => Err(TranslateError::WrongType { field: path.to_string(), expected: "a string or an array" }),
    }
}

/// User content: text and images. Empty text is dropped (Anthropic rejects empty text blocks).
fn user_blocks(content: Option<&Value>, path: &str) -> Result<Vec<Value>, TranslateError> {
    let parts = match content {
        None => return Err(TranslateError::Missing { field: path.to_string() }),
        Some(Value::String(s)) if s.is_empty() => return Ok(Vec::new()),
        Some(Value::String(s)) => return Ok(vec![text_block(s)]),
        Some(Value::Array(parts)) => parts,
        Some(_) => return Err(TranslateError::WrongType { field: path.to_string(), expected: "a string or an array" }),
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let ppath = index(path, j);
        let part = as_object(part, &ppath)?;
        match req_str(part, "type", &ppath)? {
            "text" => {
                let t = req_str(part, "text", &ppath)?;
                if !t.is_empty() {
                    blocks.push(text_block(t));
                }
            }
            "image_url" => {
                let ipath = join(&ppath, "image_url");
                let image = opt_object(part, "image_url", &ppath)?
                    .ok_or_else(|| TranslateError::Missing { field: ipath.clone() })?;
                blocks.push(image_block(req_str(image, "url", &ipath)?, &join(&ipath, "url"))?);
            }
            other => return Err(unsupported(&ppath, format!("part type `{other}`"))),
        }
    }
    Ok(blocks)
}

/// OpenAI image URL → Anthropic image block: `data:` URLs become base64 sources, http(s) URLs
/// become URL sources.
fn image_block(url: &str, path: &str) -> Result<Value, TranslateError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(TranslateError::Invalid { field: path.to_string(), reason: "malformed data URL".into() });
        };
        let mut params = meta.split(';');
        let mut media = params.next().unwrap_or("").trim().to_ascii_lowercase();
        if !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
            return Err(unsupported(path, "data URL encoding (only base64)"));
        }
        if media == "image/jpg" {
            media = "image/jpeg".into();
        }
        if !IMAGE_MEDIA_TYPES.contains(&media.as_str()) {
            return Err(unsupported(path, format!("image media type `{media}`")));
        }
        return Ok(json!({
            "type": "image",
            "source": { "type": "base64", "media_type": media, "data": data },
        }));
    }
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http") | Some("https") => Ok(json!({ "type": "image", "source": { "type": "url", "url": url } })),
        _ => Err(unsupported(path, "image URL (only data: and http(s) URLs)")),
    }
}

/// Assistant content (text and refusal parts) followed by its tool calls as `tool_use` blocks.
fn assistant_blocks(m: &Obj, path: &str) -> Result<Vec<Value>, TranslateError> {
    if field(m, "function_call").is_some() {
        return Err(unsupported(&join(path, "function_call"), "legacy field (use tool_calls)"));
    }
    if field(m, "audio").is_some() {
        return Err(unsupported(&join(path, "audio"), "field"));
    }
    let mut blocks = Vec::new();
    let content_path = join(path, "content");
    match field(m, "content") {
        Some(Value::String(s)) if !s.is_empty() => blocks.push(text_block(s)),
        None | Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                let ppath = index(&content_path, j);
                let part = as_object(part, &ppath)?;
                let t = match req_str(part, "type", &ppath)? {
                    "text" => req_str(part, "text", &ppath)?,
                    "refusal" => req_str(part, "refusal", &ppath)?,
                    other => return Err(unsupported(&ppath, format!("part type `{other}`"))),
                };
                if !t.is_empty() {
                    blocks.push(text_block(t));
                }
            }
        }
        Some(_) => {
            return Err(TranslateError::WrongType { field: content_path, expected: "a string or an array" });
        }
    }
    if let Some(calls) = opt_array(m, "tool_calls", path)? {
        let calls_path = join(path, "tool_calls");
        for (k, call) in calls.iter().enumerate() {
            blocks.push(tool_use_block(call, &index(&calls_path, k))?);
        }
    }
    Ok(blocks)
}

/// One assistant `tool_calls[k]` → `tool_use` block (arguments string → input object).
fn tool_use_block(call: &Value, path: &str) -> Result<Value, TranslateError> {
    let call = as_object(call, path)?;
    let kind = opt_str(call, "type", path)?.unwrap_or("function");
    if kind != "function" {
        return Err(unsupported(&join(path, "type"), format!("tool call type `{kind}`")));
    }
    let id = req_str(call, "id", path)?;
    let fpath = join(path, "function");
    let function =
        opt_object(call, "function", path)?.ok_or_else(|| TranslateError::Missing { field: fpath.clone() })?;
    let name = req_str(function, "name", &fpath)?;
    let args = opt_str(function, "arguments", &fpath)?.unwrap_or("");
    let input = parse_arguments(args, &join(&fpath, "arguments"))?;
    Ok(json!({ "type": "tool_use", "id": id, "name": name, "input": input }))
}

/// `tools`, `tool_choice` and `parallel_tool_calls`.
fn convert_tools(req: &Obj, out: &mut Obj) -> Result<(), TranslateError> {
    let mut tools = Vec::new();
    for (i, tool) in opt_array(req, "tools", "")?.into_iter().flatten().enumerate() {
        let path = index("tools", i);
        let tool = as_object(tool, &path)?;
        let kind = req_str(tool, "type", &path)?;
        if kind != "function" {
            return Err(unsupported(&join(&path, "type"), format!("tool type `{kind}`")));
        }
        let fpath = join(&path, "function");
        let function =
            opt_object(tool, "function", &path)?.ok_or_else(|| TranslateError::Missing { field: fpath.clone() })?;
        let mut t = Obj::new();
        t.insert("name".into(), json!(req_str(function, "name", &fpath)?));
        if let Some(d) = opt_str(function, "description", &fpath)? {
            t.insert("description".into(), json!(d));
        }
        let schema = match opt_object(function, "parameters", &fpath)? {
            Some(p) => Value::Object(p.clone()),
            None => json!({ "type": "object", "properties": {} }),
        };
        t.insert("input_schema".into(), schema);
        tools.push(Value::Object(t));
    }

    let mut choice = match field(req, "tool_choice") {
        None => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({ "type": "auto" })),
            "none" => Some(json!({ "type": "none" })),
            "required" => Some(json!({ "type": "any" })),
            other => {
                return Err(TranslateError::Invalid {
                    field: "tool_choice".into(),
                    reason: format!("unknown value `{other}`"),
                })
            }
        },
        Some(Value::Object(o)) => {
            let kind = req_str(o, "type", "tool_choice")?;
            if kind != "function" {
                return Err(unsupported("tool_choice.type", format!("value `{kind}`")));
            }
            let f = opt_object(o, "function", "tool_choice")?
                .ok_or_else(|| TranslateError::Missing { field: "tool_choice.function".into() })?;
            Some(json!({ "type": "tool", "name": req_str(f, "name", "tool_choice.function")? }))
        }
        Some(_) => {
            return Err(TranslateError::WrongType { field: "tool_choice".into(), expected: "a string or an object" })
        }
    };
    if tools.is_empty() {
        // Without tools there is nothing to choose from; Anthropic needs no tool_choice.
        return Ok(());
    }
    if opt_bool(req, "parallel_tool_calls", "")? == Some(false) {
        let c = choice.get_or_insert_with(|| json!({ "type": "auto" }));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = json!(true);
        }
    }
    out.insert("tools".into(), Value::Array(tools));
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    Ok(())
}
