//! The Gemini API (`/v1beta/models/{model}:generateContent`, `:streamGenerateContent`,
//! `:countTokens`) as the mock speaks it: `GenerateContentResponse` with `usageMetadata`
//! (including `thoughtsTokenCount` and `cachedContentTokenCount`), streamed as SSE `data:` chunks
//! (`?alt=sse`, CRLF-framed like Google's servers) or as one JSON array, and Google's
//! `{"error":{"code","message","status"}}` error shape.
//!
//! Replies are pure functions of the request; formulas on [`reply_for`].

use serde_json::{json, Value};

use crate::openai::{tool_echo_words, Tool};
use crate::wire::{self, Hasher};

/// One `contents[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// `role` (`user` when absent, or `model`).
    pub role: String,
    /// Parts' text joined with newlines (`text` as is, `functionCall` as `name args-json`,
    /// `functionResponse` as its `response` JSON).
    pub text: String,
    /// The `functionResponse` parts' text, when there are any.
    pub function_response: Option<String>,
}

/// The parts of a generateContent / countTokens request that decide the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateRequest {
    /// The model from the URL path (`models/{model}:...`).
    pub model: String,
    /// `systemInstruction` text.
    pub system: Option<String>,
    /// `contents`.
    pub contents: Vec<Content>,
    /// `generationConfig.maxOutputTokens`: caps the reply's words.
    pub max_output_tokens: Option<u32>,
    /// `tools[].functionDeclarations[]`, as `(name, parameters)`.
    pub tools: Vec<Tool>,
}

fn parts_text(parts: Option<&Value>) -> (String, Option<String>) {
    let (mut texts, mut responses) = (Vec::new(), Vec::new());
    for p in parts.and_then(Value::as_array).into_iter().flatten() {
        if let Some(t) = p.get("text").and_then(Value::as_str) {
            texts.push(t.to_string());
        } else if let Some(fc) = p.get("functionCall") {
            let name = fc.get("name").and_then(Value::as_str).unwrap_or("");
            texts.push(format!("{name} {}", fc.get("args").map(Value::to_string).unwrap_or_default()));
        } else if let Some(fr) = p.get("functionResponse") {
            let t = fr.get("response").map(Value::to_string).unwrap_or_default();
            texts.push(t.clone());
            responses.push(t);
        }
    }
    (texts.join("\n"), (!responses.is_empty()).then(|| responses.join("\n")))
}

impl GenerateRequest {
    /// A request with one user text part.
    pub fn simple(model: &str, user: &str) -> Self {
        GenerateRequest {
            model: model.into(),
            system: None,
            contents: vec![Content { role: "user".into(), text: user.into(), function_response: None }],
            max_output_tokens: None,
            tools: Vec::new(),
        }
    }

    /// Parse a request body for `model`; `Err` is the message of a 400 `INVALID_ARGUMENT`. A
    /// countTokens body may wrap the request in `generateContentRequest`.
    pub fn from_json(model: &str, v: &Value) -> Result<Self, String> {
        let v = v.get("generateContentRequest").unwrap_or(v);
        let raw = v
            .get("contents")
            .and_then(Value::as_array)
            .ok_or("* GenerateContentRequest.contents: contents is not specified")?;
        let contents = raw
            .iter()
            .map(|c| {
                let (text, function_response) = parts_text(c.get("parts"));
                let role = c.get("role").and_then(Value::as_str).unwrap_or("user").to_string();
                Content { role, text, function_response }
            })
            .collect();
        let system =
            v.get("systemInstruction").or_else(|| v.get("system_instruction")).map(|s| parts_text(s.get("parts")).0);
        let tools = v
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| t.get("functionDeclarations").or_else(|| t.get("function_declarations")))
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(|d| {
                let params = d.get("parameters").or_else(|| d.get("parametersJsonSchema")).cloned();
                Some(Tool { name: d.get("name")?.as_str()?.to_string(), parameters: params })
            })
            .collect();
        let cfg = v.get("generationConfig").or_else(|| v.get("generation_config"));
        let max_output_tokens = cfg
            .and_then(|c| c.get("maxOutputTokens").or_else(|| c.get("max_output_tokens")))
            .and_then(Value::as_u64)
            .map(|n| n.clamp(1, 65536) as u32);
        Ok(GenerateRequest { model: model.into(), system, contents, max_output_tokens, tools })
    }

    /// `promptTokenCount` (and countTokens' `totalTokens`): `2 + Σ(2 + words(text))` over the
    /// system instruction (when given) and every content, `+ 8 × tools`.
    pub fn prompt_tokens(&self) -> u64 {
        2 + self.system.iter().map(|s| 2 + wire::count_words(s)).sum::<u64>()
            + self.contents.iter().map(|c| 2 + wire::count_words(&c.text)).sum::<u64>()
            + 8 * self.tools.len() as u64
    }
}

