//! OpenAI wire formats: what tollgate reads from requests (`model`, `stream`,
//! `stream_options.include_usage`), the one rewrite it makes (asking for usage on streams), and
//! what it reads from responses (id, model, finish reasons, usage) of chat completions,
//! completions and embeddings (one shape) and of the Responses API (`parse_responses`).
//!
//! Response parsing borrows from the input (`Cow<str>`) and skips everything else (message
//! content, deltas) without allocating, since it runs once per streamed chunk. Both directions
//! try a strict hand-rolled cursor first ([`super::json`]) and fall back to `serde_json` for
//! anything it declines, so results are always those of the `serde_json` structs below.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::api::{ErrorSeen, Seen};
use super::estimate::{texts, Piece};
use super::json::{Cursor, Defer, Fast};
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
    let w = match fast_request(body) {
        Ok(w) => w,
        Err(Defer) => serde_json::from_slice(body).ok()?,
    };
    Some(request_info(w))
}

fn request_info(w: RequestWire<'_>) -> RequestInfo {
    let so = w.stream_options;
    RequestInfo {
        model: w.model.map(Cow::into_owned),
        stream: w.stream.unwrap_or(false),
        include_usage: so.as_ref().and_then(|o| o.as_ref()).and_then(|o| o.include_usage).unwrap_or(false),
        has_stream_options: so.is_some(),
    }
}

/// A known field seen for the first time (`serde` rejects duplicates: defer those).
fn once(seen: &mut bool) -> Fast<()> {
    if std::mem::replace(seen, true) {
        Err(Defer)
    } else {
        Ok(())
    }
}

/// [`RequestWire`] by the fast path.
fn fast_request(body: &[u8]) -> Fast<RequestWire<'_>> {
    let mut c = Cursor::new(body);
    if !c.at_object() {
        return Err(Defer);
    }
    let mut w = RequestWire { model: None, stream: None, stream_options: None };
    let mut seen = [false; 3];
    c.object(|c, key| {
        match key {
            b"model" => {
                once(&mut seen[0])?;
                w.model = c.opt_str()?.map(Cow::Borrowed);
            }
            b"stream" => {
                once(&mut seen[1])?;
                w.stream = c.opt_bool()?;
            }
            b"stream_options" => {
                once(&mut seen[2])?;
                let (mut include_usage, mut seen_iu) = (None, false);
                let so = c.opt_object(|c, k| {
                    if k != b"include_usage" {
                        return c.skip();
                    }
                    once(&mut seen_iu)?;
                    include_usage = c.opt_bool()?;
                    Ok(())
                })?;
                w.stream_options = Some(so.map(|()| StreamOptionsWire { include_usage }));
            }
            _ => c.skip()?,
        }
        Ok(())
    })?;
    c.end()?;
    Ok(w)
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

/// `json`, a chat-completion chunk, without its top-level `"usage": null` member, every other
/// byte as the provider sent it; `None` when it has no such member (or is not a JSON object
/// the cursor reads). OpenAI adds `"usage": null` to every chunk of a stream that asked for
/// usage: when tollgate asked on the agent's behalf, the agent must not see it.
pub fn without_null_usage(json: &[u8]) -> Option<Vec<u8>> {
    memchr::memmem::find(json, b"\"usage\"")?;
    let mut c = Cursor::new(json);
    if !c.at_object() {
        return None;
    }
    // End of the previous member's value (first: just past the brace), where a removal starts.
    let mut last_end = c.pos() + 1;
    let mut first = true;
    let mut span = None;
    c.object(|c, key| {
        if key == b"usage" && span.is_none() && c.take_null()? {
            span = Some((last_end, c.pos(), first));
        } else {
            c.skip()?;
        }
        last_end = c.pos();
        first = false;
        Ok(())
    })
    .ok()?;
    c.end().ok()?;
    let (start, mut end, first) = span?;
    if first {
        // `{"usage":null, "id":...}`: the following comma goes too.
        let rest = &json[end..];
        let ws = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
        if rest.get(ws) == Some(&b',') {
            end += ws + 1;
        }
    }
    let mut out = Vec::with_capacity(json.len() - (end - start));
    out.extend_from_slice(&json[..start]);
    out.extend_from_slice(&json[end..]);
    Some(out)
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
            total: self.total_tokens.unwrap_or(input.saturating_add(output)),
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
    match fast_response(json) {
        Ok(r) => Some(r),
        Err(Defer) => serde_json::from_slice(json).ok(),
    }
}

