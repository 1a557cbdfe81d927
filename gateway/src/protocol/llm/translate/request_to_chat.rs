//! Anthropic messages request → OpenAI chat request.
//!
//! The top-level `system` becomes leading `system` messages (one per text block); `tool_result`
//! blocks in a user turn become `tool` messages placed before the rest of that turn, since
//! OpenAI wants tool answers right after the assistant's tool calls; `tool_use` blocks become
//! `tool_calls`. Streams ask for `stream_options.include_usage` so tokens can be counted.

use serde_json::{json, Value};

use super::common::{
    as_object, encode, field, index, join, opt_array, opt_bool, opt_number, opt_object, opt_str, opt_u64, parse_object,
    req_array, req_str, Obj,
};
use super::TranslateError;

/// Translate an Anthropic messages request body into an OpenAI chat-completions request body.
/// `model` replaces the request's model. Streaming requests get
/// `stream_options.include_usage: true` so the upstream reports usage on its last chunk.
pub fn messages_request_to_chat(body: &[u8], model: &str) -> Result<Vec<u8>, TranslateError> {
    let req = parse_object(body)?;
    for key in ["mcp_servers", "container"] {
        if field(&req, key).is_some() {
            return Err(unsupported(key, "field"));
        }
    }

    let mut out = Obj::new();
    out.insert("model".into(), json!(model));
    let mut messages = system_messages(&req)?;
    for (i, m) in req_array(&req, "messages", "")?.iter().enumerate() {
        convert_message(m, &index("messages", i), &mut messages)?;
    }
    out.insert("messages".into(), Value::Array(messages));

    if let Some(n) = opt_u64(&req, "max_tokens", "")? {
        // `max_tokens` is deprecated on chat completions and refused by reasoning models.
        out.insert("max_completion_tokens".into(), json!(n));
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = opt_number(&req, key, "")? {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(stops) = opt_array(&req, "stop_sequences", "")? {
        for (i, s) in stops.iter().enumerate() {
            if !s.is_string() {
                return Err(TranslateError::WrongType { field: index("stop_sequences", i), expected: "a string" });
            }
        }
        if !stops.is_empty() {
            out.insert("stop".into(), Value::Array(stops.clone()));
        }
    }
    if opt_bool(&req, "stream", "")? == Some(true) {
        out.insert("stream".into(), json!(true));
        out.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    if let Some(meta) = opt_object(&req, "metadata", "")? {
        if let Some(user) = opt_str(meta, "user_id", "metadata")? {
            out.insert("user".into(), json!(user));
        }
    }
    convert_tools(&req, &mut out)?;
    Ok(encode(&Value::Object(out)))
}

fn unsupported(field: &str, what: impl Into<String>) -> TranslateError {
    TranslateError::Unsupported { field: field.to_string(), what: what.into() }
}

/// Top-level `system` (string or text blocks) → leading system messages.
fn system_messages(req: &Obj) -> Result<Vec<Value>, TranslateError> {
    let texts = text_blocks(field(req, "system"), "system")?;
    Ok(texts.into_iter().filter(|t| !t.is_empty()).map(|t| json!({ "role": "system", "content": t })).collect())
}

/// Content that may only hold text: a string or an array of `text` blocks.
fn text_blocks(content: Option<&Value>, path: &str) -> Result<Vec<String>, TranslateError> {
    match content {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(blocks)) => {
            let mut out = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                let bpath = index(path, j);
                let b = as_object(b, &bpath)?;
                match req_str(b, "type", &bpath)? {
                    "text" => out.push(req_str(b, "text", &bpath)?.to_string()),
                    other => return Err(unsupported(&bpath, format!("block type `{other}`"))),
                }
            }
            Ok(out)
        }
        Some(_) => Err(TranslateError::WrongType { field: path.to_string(), expected: "a string or an array" }),
    }
}

/// A message's `content`: the string shorthand or a list of blocks.
enum Content<'a> {
    Text(&'a str),
    Blocks(&'a [Value]),
}

fn content<'a>(m: &'a Obj, path: &str) -> Result<Content<'a>, TranslateError> {
    match field(m, "content") {
        Some(Value::String(s)) => Ok(Content::Text(s)),
        Some(Value::Array(a)) => Ok(Content::Blocks(a)),
        Some(_) => Err(TranslateError::WrongType { field: join(path, "content"), expected: "a string or an array" }),
        None => Err(TranslateError::Missing { field: join(path, "content") }),
    }
}

