//! Prompt decorator: messages an operator adds to every request (house rules, a disclaimer,
//! a closing reminder), written in the caller's own API shape so the provider sees one
//! ordinary prompt.
//!
//! Placement per API:
//! - OpenAI chat: `{role, content}` entries at the start / end of `messages` (`system` stays a
//!   `system` message).
//! - OpenAI Responses: the same entries in `input` (a string `input` first becomes one user
//!   message).
//! - Anthropic: `system` text goes into `system` (a string becomes text blocks so the
//!   original stays byte-for-byte); `user`/`assistant` become entries of `messages`.
//! - Gemini: `system` text goes into `systemInstruction.parts` (created when absent); `user`
//!   and `assistant` become `contents` entries with role `user` / `model`.
//!
//! Other APIs (embeddings, legacy completions, token counting on Gemini) are left unchanged.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::config::guards::{DecorateGuardConfig, DecorationRole};
use crate::protocol::llm::api::Api;

/// Why a body could not be decorated (it is then forwarded undecorated or refused, at the
/// caller's choice).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecorateError {
    /// The body is not a JSON object.
    #[error("request body is not a JSON object")]
    NotAnObject,
    /// A field the decoration goes into has an unexpected type.
    #[error("{field}: expected {expected}")]
    Field {
        /// The field (`messages`, `system`, ...).
        field: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
    /// The config has nothing to add (refused at load).
    #[error("prepend: a decorate guard needs at least one message in prepend or append")]
    Empty,
}

/// A compiled decorate guard.
#[derive(Debug)]
pub struct Decorator {
    pub(crate) name: Arc<str>,
    prepend: Vec<(DecorationRole, String)>,
    append: Vec<(DecorationRole, String)>,
}

/// Where an added message goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Start,
    End,
}

impl Decorator {
    /// Build from config.
    pub fn new(cfg: &DecorateGuardConfig) -> Result<Self, DecorateError> {
        if cfg.prepend.is_empty() && cfg.append.is_empty() {
            return Err(DecorateError::Empty);
        }
        let list =
            |l: &[crate::config::guards::DecorationMessage]| l.iter().map(|m| (m.role, m.content.clone())).collect();
        Ok(Decorator { name: Arc::from(cfg.name.as_str()), prepend: list(&cfg.prepend), append: list(&cfg.append) })
    }

    /// Add the messages to `body` of `api`. `Ok(true)` when the body changed. On error the body
    /// is unchanged.
    pub fn apply(&self, api: Api, body: &mut Value) -> Result<bool, DecorateError> {
        let Value::Object(top) = body else { return Err(DecorateError::NotAnObject) };
        let shape = match api {
            Api::OpenAiChat => openai_chat,
            Api::OpenAiResponses => openai_responses,
            Api::AnthropicMessages | Api::AnthropicCountTokens => anthropic,
            Api::GeminiGenerate | Api::GeminiStreamGenerate => gemini,
            _ => return Ok(false),
        };
        shape(top, &[])?; // type check first, so an error leaves the body untouched
                          // Prepend in reverse so the configured order is kept at the start.
        for (role, text) in self.prepend.iter().rev() {
            shape(top, &[(End::Start, *role, text.as_str())])?;
        }
        for (role, text) in &self.append {
            shape(top, &[(End::End, *role, text.as_str())])?;
        }
        Ok(true)
    }
}

/// One addition request: which end, role, text. An empty slice only checks types.
type Add<'a> = [(End, DecorationRole, &'a str)];

/// `top[key]` as an array, created when absent.
fn array<'m>(
    top: &'m mut Map<String, Value>,
    key: &'static str,
    dry: bool,
) -> Result<Option<&'m mut Vec<Value>>, DecorateError> {
    if dry {
        return match top.get(key) {
            None | Some(Value::Array(_)) => Ok(None),
            Some(_) => Err(DecorateError::Field { field: key, expected: "an array" }),
        };
    }
    match top.entry(key).or_insert_with(|| Value::Array(Vec::new())) {
        Value::Array(a) => Ok(Some(a)),
        _ => Err(DecorateError::Field { field: key, expected: "an array" }),
    }
}

