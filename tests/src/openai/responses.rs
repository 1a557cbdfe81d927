//! The OpenAI Responses API (`POST /v1/responses`) as the mock speaks it: the `response` object,
//! and the streamed lifecycle (`response.created` … `response.completed`, each event with
//! `event:` and `data:` lines and a `sequence_number`).
//!
//! Replies are a pure function of the request, as for chat (see [`reply_for`] for the formulas),
//! so tests can assert exact usage numbers and texts.

use serde_json::{json, Value};

use super::{tool_echo_words, Tool, ToolCall};
use crate::wire::{self, Hasher};

/// The parts of a Responses request that decide the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsesRequest {
    /// `model`.
    pub model: String,
    /// `instructions`, when given.
    pub instructions: Option<String>,
    /// `(role, text)` per input item: a string `input` is one `user` item; `function_call_output`
    /// items are role `tool` with their output; `function_call` items role `assistant` with their
    /// arguments; other items their `type` with no text.
    pub items: Vec<(String, String)>,
    /// `stream`.
    pub stream: bool,
    /// `max_output_tokens`: caps the reply's words.
    pub max_output_tokens: Option<u32>,
    /// Function tools (`tools[]` with `type: "function"`).
    pub tools: Vec<Tool>,
    /// `tools` exactly as sent, echoed in the response object.
    pub tools_json: Value,
}

impl ResponsesRequest {
    /// A non-streaming request with a string input.
    pub fn simple(model: &str, input: &str) -> Self {
        ResponsesRequest {
            model: model.into(),
            instructions: None,
            items: vec![("user".into(), input.into())],
            stream: false,
            max_output_tokens: None,
            tools: Vec::new(),
            tools_json: json!([]),
        }
    }

    /// Parse a request body; `Err` is the message of a 400 response.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let model = v.get("model").and_then(Value::as_str).ok_or("Missing required parameter: 'model'.")?;
        let mut items = Vec::new();
        match v.get("input") {
            Some(Value::String(s)) => items.push(("user".to_string(), s.clone())),
            Some(Value::Array(a)) => {
                for it in a {
                    let ty = it.get("type").and_then(Value::as_str).unwrap_or("message");
                    let item = match (ty, it.get("role").and_then(Value::as_str)) {
                        ("message", Some(role)) => (role.to_string(), wire::text_of(it.get("content"))),
                        ("function_call_output", _) => ("tool".to_string(), output_text(it.get("output"))),
                        ("function_call", _) => {
                            ("assistant".to_string(), it.get("arguments").and_then(Value::as_str).unwrap_or("").into())
                        }
                        (other, _) => (other.to_string(), String::new()),
                    };
                    items.push(item);
                }
            }
            None => {}
            Some(_) => return Err("Invalid type for 'input'.".into()),
        }
        let instructions = v.get("instructions").and_then(Value::as_str).map(str::to_string);
        if items.is_empty() && instructions.is_none() {
            return Err("Missing required parameter: 'input'.".into());
        }
        let tools_json = v.get("tools").cloned().unwrap_or_else(|| json!([]));
        let tools = tools_json
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
            .filter_map(|t| {
                Some(Tool { name: t.get("name")?.as_str()?.to_string(), parameters: t.get("parameters").cloned() })
            })
            .collect();
        Ok(ResponsesRequest {
            model: model.into(),
            instructions,
            items,
            stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
            max_output_tokens: v.get("max_output_tokens").and_then(Value::as_u64).map(|n| n.clamp(1, 8192) as u32),
            tools,
            tools_json,
        })
    }
}

fn output_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        other => wire::text_of(other),
    }
}

/// What the mock answers to a [`ResponsesRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsesReply {
    /// `resp_...`.
    pub id: String,
    /// `msg_...` (text) or `fc_...` (function call): the output item's id.
    pub item_id: String,
    /// Unix seconds, derived from the request.
    pub created_at: u64,
    /// Echo of the requested model.
    pub model: String,
    /// Output text (empty for a function call).
    pub text: String,
    /// `text` as streamed, one `response.output_text.delta` per word.
    pub words: Vec<String>,
    /// Set when the mock calls a tool instead of answering.
    pub tool_call: Option<ToolCall>,
    /// `usage.input_tokens`.
    pub input_tokens: u64,
    /// `usage.input_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// `usage.output_tokens` (visible + reasoning).
    pub output_tokens: u64,
    /// `usage.output_tokens_details.reasoning_tokens`.
    pub reasoning_tokens: u64,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    tools_json: Value,
}

