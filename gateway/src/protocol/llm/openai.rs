//! OpenAI chat-completions wire format: what tollgate reads from requests (`model`, `stream`,
//! `stream_options.include_usage`), the one rewrite it makes (asking for usage on streams), and
//! what it reads from responses (id, model, finish reasons, usage).
//!
//! Response parsing borrows from the input (`Cow<str>`) and skips everything else (message
//! content, deltas) without allocating, since it runs once per streamed chunk.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::telemetry::Usage;

/// Why a request body could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum OpenAiError {
    /// The body is not a JSON object.
    #[error("request body is not a JSON object: {0}")]
    NotAnObject(String),
}

/// Does this request target a chat-completions endpoint? Accepts any prefix (`/openai/v1/...`,
/// Azure deployments) ending in `/chat/completions`.
pub fn is_chat_completions(method: &http::Method, path: &str) -> bool {
    method == http::Method::POST && (path == "/v1/chat/completions" || path.ends_with("/chat/completions"))
}

/// The request fields tollgate needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// `model`.
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// `stream_options` present (any value), which decides how the rewrite is done.
    pub has_stream_options: bool,
}

#[derive(Deserialize)]
struct RequestWire<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptionsWire>>,
}

#[derive(Deserialize)]
struct StreamOptionsWire {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Distinguishes `"stream_options": null` (present) from absent.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Read the request fields; `None` when the body is not a JSON object of the expected shape
/// (forwarded untouched: the provider answers with its own 400).
pub fn inspect_request(body: &[u8]) -> Option<RequestInfo> {
    let w: RequestWire<'_> = serde_json::from_slice(body).ok()?;
    let so = w.stream_options;
    Some(RequestInfo {
        model: w.model.map(Cow::into_owned),
        stream: w.stream.unwrap_or(false),
        include_usage: so.as_ref().and_then(|o| o.as_ref()).and_then(|o| o.include_usage).unwrap_or(false),
        has_stream_options: so.is_some(),
    })
}

/// Whether the request must be rewritten to ask for usage: streaming without usage.
pub fn needs_usage_injection(info: &RequestInfo) -> bool {
    info.stream && !info.include_usage
}

const INJECTED: &[u8] = br#""stream_options":{"include_usage":true}"#;

/// Body with `stream_options.include_usage = true`. Without `stream_options` the member is
/// spliced in right after the opening brace, leaving every other byte as the client sent it;
/// otherwise the object is re-serialised with the option set.
pub fn inject_include_usage(body: &[u8], info: &RequestInfo) -> Result<Bytes, OpenAiError> {
    if !info.has_stream_options {
        let start = body.iter().position(|b| !b.is_ascii_whitespace());
        let Some(start) = start.filter(|&s| body[s] == b'{') else {
            return Err(OpenAiError::NotAnObject("no opening brace".into()));
        };
        let empty = body[start + 1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let mut out = BytesMut::with_capacity(body.len() + INJECTED.len() + 1);
        out.extend_from_slice(&body[..=start]);
        out.extend_from_slice(INJECTED);
        if !empty {
            out.extend_from_slice(b",");
        }
        out.extend_from_slice(&body[start + 1..]);
        return Ok(out.freeze());
    }
    let mut v: serde_json::Value = serde_json::from_slice(body).map_err(|e| OpenAiError::NotAnObject(e.to_string()))?;
    let obj = v.as_object_mut().ok_or_else(|| OpenAiError::NotAnObject("not an object".into()))?;
    let so = obj.entry("stream_options").or_insert(serde_json::Value::Null);
    match so.as_object_mut() {
        Some(m) => {
            m.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
        None => *so = serde_json::json!({ "include_usage": true }),
    }
    serde_json::to_vec(&v).map(Bytes::from).map_err(|e| OpenAiError::NotAnObject(e.to_string()))
}

/// `usage` as OpenAI (and compatible servers) send it.
#[derive(Debug, Default, Deserialize)]
pub struct UsageWire {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl UsageWire {
    /// Into the telemetry shape; a missing total is input + output.
    pub fn to_usage(&self) -> Usage {
        let input = self.prompt_tokens.unwrap_or(0);
        let output = self.completion_tokens.unwrap_or(0);
        Usage {
            input,
            output,
            total: self.total_tokens.unwrap_or(input + output),
            cached_input: self.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens),
            reasoning: self.completion_tokens_details.as_ref().and_then(|d| d.reasoning_tokens),
            estimated: false,
        }
    }
}

/// The parts of a `chat.completion` or `chat.completion.chunk` tollgate reads.
#[derive(Debug, Default, Deserialize)]
pub struct ResponseSummary<'a> {
    /// Provider's response id.
    #[serde(borrow, default)]
    pub id: Option<Cow<'a, str>>,
    /// Model that answered.
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    /// Choices, counted; finish reasons kept.
    #[serde(borrow, default)]
    pub choices: Option<Choices<'a>>,
    /// Usage, when present and not null.
    #[serde(default)]
    pub usage: Option<UsageWire>,
    /// In-band error object (`{"error":{...}}`), e.g. mid-stream failures.
    #[serde(borrow, default)]
    pub error: Option<ErrorWire<'a>>,
}

/// `error.message` of an in-band error.
#[derive(Debug, Default, Deserialize)]
pub struct ErrorWire<'a> {
    /// Human-readable message.
    #[serde(borrow, default)]
    pub message: Option<Cow<'a, str>>,
}

impl ResponseSummary<'_> {
    /// The extra chunk that `include_usage` adds at the end of a stream: no choices, usage set.
    pub fn is_usage_only(&self) -> bool {
        self.usage.is_some() && self.choices.as_ref().is_some_and(|c| c.len == 0)
    }
}

