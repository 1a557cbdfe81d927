//! Non-streamed responses: Anthropic `Message` ↔ OpenAI `ChatCompletion`.
//!
//! Text blocks are concatenated into the single assistant `content` string (Anthropic splits
//! text around citations, so no separator is added); `tool_use` blocks ↔ `tool_calls`; stop
//! reasons and usage go through the shared mappings. Blocks with no OpenAI counterpart
//! (thinking, server-tool results) are dropped rather than failing the whole response.

use serde_json::{json, Value};

use super::common::{
    chat_id, encode, finish_reason_from_stop_reason, index, join, message_id, now_secs, parse_arguments, parse_object,
    req_array, stop_reason_from_finish_reason, text, Obj, Tokens,
};
use super::TranslateError;

/// Translate a non-streamed Anthropic `Message` body into an OpenAI `ChatCompletion` body.
/// `client_model` is echoed as `model` (the name the agent asked for), or `None` to keep the
/// upstream's.
pub fn messages_response_to_chat(body: &[u8], client_model: Option<&str>) -> Result<Vec<u8>, TranslateError> {
    let msg = parse_object(body)?;
    if let Some(kind) = text(&msg, "type") {
        if kind != "message" {
            return Err(TranslateError::Invalid {
                field: "type".into(),
                reason: format!("expected `message`, got `{kind}`"),
            });
        }
    }
    let blocks = req_array(&msg, "content", "")?;
    let mut content = String::new();
    let mut calls = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let Some(b) = b.as_object() else { continue };
        match text(b, "type") {
            Some("text") => content.push_str(text(b, "text").unwrap_or("")),
            Some("tool_use") => {
                let path = index("content", i);
                let id = text(b, "id").ok_or_else(|| TranslateError::Missing { field: join(&path, "id") })?;
                let name = text(b, "name").ok_or_else(|| TranslateError::Missing { field: join(&path, "name") })?;
                let args = b.get("input").filter(|v| !v.is_null()).map_or_else(|| "{}".to_string(), Value::to_string);
                calls.push(json!({ "id": id, "type": "function", "function": { "name": name, "arguments": args } }));
            }
            _ => {}
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if content.is_empty() && !calls.is_empty() { Value::Null } else { json!(content) },
        "refusal": null,
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let usage = Tokens::from_anthropic(msg.get("usage").and_then(Value::as_object));
    let out = json!({
        "id": chat_id(text(&msg, "id")),
        "object": "chat.completion",
        "created": now_secs(),
        "model": client_model.or_else(|| text(&msg, "model")).unwrap_or(""),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason_from_stop_reason(text(&msg, "stop_reason")),
        }],
        "usage": usage.to_openai(),
    });
    Ok(encode(&out))
}

/// Translate a non-streamed OpenAI `ChatCompletion` body into an Anthropic `Message` body. Only
/// the first choice is kept. `client_model` is echoed as `model`, or `None` to keep the
/// upstream's.
pub fn chat_response_to_messages(body: &[u8], client_model: Option<&str>) -> Result<Vec<u8>, TranslateError> {
    let resp = parse_object(body)?;
    let choices = req_array(&resp, "choices", "")?;
    let choice =
        choices.iter().filter_map(Value::as_object).find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0);
    let mut blocks = Vec::new();
    let mut stop_reason = "end_turn";
    if let Some(choice) = choice {
        stop_reason = stop_reason_from_finish_reason(text(choice, "finish_reason"));
        if let Some(message) = choice.get("message").and_then(Value::as_object) {
            if let Some(t) = text(message, "content").filter(|t| !t.is_empty()) {
                blocks.push(json!({ "type": "text", "text": t }));
            }
            if let Some(r) = text(message, "refusal").filter(|t| !t.is_empty()) {
                blocks.push(json!({ "type": "text", "text": r }));
                stop_reason = "refusal";
            }
            let calls = message.get("tool_calls").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
            for (k, call) in calls.iter().enumerate() {
                let path = index("choices[0].message.tool_calls", k);
                if let Some(block) = tool_use_block(call, &path)? {
                    blocks.push(block);
                }
            }
        }
    }
    let usage = Tokens::from_openai(resp.get("usage").and_then(Value::as_object));
    let out = json!({
        "id": message_id(text(&resp, "id")),
        "type": "message",
        "role": "assistant",
        "model": client_model.or_else(|| text(&resp, "model")).unwrap_or(""),
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": usage.to_anthropic(),
    });
    Ok(encode(&out))
}

/// A response `tool_calls[k]` → `tool_use` block; non-function calls are skipped.
fn tool_use_block(call: &Value, path: &str) -> Result<Option<Value>, TranslateError> {
    let Some(call) = call.as_object() else { return Ok(None) };
    if text(call, "type").is_some_and(|t| t != "function") {
        return Ok(None);
    }
    let id = text(call, "id").ok_or_else(|| TranslateError::Missing { field: join(path, "id") })?;
    let function: Option<&Obj> = call.get("function").and_then(Value::as_object);
    let name = function
        .and_then(|f| text(f, "name"))
        .ok_or_else(|| TranslateError::Missing { field: join(path, "function.name") })?;
    let args = function.and_then(|f| text(f, "arguments")).unwrap_or("");
    let input = parse_arguments(args, &join(path, "function.arguments"))?;
    Ok(Some(json!({ "type": "tool_use", "id": id, "name": name, "input": input })))
}