/// [`ResponseSummary`] by the fast path.
fn fast_response(json: &[u8]) -> Fast<ResponseSummary<'_>> {
    let mut c = Cursor::new(json);
    if !c.at_object() {
        return Err(Defer);
    }
    let mut r = ResponseSummary::default();
    let mut seen = [false; 5];
    c.object(|c, key| {
        match key {
            b"id" => {
                once(&mut seen[0])?;
                r.id = c.opt_str()?.map(Cow::Borrowed);
            }
            b"model" => {
                once(&mut seen[1])?;
                r.model = c.opt_str()?.map(Cow::Borrowed);
            }
            b"choices" => {
                once(&mut seen[2])?;
                r.choices = fast_choices(c)?;
            }
            b"usage" => {
                once(&mut seen[3])?;
                r.usage = fast_usage(c)?;
            }
            b"error" => {
                once(&mut seen[4])?;
                let (mut message, mut seen_m) = (None, false);
                let e = c.opt_object(|c, k| {
                    if k != b"message" {
                        return c.skip();
                    }
                    once(&mut seen_m)?;
                    message = c.opt_str()?.map(Cow::Borrowed);
                    Ok(())
                })?;
                r.error = e.map(|()| ErrorWire { message });
            }
            _ => c.skip()?,
        }
        Ok(())
    })?;
    c.end()?;
    Ok(r)
}

fn fast_choices<'a>(c: &mut Cursor<'a>) -> Fast<Option<Choices<'a>>> {
    let mut choices = Choices::default();
    let got = c.opt_array(|c| {
        if !c.at_object() {
            return Err(Defer);
        }
        let (mut finish, mut seen) = (None, false);
        c.object(|c, k| {
            if k != b"finish_reason" {
                return c.skip();
            }
            once(&mut seen)?;
            finish = c.opt_str()?;
            Ok(())
        })?;
        choices.len += 1;
        if let Some(f) = finish {
            choices.finish_reasons.push(Cow::Borrowed(f));
        }
        Ok(())
    })?;
    Ok(got.map(|()| choices))
}

fn fast_usage(c: &mut Cursor<'_>) -> Fast<Option<UsageWire>> {
    let mut u = UsageWire::default();
    let mut seen = [false; 5];
    let got = c.opt_object(|c, key| {
        match key {
            b"prompt_tokens" => {
                once(&mut seen[0])?;
                u.prompt_tokens = c.opt_u64()?;
            }
            b"completion_tokens" => {
                once(&mut seen[1])?;
                u.completion_tokens = c.opt_u64()?;
            }
            b"total_tokens" => {
                once(&mut seen[2])?;
                u.total_tokens = c.opt_u64()?;
            }
            b"prompt_tokens_details" => {
                once(&mut seen[3])?;
                let d = fast_detail(c, b"cached_tokens")?;
                u.prompt_tokens_details = d.map(|cached_tokens| PromptDetails { cached_tokens });
            }
            b"completion_tokens_details" => {
                once(&mut seen[4])?;
                let d = fast_detail(c, b"reasoning_tokens")?;
                u.completion_tokens_details = d.map(|reasoning_tokens| CompletionDetails { reasoning_tokens });
            }
            _ => c.skip()?,
        }
        Ok(())
    })?;
    Ok(got.map(|()| u))
}