/// What the mock answers to a [`GenerateRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `responseId`.
    pub response_id: String,
    /// `modelVersion` (the model from the path).
    pub model: String,
    /// The reply text (empty for a function call).
    pub text: String,
    /// `text` as streamed, one chunk per word.
    pub words: Vec<String>,
    /// `(name, args)` when the mock answers with a `functionCall` part.
    pub function_call: Option<(String, Value)>,
    /// `STOP` or `MAX_TOKENS`.
    pub finish_reason: &'static str,
    /// `usageMetadata.promptTokenCount`.
    pub prompt_tokens: u64,
    /// `usageMetadata.candidatesTokenCount`.
    pub candidates_tokens: u64,
    /// `usageMetadata.thoughtsTokenCount`.
    pub thoughts_tokens: u64,
    /// `usageMetadata.cachedContentTokenCount` (part of the prompt).
    pub cached_tokens: u64,
}

impl Reply {
    /// `usageMetadata.totalTokenCount`: prompt + candidates + thoughts.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.candidates_tokens + self.thoughts_tokens
    }
}

/// Deterministic reply.
///
/// * `h` = FNV-1a salted `"gemini"`, then the model, `\0 system \0 text` when given, per content
///   `\0 role \0 text`, per tool `\0 tool \0 name`.
/// * `promptTokenCount` = [`GenerateRequest::prompt_tokens`];
///   `cachedContentTokenCount = prompt / 5`.
/// * Visible output `v`: `functionCall` of the first declared function (tools given and the last
///   content is `user` without a `functionResponse`) → `10 + len(args json) / 4`; after a
///   `functionResponse` → words of the echo text; otherwise `min(maxOutputTokens, 8 + h % 9)`
///   words (`MAX_TOKENS` when cut short).
/// * `candidatesTokenCount = v`, `thoughtsTokenCount = v / 2`,
///   `totalTokenCount = prompt + candidates + thoughts`.
pub fn reply_for(req: &GenerateRequest) -> Reply {
    let mut hs = Hasher::salted("gemini");
    hs.bytes(req.model.as_bytes());
    if let Some(s) = &req.system {
        hs.message("system", s);
    }
    for c in &req.contents {
        hs.message(&c.role, &c.text);
    }
    for t in &req.tools {
        hs.message("tool", &t.name);
    }
    let h = hs.finish();
    let last = req.contents.last();
    let response = last.and_then(|c| c.function_response.as_deref());
    let (words, function_call, finish) = match (req.tools.first(), response) {
        (Some(t), None) if last.is_some_and(|c| c.role == "user") => {
            (Vec::new(), Some((t.name.clone(), wire::args_for_schema(t.parameters.as_ref(), h))), "STOP")
        }
        (_, Some(r)) => (tool_echo_words(r), None, "STOP"),
        _ => {
            let natural = wire::natural_len(h);
            let n = req.max_output_tokens.map(u64::from).unwrap_or(u64::MAX).min(natural);
            (wire::words(h, n), None, if n < natural { "MAX_TOKENS" } else { "STOP" })
        }
    };
    let v = match &function_call {
        Some((_, args)) => wire::tool_call_tokens(&args.to_string()),
        None => words.len() as u64,
    };
    let prompt = req.prompt_tokens();
    Reply {
        response_id: format!("mock{h:016x}"),
        model: req.model.clone(),
        text: words.concat(),
        words,
        function_call,
        finish_reason: finish,
        prompt_tokens: prompt,
        candidates_tokens: v,
        thoughts_tokens: v / 2,
        cached_tokens: prompt / 5,
    }
}

fn usage_json(r: &Reply, candidates: u64) -> Value {
    json!({
        "promptTokenCount": r.prompt_tokens,
        "candidatesTokenCount": candidates,
        "totalTokenCount": r.prompt_tokens + candidates + r.thoughts_tokens,
        "cachedContentTokenCount": r.cached_tokens,
        "thoughtsTokenCount": r.thoughts_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": r.prompt_tokens}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": r.cached_tokens}]
    })
}