/// Append the OpenAI messages for one Anthropic message.
fn convert_message(m: &Value, path: &str, out: &mut Vec<Value>) -> Result<(), TranslateError> {
    let m = as_object(m, path)?;
    match req_str(m, "role", path)? {
        "user" => convert_user(m, path, out),
        "assistant" => {
            out.push(convert_assistant(m, path)?);
            Ok(())
        }
        "system" => {
            let cpath = join(path, "content");
            for t in text_blocks(field(m, "content"), &cpath)? {
                out.push(json!({ "role": "system", "content": t }));
            }
            Ok(())
        }
        other => Err(TranslateError::Invalid { field: join(path, "role"), reason: format!("unknown role `{other}`") }),
    }
}

/// A user turn: its `tool_result` blocks become `tool` messages (first), the rest one user
/// message.
fn convert_user(m: &Obj, path: &str, out: &mut Vec<Value>) -> Result<(), TranslateError> {
    let blocks = match content(m, path)? {
        Content::Text(s) => {
            out.push(json!({ "role": "user", "content": s }));
            return Ok(());
        }
        Content::Blocks(blocks) => blocks,
    };
    let cpath = join(path, "content");
    let mut parts = Vec::with_capacity(blocks.len());
    for (j, b) in blocks.iter().enumerate() {
        let bpath = index(&cpath, j);
        let b = as_object(b, &bpath)?;
        match req_str(b, "type", &bpath)? {
            "text" => parts.push(json!({ "type": "text", "text": req_str(b, "text", &bpath)? })),
            "image" => parts.push(image_part(b, &bpath)?),
            "tool_result" => out.push(tool_message(b, &bpath)?),
            other => return Err(unsupported(&bpath, format!("block type `{other}`"))),
        }
    }
    let content = match parts.as_slice() {
        [] => return Ok(()),
        [only] if only["type"] == "text" => only["text"].clone(),
        _ => Value::Array(parts),
    };
    out.push(json!({ "role": "user", "content": content }));
    Ok(())
}

/// Anthropic image block → OpenAI `image_url` part (base64 sources become `data:` URLs).
fn image_part(b: &Obj, path: &str) -> Result<Value, TranslateError> {
    let spath = join(path, "source");
    let source = opt_object(b, "source", path)?.ok_or_else(|| TranslateError::Missing { field: spath.clone() })?;
    let url = match req_str(source, "type", &spath)? {
        "base64" => {
            let media = req_str(source, "media_type", &spath)?;
            let data = req_str(source, "data", &spath)?;
            format!("data:{media};base64,{data}")
        }
        "url" => req_str(source, "url", &spath)?.to_string(),
        other => return Err(unsupported(&join(&spath, "type"), format!("image source type `{other}`"))),
    };
    Ok(json!({ "type": "image_url", "image_url": { "url": url } }))
}

/// `tool_result` block → `tool` message (text content only; `is_error` has no counterpart).
fn tool_message(b: &Obj, path: &str) -> Result<Value, TranslateError> {
    let id = req_str(b, "tool_use_id", path)?;
    let texts = text_blocks(field(b, "content"), &join(path, "content"))?;
    let content = match texts.as_slice() {
        [] => json!(""),
        [only] => json!(only),
        many => Value::Array(many.iter().map(|t| json!({ "type": "text", "text": t })).collect()),
    };
    Ok(json!({ "role": "tool", "tool_call_id": id, "content": content }))
}