fn insert(list: &mut Vec<Value>, end: End, v: Value) {
    match end {
        End::Start => list.insert(0, v),
        End::End => list.push(v),
    }
}

fn openai_role(role: DecorationRole) -> &'static str {
    match role {
        DecorationRole::System => "system",
        DecorationRole::User => "user",
        DecorationRole::Assistant => "assistant",
    }
}

fn openai_chat(top: &mut Map<String, Value>, add: &Add<'_>) -> Result<(), DecorateError> {
    let list = array(top, "messages", add.is_empty())?;
    if let Some(list) = list {
        for &(end, role, text) in add {
            insert(list, end, json!({"role": openai_role(role), "content": text}));
        }
    }
    Ok(())
}

fn openai_responses(top: &mut Map<String, Value>, add: &Add<'_>) -> Result<(), DecorateError> {
    if add.is_empty() {
        return match top.get("input") {
            None | Some(Value::Array(_) | Value::String(_)) => Ok(()),
            Some(_) => Err(DecorateError::Field { field: "input", expected: "a string or an array" }),
        };
    }
    if let Some(Value::String(s)) = top.get_mut("input") {
        let text = std::mem::take(s);
        top.insert("input".into(), json!([{"role": "user", "content": text}]));
    }
    if let Some(list) = array(top, "input", false)? {
        for &(end, role, text) in add {
            insert(list, end, json!({"role": openai_role(role), "content": text}));
        }
    }
    Ok(())
}

fn anthropic(top: &mut Map<String, Value>, add: &Add<'_>) -> Result<(), DecorateError> {
    if add.is_empty() {
        if !matches!(top.get("system"), None | Some(Value::String(_) | Value::Array(_))) {
            return Err(DecorateError::Field { field: "system", expected: "a string or an array" });
        }
        return array(top, "messages", true).map(drop);
    }
    for &(end, role, text) in add {
        match role {
            DecorationRole::System => {
                let block = json!({"type": "text", "text": text});
                match top.get_mut("system") {
                    Some(Value::Array(blocks)) => insert(blocks, end, block),
                    Some(Value::String(s)) => {
                        let old = json!({"type": "text", "text": std::mem::take(s)});
                        let blocks = match end {
                            End::Start => vec![block, old],
                            End::End => vec![old, block],
                        };
                        top.insert("system".into(), Value::Array(blocks));
                    }
                    _ => {
                        top.insert("system".into(), json!(text));
                    }
                }
            }
            DecorationRole::User | DecorationRole::Assistant => {
                if let Some(list) = array(top, "messages", false)? {
                    insert(list, end, json!({"role": openai_role(role), "content": text}));
                }
            }
        }
    }
    Ok(())
}

fn gemini(top: &mut Map<String, Value>, add: &Add<'_>) -> Result<(), DecorateError> {
    let sys_key = if top.contains_key("system_instruction") { "system_instruction" } else { "systemInstruction" };
    if add.is_empty() {
        if !matches!(top.get(sys_key), None | Some(Value::Object(_))) {
            return Err(DecorateError::Field { field: "systemInstruction", expected: "an object" });
        }
        if let Some(Value::Object(si)) = top.get(sys_key) {
            if !matches!(si.get("parts"), None | Some(Value::Array(_))) {
                return Err(DecorateError::Field { field: "systemInstruction.parts", expected: "an array" });
            }
        }
        return array(top, "contents", true).map(drop);
    }
    for &(end, role, text) in add {
        let part = json!({"text": text});
        match role {
            DecorationRole::System => {
                let si = top.entry(sys_key).or_insert_with(|| json!({}));
                let Value::Object(si) = si else {
                    return Err(DecorateError::Field { field: "systemInstruction", expected: "an object" });
                };
                if let Some(parts) = array(si, "parts", false)? {
                    insert(parts, end, part);
                }
            }
            DecorationRole::User | DecorationRole::Assistant => {
                let r = if role == DecorationRole::User { "user" } else { "model" };
                if let Some(list) = array(top, "contents", false)? {
                    insert(list, end, json!({"role": r, "parts": [part]}));
                }
            }
        }
    }
    Ok(())
}