impl ResponsesReply {
    /// `usage.total_tokens`.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

/// Deterministic reply for a Responses request.
///
/// * `h` = FNV-1a salted `"responses"`, then the model, `\0 instructions \0 text` when given, per
///   item `\0 role \0 text`, per tool `\0 tool \0 name`.
/// * `input_tokens = 5 + Σ(4 + words(text))` over instructions and items `+ 10 × tools`;
///   `cached_tokens = input / 2`.
/// * Visible output `v`: tool call (tools offered and the last item is `user`) →
///   `10 + len(arguments) / 4`; after a `function_call_output` → words of the echo text;
///   otherwise `min(max_output_tokens, 8 + h % 9)` words.
/// * `reasoning_tokens = v / 2`, `output_tokens = v + reasoning`, `total = input + output`.
pub fn reply_for(req: &ResponsesRequest) -> ResponsesReply {
    let mut hs = Hasher::salted("responses");
    hs.bytes(req.model.as_bytes());
    let mut texts: Vec<&str> = Vec::new();
    if let Some(i) = &req.instructions {
        hs.message("instructions", i);
        texts.push(i);
    }
    for (role, text) in &req.items {
        hs.message(role, text);
        texts.push(text);
    }
    for t in &req.tools {
        hs.message("tool", &t.name);
    }
    let h = hs.finish();
    let last_role = req.items.last().map(|(r, _)| r.as_str());
    let (words, tool_call) = match (req.tools.first(), last_role) {
        (Some(t), Some("user")) => (Vec::new(), Some(ToolCall::new("call_", t, h))),
        (_, Some("tool")) => (tool_echo_words(&req.items.last().expect("last").1), None),
        _ => {
            let n = req.max_output_tokens.map(u64::from).unwrap_or(u64::MAX).min(wire::natural_len(h));
            (wire::words(h, n), None)
        }
    };
    let visible = match &tool_call {
        Some(c) => wire::tool_call_tokens(&c.arguments),
        None => words.len() as u64,
    };
    let input_tokens = 5 + texts.iter().map(|t| 4 + wire::count_words(t)).sum::<u64>() + 10 * req.tools.len() as u64;
    let reasoning_tokens = visible / 2;
    ResponsesReply {
        id: format!("resp_mock{h:016x}"),
        item_id: if tool_call.is_some() { format!("fc_mock{h:016x}") } else { format!("msg_mock{h:016x}") },
        created_at: 1_700_000_000 + h % 10_000_000,
        model: req.model.clone(),
        text: words.concat(),
        words,
        tool_call,
        input_tokens,
        cached_tokens: input_tokens / 2,
        output_tokens: visible + reasoning_tokens,
        reasoning_tokens,
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        tools_json: req.tools_json.clone(),
    }
}

fn usage_json(r: &ResponsesReply) -> Value {
    json!({
        "input_tokens": r.input_tokens,
        "input_tokens_details": {"cached_tokens": r.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": r.output_tokens,
        "output_tokens_details": {"reasoning_tokens": r.reasoning_tokens},
        "total_tokens": r.total_tokens()
    })
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
}

/// The output item, `in_progress` (as first announced) or `completed`.
fn item_json(r: &ResponsesReply, done: bool) -> Value {
    let status = if done { "completed" } else { "in_progress" };
    match &r.tool_call {
        Some(c) => json!({
            "id": r.item_id,
            "type": "function_call",
            "status": status,
            "arguments": if done { c.arguments.as_str() } else { "" },
            "call_id": c.id,
            "name": c.name
        }),
        None => json!({
            "id": r.item_id,
            "type": "message",
            "status": status,
            "content": if done { json!([text_part(&r.text)]) } else { json!([]) },
            "role": "assistant"
        }),
    }
}

/// The `response` object: `completed` with output and usage, or as first announced
/// (`in_progress`, no output, `usage: null`).
pub fn response_json(r: &ResponsesReply, done: bool) -> Value {
    json!({
        "id": r.id,
        "object": "response",
        "created_at": r.created_at,
        "status": if done { "completed" } else { "in_progress" },
        "background": false,
        "completed_at": if done { json!(r.created_at + 1) } else { Value::Null },
        "error": null,
        "incomplete_details": null,
        "instructions": r.instructions,
        "max_output_tokens": r.max_output_tokens,
        "max_tool_calls": null,
        "model": r.model,
        "output": if done { json!([item_json(r, true)]) } else { json!([]) },
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "service_tier": "default",
        "store": true,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": r.tools_json,
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": if done { usage_json(r) } else { Value::Null },
        "user": null,
        "metadata": {}
    })
}

/// Body of the non-streaming response.
pub fn response_body(r: &ResponsesReply) -> Vec<u8> {
    let mut b = serde_json::to_vec(&response_json(r, true)).expect("json");
    b.push(b'\n');
    b
}

/// The streamed events, each a complete `event: TYPE\ndata: JSON\n\n`, numbered from 0:
/// `response.created`, `response.in_progress`, `response.output_item.added`, then for text
/// `response.content_part.added`, one `response.output_text.delta` per word,
/// `response.output_text.done`, `response.content_part.done` (for a tool call instead one
/// `response.function_call_arguments.delta` per fragment and `…arguments.done`), then
/// `response.output_item.done` and `response.completed` (with usage).
pub fn stream_events(r: &ResponsesReply) -> Vec<String> {
    let mut evs: Vec<Value> = vec![
        json!({"type": "response.created", "response": response_json(r, false)}),
        json!({"type": "response.in_progress", "response": response_json(r, false)}),
        json!({"type": "response.output_item.added", "output_index": 0, "item": item_json(r, false)}),
    ];
    let at = |ty: &str| json!({"type": ty, "item_id": r.item_id, "output_index": 0});
    match &r.tool_call {
        None => {
            let mut e = at("response.content_part.added");
            e["content_index"] = json!(0);
            e["part"] = text_part("");
            evs.push(e);
            for w in &r.words {
                let mut e = at("response.output_text.delta");
                e["content_index"] = json!(0);
                e["delta"] = json!(w);
                e["logprobs"] = json!([]);
                evs.push(e);
            }
            let mut e = at("response.output_text.done");
            e["content_index"] = json!(0);
            e["text"] = json!(r.text);
            e["logprobs"] = json!([]);
            evs.push(e);
            let mut e = at("response.content_part.done");
            e["content_index"] = json!(0);
            e["part"] = text_part(&r.text);
            evs.push(e);
        }
        Some(c) => {
            for f in &c.fragments {
                let mut e = at("response.function_call_arguments.delta");
                e["delta"] = json!(f);
                evs.push(e);
            }
            let mut e = at("response.function_call_arguments.done");
            e["arguments"] = json!(c.arguments);
            evs.push(e);
        }
    }
    evs.push(json!({"type": "response.output_item.done", "output_index": 0, "item": item_json(r, true)}));
    evs.push(json!({"type": "response.completed", "response": response_json(r, true)}));
    evs.into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e["sequence_number"] = json!(i);
            let ty = e["type"].as_str().expect("type").to_string();
            format!("event: {ty}\ndata: {}\n\n", serde_json::to_string(&e).expect("json"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(ev: &str) -> Value {
        let line = ev.lines().find_map(|l| l.strip_prefix("data: ")).expect("data line");
        serde_json::from_str(line).expect("json")
    }

    #[test]
    fn text_stream_shape_and_usage() {
        let q = ResponsesRequest::from_json(&json!({"model": "m", "input": "two words", "stream": true})).unwrap();
        let r = reply_for(&q);
        assert_eq!(r.input_tokens, 5 + 4 + 2);
        let v = r.words.len() as u64;
        assert_eq!((r.output_tokens, r.reasoning_tokens), (v + v / 2, v / 2));
        let ev = stream_events(&r);
        assert_eq!(ev.len(), r.words.len() + 8);
        assert!(ev[0].starts_with("event: response.created\n"));
        let last = data(ev.last().unwrap());
        assert_eq!(last["sequence_number"], json!(ev.len() - 1));
        assert_eq!(last["response"]["usage"]["output_tokens_details"]["reasoning_tokens"], json!(r.reasoning_tokens));
        let text: String = ev
            .iter()
            .map(|e| data(e))
            .filter(|d| d["type"] == "response.output_text.delta")
            .map(|d| d["delta"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(text, r.text);
    }

    #[test]
    fn tool_call_then_echo() {
        let tools = json!([{"type": "function", "name": "get_weather", "parameters": Tool::get_weather().parameters}]);
        let q = ResponsesRequest::from_json(&json!({"model": "m", "input": "weather?", "tools": tools})).unwrap();
        let r = reply_for(&q);
        let c = r.tool_call.as_ref().expect("call");
        let body: Value = serde_json::from_slice(&response_body(&r)).unwrap();
        assert_eq!(body["output"][0]["type"], "function_call");
        assert_eq!(body["output"][0]["arguments"], json!(c.arguments));
        let q2 = ResponsesRequest::from_json(&json!({"model": "m", "tools": tools, "input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": c.id, "name": c.name, "arguments": c.arguments},
            {"type": "function_call_output", "call_id": c.id, "output": "sunny"}
        ]}))
        .unwrap();
        assert_eq!(reply_for(&q2).text, "The tool returned: sunny");
    }
}