fn response_json(r: &Reply, part: Value, finish: bool, candidates: u64) -> Value {
    let mut cand = json!({"content": {"parts": [part], "role": "model"}, "index": 0});
    if finish {
        cand["finishReason"] = json!(r.finish_reason);
    }
    json!({
        "candidates": [cand],
        "usageMetadata": usage_json(r, candidates),
        "modelVersion": r.model,
        "responseId": r.response_id
    })
}

fn answer_part(r: &Reply) -> Value {
    match &r.function_call {
        Some((name, args)) => json!({"functionCall": {"name": name, "args": args}}),
        None => json!({"text": r.text}),
    }
}

/// Body of the non-streaming generateContent response.
pub fn generate_body(r: &Reply) -> Vec<u8> {
    serde_json::to_vec(&response_json(r, answer_part(r), true, r.candidates_tokens)).expect("json")
}

/// The streamed `GenerateContentResponse` chunks: one per word (a function call is one chunk),
/// each with cumulative `usageMetadata`; the last carries `finishReason` and the final usage.
pub fn stream_chunks(r: &Reply) -> Vec<Value> {
    if r.function_call.is_some() {
        return vec![response_json(r, answer_part(r), true, r.candidates_tokens)];
    }
    let n = r.words.len();
    r.words.iter().enumerate().map(|(i, w)| response_json(r, json!({"text": w}), i + 1 == n, i as u64 + 1)).collect()
}

/// `?alt=sse` events: `data: JSON\r\n\r\n` per chunk, no terminator event.
pub fn sse_events(r: &Reply) -> Vec<String> {
    stream_chunks(r).iter().map(|c| format!("data: {}\r\n\r\n", serde_json::to_string(c).expect("json"))).collect()
}

/// Without `alt=sse`: pieces of one JSON array (`[`, chunks separated by `,\r\n`, `]`).
pub fn json_array_pieces(r: &Reply) -> Vec<String> {
    let chunks = stream_chunks(r);
    let last = chunks.len().saturating_sub(1);
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let open = if i == 0 { "[" } else { "" };
            let close = if i == last { "]" } else { ",\r\n" };
            format!("{open}{}{close}", serde_json::to_string(c).expect("json"))
        })
        .collect()
}

/// Body of a countTokens response.
pub fn count_tokens_body(req: &GenerateRequest) -> Vec<u8> {
    let n = req.prompt_tokens();
    serde_json::to_vec(&json!({"totalTokens": n, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": n}]}))
        .expect("json")
}

/// The google.rpc status name for an HTTP status.
pub fn status_name(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// A Google API error body: `{"error":{"code":..,"message":..,"status":..}}`.
pub fn error_body(status: u16, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"error": {"code": status, "message": message, "status": status_name(status)}}))
        .expect("json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_and_stream_are_consistent() {
        let q = GenerateRequest::from_json("gemini-2.5-flash", &json!({"contents": [{"parts": [{"text": "hi you"}]}]}))
            .unwrap();
        assert_eq!(q, GenerateRequest::simple("gemini-2.5-flash", "hi you"));
        let r = reply_for(&q);
        assert_eq!(r.prompt_tokens, 2 + 2 + 2);
        assert_eq!(r.total_tokens(), r.prompt_tokens + r.candidates_tokens + r.thoughts_tokens);
        let chunks = stream_chunks(&r);
        assert_eq!(chunks.len(), r.words.len());
        let last = chunks.last().unwrap();
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert_eq!(last["usageMetadata"]["totalTokenCount"], json!(r.total_tokens()));
        assert!(chunks[0]["candidates"][0].get("finishReason").is_none());
        let arr: Value = serde_json::from_str(&json_array_pieces(&r).concat()).unwrap();
        assert_eq!(arr.as_array().unwrap().len(), chunks.len());
    }

    #[test]
    fn function_call_then_response() {
        let decl = json!({
            "name": "get_weather",
            "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}
        });
        let v = json!({
            "contents": [{"role": "user", "parts": [{"text": "weather?"}]}],
            "tools": [{"functionDeclarations": [decl]}]
        });
        let r = reply_for(&GenerateRequest::from_json("g", &v).unwrap());
        let (name, args) = r.function_call.clone().unwrap();
        assert_eq!(name, "get_weather");
        assert!(args["city"].is_string());
        let mut v2 = v.clone();
        v2["contents"].as_array_mut().unwrap().extend([
            json!({"role": "model", "parts": [{"functionCall": {"name": name, "args": args}}]}),
            json!({"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"t": 1}}}]}),
        ]);
        let r2 = reply_for(&GenerateRequest::from_json("g", &v2).unwrap());
        assert_eq!(r2.text, "The tool returned: {\"t\":1}");
    }
}