/// Parse a response object or chunk; `None` for anything else (e.g. `[DONE]`, non-JSON).
pub fn parse_response(json: &[u8]) -> Option<ResponseSummary<'_>> {
    serde_json::from_slice(json).ok()
}

/// `choices` reduced to what telemetry needs, without materialising deltas or messages.
#[derive(Debug, Default)]
pub struct Choices<'a> {
    /// Number of choices in this object.
    pub len: usize,
    /// Non-null `finish_reason`s, in order.
    pub finish_reasons: Vec<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChoiceWire<'a> {
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Choices<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Choices<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices<'a>, A::Error> {
                let mut c = Choices::default();
                while let Some(choice) = seq.next_element::<ChoiceWire<'a>>()? {
                    c.len += 1;
                    if let Some(r) = choice.finish_reason {
                        c.finish_reasons.push(r);
                    }
                }
                Ok(c)
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Choices<'a>, E> {
                Ok(Choices::default())
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_chat_paths() {
        let post = http::Method::POST;
        assert!(is_chat_completions(&post, "/v1/chat/completions"));
        assert!(is_chat_completions(&post, "/openai/deployments/x/chat/completions"));
        assert!(!is_chat_completions(&http::Method::GET, "/v1/chat/completions"));
        assert!(!is_chat_completions(&post, "/v1/completions"));
    }

    #[test]
    fn include_usage_added_only_when_needed() {
        let plain = br#"{"model":"gpt-4o","messages":[]}"#;
        let i = inspect_request(plain).unwrap();
        assert_eq!(i.model.as_deref(), Some("gpt-4o"));
        assert!(!needs_usage_injection(&i));

        let asked = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        assert!(!needs_usage_injection(&inspect_request(asked).unwrap()));

        let stream = br#"  {"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let i = inspect_request(stream).unwrap();
        assert!(needs_usage_injection(&i));
        let out = inject_include_usage(stream, &i).unwrap();
        assert_eq!(
            &out[..],
            &br#"  {"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#[..]
        );
        assert!(inspect_request(&out).unwrap().include_usage);

        let off = br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let i = inspect_request(off).unwrap();
        assert!(i.has_stream_options && needs_usage_injection(&i));
        let out: serde_json::Value = serde_json::from_slice(&inject_include_usage(off, &i).unwrap()).unwrap();
        assert_eq!(out["stream_options"], serde_json::json!({"include_usage": true, "x": 1}));

        let null = br#"{"stream":true,"stream_options":null}"#;
        let i = inspect_request(null).unwrap();
        let out: serde_json::Value = serde_json::from_slice(&inject_include_usage(null, &i).unwrap()).unwrap();
        assert_eq!(out["stream_options"]["include_usage"], true);

        assert!(inspect_request(b"[1,2]").is_none());
    }

    #[test]
    fn usage_with_cached_and_reasoning_tokens() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"o3-mini-2025-01-31",
            "choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":1200,"completion_tokens":300,"total_tokens":1500,
              "prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},
              "completion_tokens_details":{"reasoning_tokens":256,"audio_tokens":0}}}"#;
        let r = parse_response(body).unwrap();
        assert_eq!(r.id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(r.model.as_deref(), Some("o3-mini-2025-01-31"));
        assert_eq!(r.choices.as_ref().unwrap().finish_reasons, vec!["stop"]);
        assert!(!r.is_usage_only());
        let u = r.usage.unwrap().to_usage();
        assert_eq!(
            u,
            Usage {
                input: 1200,
                output: 300,
                total: 1500,
                cached_input: Some(1024),
                reasoning: Some(256),
                estimated: false
            }
        );
        // Minimal servers: no total, no details.
        let r = parse_response(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#).unwrap();
        assert!(r.is_usage_only());
        let u = r.usage.unwrap().to_usage();
        assert_eq!((u.total, u.cached_input, u.reasoning), (7, None, None));
    }

    #[test]
    fn usage_only_chunk_detection() {
        let usage_only = br#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1}}"#;
        assert!(parse_response(usage_only).unwrap().is_usage_only());
        let with_choice = br#"{"choices":[{"delta":{"content":"a\"b"},"finish_reason":null}],"usage":null}"#;
        let r = parse_response(with_choice).unwrap();
        assert!(!r.is_usage_only());
        assert_eq!(r.choices.unwrap().len, 1);
        assert!(parse_response(b"[DONE]").is_none());
    }
}