/// A `*_tokens_details` object (`Some`, holding its `field`) or `null`.
fn fast_detail(c: &mut Cursor<'_>, field: &[u8]) -> Fast<Option<Option<u64>>> {
    let (mut v, mut seen) = (None, false);
    let got = c.opt_object(|c, k| {
        if k != field {
            return c.skip();
        }
        once(&mut seen)?;
        v = c.opt_u64()?;
        Ok(())
    })?;
    Ok(got.map(|()| v))
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

/// Output text of a chat-completions or completions object or chunk (message or delta content,
/// reasoning text of compatible servers, refusals, tool-call arguments, completion `text`),
/// appended to `out`. Used only to estimate output tokens.
pub(crate) fn output_pieces<'a>(json: &'a [u8], out: &mut Vec<Piece<'a>>) -> Fast<()> {
    let mut c = Cursor::new(json);
    let mut sink = |p| out.push(p);
    c.object(|c, key| {
        if key != b"choices" {
            return c.skip();
        }
        c.lenient_array(|c| {
            c.lenient_object(|c, k| match k {
                b"delta" | b"message" => texts(c, 1, &mut sink),
                b"text" => texts(c, 1, &mut sink),
                _ => c.skip(),
            })
            .map(drop)
        })
        .map(drop)
    })?;
    c.end()
}

/// Responses API `status` values that end a response; the finish reason reported for it.
const TERMINAL: &[&str] = &["completed", "incomplete", "failed", "cancelled"];

/// Fields of a Responses API `Response` object (the whole non-streamed body, or the `response`
/// of a streaming event).
#[derive(Default)]
struct ResponseFields<'a> {
    id: Option<Cow<'a, str>>,
    model: Option<Cow<'a, str>>,
    status: Option<Cow<'a, str>>,
    incomplete_reason: Option<Cow<'a, str>>,
    usage: Option<Usage>,
    error: Option<ErrorSeen<'a>>,
    output: Vec<Piece<'a>>,
}

/// Read `key` of a `Response` object into `f`; false when it is not one of its fields.
fn response_member<'a>(c: &mut Cursor<'a>, key: &[u8], f: &mut ResponseFields<'a>, counting: bool) -> Fast<bool> {
    match key {
        b"id" => f.id = c.lenient_str()?,
        b"model" => f.model = c.lenient_str()?,
        b"status" => f.status = c.lenient_str()?,
        b"incomplete_details" => {
            c.lenient_object(|c, k| match k {
                b"reason" => c.lenient_str().map(|r| f.incomplete_reason = r),
                _ => c.skip(),
            })?;
        }
        b"usage" => f.usage = responses_usage(c)?,
        b"error" => f.error = error_object(c)?,
        b"output" if counting => texts(c, 0, &mut |p| f.output.push(p))?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// Responses API `usage`: `input_tokens` (cached included), `output_tokens` (reasoning
/// included), `total_tokens`, and their details.
fn responses_usage(c: &mut Cursor<'_>) -> Fast<Option<Usage>> {
    let (mut input, mut output, mut total, mut cached, mut reasoning) = (None, None, None, None, None);
    let got = c.lenient_object(|c, k| match k {
        b"input_tokens" => c.lenient_u64().map(|v| input = v),
        b"output_tokens" => c.lenient_u64().map(|v| output = v),
        b"total_tokens" => c.lenient_u64().map(|v| total = v),
        b"input_tokens_details" => detail(c, b"cached_tokens").map(|v| cached = v),
        b"output_tokens_details" => detail(c, b"reasoning_tokens").map(|v| reasoning = v),
        _ => c.skip(),
    })?;
    Ok(got.then(|| {
        let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
        Usage {
            input,
            output,
            total: total.unwrap_or(input + output),
            cached_input: cached,
            reasoning,
            estimated: false,
        }
    }))
}

/// One number `field` of a details object.
fn detail(c: &mut Cursor<'_>, field: &[u8]) -> Fast<Option<u64>> {
    let mut v = None;
    c.lenient_object(|c, k| if k == field { c.lenient_u64().map(|x| v = x) } else { c.skip() })?;
    Ok(v)
}

/// An `error` object: `{"message", "code", "type", ...}` (HTTP error bodies, failed responses).
fn error_object<'a>(c: &mut Cursor<'a>) -> Fast<Option<ErrorSeen<'a>>> {
    let (mut code, mut kind, mut message) = (None, None, None);
    let got = c.lenient_object(|c, k| match k {
        b"message" => c.lenient_str().map(|v| message = v),
        b"code" => c.lenient_str().map(|v| code = v),
        b"type" => c.lenient_str().map(|v| kind = v),
        _ => c.skip(),
    })?;
    Ok(got.then(|| ErrorSeen { kind: code.or(kind), message }))
}

