//! OpenAI embeddings (`POST /v1/embeddings`, also Azure's `/openai/deployments/{dep}/embeddings`)
//! and legacy completions (`POST /v1/completions`) as the mock speaks them.
//!
//! Both are pure functions of the request, like chat; the formulas are on [`embeddings_usage`]
//! and [`completion_reply`].

use serde_json::{json, Value};

use crate::wire::{self, Hasher};

/// One embeddings input: text, or an array of token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingInput {
    /// A string input.
    Text(String),
    /// A token-id array input (its length is its token count).
    Tokens(Vec<u64>),
}

/// The parts of an embeddings request that decide the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingsRequest {
    /// `model`.
    pub model: String,
    /// `input`, normalised to a list.
    pub inputs: Vec<EmbeddingInput>,
    /// `dimensions`, default 8.
    pub dimensions: usize,
    /// `encoding_format == "base64"`: vectors as base64 little-endian f32.
    pub base64: bool,
}

impl EmbeddingsRequest {
    /// Parse a request body; `Err` is the message of a 400 response.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let model = v.get("model").and_then(Value::as_str).ok_or("you must provide a model parameter")?;
        let tokens = |a: &[Value]| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>();
        let inputs = match v.get("input") {
            Some(Value::String(s)) => vec![EmbeddingInput::Text(s.clone())],
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
                vec![EmbeddingInput::Tokens(tokens(a).expect("u64"))]
            }
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => Some(EmbeddingInput::Text(s.clone())),
                    Value::Array(t) => tokens(t).map(EmbeddingInput::Tokens),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or("'input' must be a string, an array of strings or an array of token arrays")?,
            _ => return Err("'input' is a required property".into()),
        };
        Ok(EmbeddingsRequest {
            model: model.into(),
            inputs,
            dimensions: v.get("dimensions").and_then(Value::as_u64).map(|d| d.clamp(1, 4096) as usize).unwrap_or(8),
            base64: v.get("encoding_format").and_then(Value::as_str) == Some("base64"),
        })
    }
}

/// `usage.prompt_tokens` (= `total_tokens`) of an embeddings request: `Σ (2 + words(text))` over
/// text inputs plus the length of each token-array input.
pub fn embeddings_usage(req: &EmbeddingsRequest) -> u64 {
    req.inputs
        .iter()
        .map(|i| match i {
            EmbeddingInput::Text(t) => 2 + wire::count_words(t),
            EmbeddingInput::Tokens(t) => t.len() as u64,
        })
        .sum()
}

/// The vector for input `i`: `dimensions` values `k / 1024` (`k` in -1024..1024, exact in f32
/// and in decimal) drawn from FNV-1a salted `"embeddings"` of the model and the input.
pub fn embedding_vector(req: &EmbeddingsRequest, i: usize) -> Vec<f32> {
    let mut h = Hasher::salted("embeddings");
    h.bytes(req.model.as_bytes());
    match &req.inputs[i] {
        EmbeddingInput::Text(t) => h.message("text", t),
        EmbeddingInput::Tokens(t) => h.message("tokens", &format!("{t:?}")),
    }
    let mut x = h.finish() | 1;
    (0..req.dimensions)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x % 2048) as i64 - 1024) as f32 / 1024.0
        })
        .collect()
}

/// Body of the embeddings response (`object: "list"`).
pub fn embeddings_body(req: &EmbeddingsRequest) -> Vec<u8> {
    let data: Vec<Value> = (0..req.inputs.len())
        .map(|i| {
            let v = embedding_vector(req, i);
            let emb = if req.base64 {
                json!(wire::base64(&v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>()))
            } else {
                json!(v.iter().map(|f| f64::from(*f)).collect::<Vec<f64>>())
            };
            json!({"object": "embedding", "index": i, "embedding": emb})
        })
        .collect();
    let n = embeddings_usage(req);
    let mut b = serde_json::to_vec(&json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": n, "total_tokens": n}
    }))
    .expect("json");
    b.push(b'\n');
    b
}

/// The parts of a legacy `POST /v1/completions` request that decide the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionRequest {
    /// `model`.
    pub model: String,
    /// `prompt`, normalised to a list of texts (token arrays become their ids joined by spaces).
    pub prompts: Vec<String>,
    /// `max_tokens`: exact number of words produced, as for chat.
    pub max_tokens: Option<u32>,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