/// An assistant turn: text blocks → content, `tool_use` blocks → `tool_calls`; thinking blocks
/// are dropped (OpenAI has no input for them).
fn convert_assistant(m: &Obj, path: &str) -> Result<Value, TranslateError> {
    let blocks = match content(m, path)? {
        Content::Text(s) => return Ok(json!({ "role": "assistant", "content": s })),
        Content::Blocks(blocks) => blocks,
    };
    let cpath = join(path, "content");
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bpath = index(&cpath, j);
        let b = as_object(b, &bpath)?;
        match req_str(b, "type", &bpath)? {
            "text" => {
                let t = req_str(b, "text", &bpath)?;
                if !t.is_empty() {
                    texts.push(json!({ "type": "text", "text": t }));
                }
            }
            "tool_use" => {
                let id = req_str(b, "id", &bpath)?;
                let name = req_str(b, "name", &bpath)?;
                let input = match field(b, "input") {
                    None => "{}".to_string(),
                    Some(v @ Value::Object(_)) => v.to_string(),
                    Some(_) => {
                        return Err(TranslateError::WrongType { field: join(&bpath, "input"), expected: "an object" })
                    }
                };
                calls.push(json!({ "id": id, "type": "function", "function": { "name": name, "arguments": input } }));
            }
            "thinking" | "redacted_thinking" => {}
            other => return Err(unsupported(&bpath, format!("block type `{other}`"))),
        }
    }
    let content = match texts.as_slice() {
        [] if !calls.is_empty() => Value::Null,
        [] => json!(""),
        [only] => only["text"].clone(),
        _ => Value::Array(texts),
    };
    let mut msg = json!({ "role": "assistant", "content": content });
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    Ok(msg)
}

/// `tools`, `tool_choice` and `disable_parallel_tool_use`.
fn convert_tools(req: &Obj, out: &mut Obj) -> Result<(), TranslateError> {
    let mut tools = Vec::new();
    for (i, tool) in opt_array(req, "tools", "")?.into_iter().flatten().enumerate() {
        let path = index("tools", i);
        let tool = as_object(tool, &path)?;
        if let Some(kind) = opt_str(tool, "type", &path)? {
            if kind != "custom" {
                return Err(unsupported(&join(&path, "type"), format!("tool type `{kind}`")));
            }
        }
        let mut f = Obj::new();
        f.insert("name".into(), json!(req_str(tool, "name", &path)?));
        if let Some(d) = opt_str(tool, "description", &path)? {
            f.insert("description".into(), json!(d));
        }
        let schema = opt_object(tool, "input_schema", &path)?
            .ok_or_else(|| TranslateError::Missing { field: join(&path, "input_schema") })?;
        f.insert("parameters".into(), Value::Object(schema.clone()));
        tools.push(json!({ "type": "function", "function": f }));
    }

    let mut parallel = None;
    let choice = match opt_object(req, "tool_choice", "")? {
        None => None,
        Some(c) => {
            if opt_bool(c, "disable_parallel_tool_use", "tool_choice")? == Some(true) {
                parallel = Some(false);
            }
            Some(match req_str(c, "type", "tool_choice")? {
                "auto" => json!("auto"),
                "any" => json!("required"),
                "none" => json!("none"),
                "tool" => json!({ "type": "function", "function": { "name": req_str(c, "name", "tool_choice")? } }),
                other => {
                    return Err(TranslateError::Invalid {
                        field: "tool_choice.type".into(),
                        reason: format!("unknown value `{other}`"),
                    })
                }
            })
        }
    };
    if tools.is_empty() {
        // OpenAI rejects tool_choice and parallel_tool_calls without tools.
        return Ok(());
    }
    out.insert("tools".into(), Value::Array(tools));
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    if let Some(p) = parallel {
        out.insert("parallel_tool_calls".into(), json!(p));
    }
    Ok(())
}