/// Streaming event types whose `delta` is model output text (audio deltas are base64, shell
/// output is a tool's).
fn is_text_delta(kind: &str) -> bool {
    kind.starts_with("response.")
        && kind.ends_with(".delta")
        && !kind.starts_with("response.audio.")
        && kind != "response.shell_call_output_content.delta"
}

/// Read a Responses API body (a `Response` object or an error) or one streaming event
/// (`response.created`, `response.output_text.delta`, `response.completed` with usage inside
/// `response`, `response.failed`/`response.incomplete`, `error`, ...). The finish reason is the
/// terminal `status`, or `incomplete_details.reason` for an incomplete response. With
/// `counting`, output text is collected from text deltas, or from `output` of a whole body.
pub(crate) fn parse_responses(json: &[u8], counting: bool) -> Fast<Seen<'_>> {
    let mut c = Cursor::new(json);
    let (mut top, mut inner) = (ResponseFields::default(), ResponseFields::default());
    let (mut kind, mut delta, mut code, mut message) = (None, None, None, None);
    c.object(|c, key| match key {
        b"type" => c.lenient_str().map(|v| kind = v),
        b"response" => c
            .lenient_object(|c, k| match response_member(c, k, &mut inner, false)? {
                true => Ok(()),
                false => c.skip(),
            })
            .map(drop),
        b"delta" if counting => c.lenient_str().map(|v| delta = v),
        b"code" => c.lenient_str().map(|v| code = v),
        b"message" => c.lenient_str().map(|v| message = v),
        _ => match response_member(c, key, &mut top, counting)? {
            true => Ok(()),
            false => c.skip(),
        },
    })?;
    c.end()?;

    let status = inner.status.or(top.status);
    let finish = status.filter(|s| TERMINAL.contains(&s.as_ref())).map(|s| match s.as_ref() {
        "incomplete" => inner.incomplete_reason.or(top.incomplete_reason).unwrap_or(s),
        _ => s,
    });
    let error = match kind.as_deref() {
        // `{"type":"error","code","message"}`; some servers nest an error object instead.
        Some("error") if code.is_some() || message.is_some() => Some(ErrorSeen { kind: code, message }),
        Some("error") => Some(inner.error.or(top.error).unwrap_or_default()),
        _ => inner.error.or(top.error),
    };
    // The last event of a stream: the response reached a terminal status, or an error.
    let terminal = kind
        .as_deref()
        .is_some_and(|k| k == "error" || k.strip_prefix("response.").is_some_and(|s| TERMINAL.contains(&s)));
    let text = match (&kind, delta) {
        (Some(k), Some(d)) if counting && is_text_delta(k) => vec![Piece::Text(d)],
        (None, _) => top.output,
        _ => Vec::new(),
    };
    Ok(Seen {
        id: inner.id.or(top.id),
        model: inner.model.or(top.model),
        finish: finish.into_iter().collect(),
        error,
        usage: inner.usage.or(top.usage),
        text,
        terminal,
    })
}

#[cfg(test)]
#[path = "openai_tests.rs"]
mod tests;