impl CompletionRequest {
    /// Parse a request body; `Err` is the message of a 400 response.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let model = v.get("model").and_then(Value::as_str).ok_or("you must provide a model parameter")?;
        let one = |x: &Value| match x {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Array(a) => a.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" "),
            _ => String::new(),
        };
        let prompts = match v.get("prompt") {
            None | Some(Value::Null) => vec![String::new()],
            Some(Value::Array(a)) if a.iter().all(Value::is_u64) => vec![one(&Value::Array(a.clone()))],
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(x) => vec![one(x)],
        };
        Ok(CompletionRequest {
            model: model.into(),
            prompts,
            max_tokens: v.get("max_tokens").and_then(Value::as_u64).map(|n| n.clamp(1, 8192) as u32),
            stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: v
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }
}

/// What the mock answers to a [`CompletionRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionReply {
    /// `cmpl-...`.
    pub id: String,
    /// Unix seconds, derived from the request.
    pub created: u64,
    /// Echo of the model.
    pub model: String,
    /// `choices[0].text`.
    pub text: String,
    /// `text` as streamed, one chunk per word.
    pub words: Vec<String>,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
}

/// Deterministic legacy completion: `h` = FNV-1a salted `"completions"` of the model and each
/// prompt; `max_tokens` (else `8 + h % 9`) words; `prompt_tokens = 1 + Σ words(prompt)`,
/// `completion_tokens` = the word count, `total = prompt + completion`.
pub fn completion_reply(req: &CompletionRequest) -> CompletionReply {
    let mut hs = Hasher::salted("completions");
    hs.bytes(req.model.as_bytes());
    for p in &req.prompts {
        hs.message("prompt", p);
    }
    let h = hs.finish();
    let words = wire::words(h, req.max_tokens.map(u64::from).unwrap_or(wire::natural_len(h)));
    CompletionReply {
        id: format!("cmpl-mock{h:016x}"),
        created: 1_700_000_000 + h % 10_000_000,
        model: req.model.clone(),
        text: words.concat(),
        completion_tokens: words.len() as u64,
        words,
        prompt_tokens: 1 + req.prompts.iter().map(|p| wire::count_words(p)).sum::<u64>(),
    }
}

fn completion_usage(r: &CompletionReply) -> Value {
    json!({
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens
    })
}

fn completion_chunk(r: &CompletionReply, text: &str, finish: Option<&str>) -> Value {
    json!({
        "id": r.id,
        "object": "text_completion",
        "created": r.created,
        "model": r.model,
        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]
    })
}

/// Body of the non-streaming `text_completion`.
pub fn completion_body(r: &CompletionReply) -> Vec<u8> {
    let mut v = completion_chunk(r, &r.text, Some("stop"));
    v["usage"] = completion_usage(r);
    let mut b = serde_json::to_vec(&v).expect("json");
    b.push(b'\n');
    b
}

/// Streamed events: one `data:` chunk per word, a finish chunk (empty text, `stop`), the usage
/// chunk (`choices: []`, only with `include_usage`), `data: [DONE]`.
pub fn completion_stream_events(r: &CompletionReply, include_usage: bool) -> Vec<String> {
    let ev = |v: &Value| format!("data: {}\n\n", serde_json::to_string(v).expect("json"));
    let mut out: Vec<String> = r.words.iter().map(|w| ev(&completion_chunk(r, w, None))).collect();
    out.push(ev(&completion_chunk(r, "", Some("stop"))));
    if include_usage {
        let mut u = completion_chunk(r, "", None);
        u["choices"] = json!([]);
        u["usage"] = completion_usage(r);
        out.push(ev(&u));
    }
    out.push("data: [DONE]\n\n".into());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_usage_and_encodings_agree() {
        let q = EmbeddingsRequest::from_json(&json!({"model": "e", "input": ["a b", "c"]})).unwrap();
        assert_eq!(embeddings_usage(&q), 4 + 3);
        let body: Value = serde_json::from_slice(&embeddings_body(&q)).unwrap();
        let floats: Vec<f32> =
            body["data"][1]["embedding"].as_array().unwrap().iter().map(|f| f.as_f64().unwrap() as f32).collect();
        assert_eq!(floats, embedding_vector(&q, 1));
        let tq = EmbeddingsRequest::from_json(&json!({"model": "e", "input": [1, 2, 3]})).unwrap();
        assert_eq!(embeddings_usage(&tq), 3);
    }

    #[test]
    fn completion_stream_concatenates() {
        let q = CompletionRequest::from_json(&json!({"model": "m", "prompt": "say hi", "max_tokens": 4})).unwrap();
        let r = completion_reply(&q);
        assert_eq!((r.prompt_tokens, r.completion_tokens), (3, 4));
        assert_eq!(completion_stream_events(&r, true).len(), 4 + 3);
    }
}
