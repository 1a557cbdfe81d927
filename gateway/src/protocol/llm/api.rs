//! Which provider API operation a request is, what tollgate reads from its request body, and
//! the [`Observer`] that reads its response (one JSON body, or each SSE `data:` payload) into
//! one [`LlmCall`]: response id and model, finish reasons, usage and error.
//!
//! Recognition is by path (every supported provider names the operation in the path); the
//! route's configured provider only settles paths that are ambiguous on their own. Responses are
//! read in the API the upstream speaks, so an OpenAI-shaped path on a Gemini route (Gemini's
//! OpenAI compatibility endpoint) is read as OpenAI.
//!
//! Usage mapping, chosen so `input` follows the OpenTelemetry GenAI convention (input tokens
//! include cached ones) and `output` includes reasoning on every provider, as OpenAI reports it:
//! - OpenAI: as reported (`prompt_tokens`/`input_tokens` already include `cached_tokens`;
//!   `completion_tokens`/`output_tokens` include `reasoning_tokens`).
//! - Anthropic: `input_tokens` excludes cache reads and writes, so `input = input_tokens +
//!   cache_read_input_tokens + cache_creation_input_tokens`, `cached_input =
//!   cache_read_input_tokens`; `reasoning = output_tokens_details.thinking_tokens` (already part
//!   of `output_tokens`).
//! - Gemini: `promptTokenCount` includes cached content; tool-use prompt tokens are counted in
//!   `totalTokenCount` but not in `promptTokenCount`, so `input = promptTokenCount +
//!   toolUsePromptTokenCount`, `cached_input = cachedContentTokenCount`. `candidatesTokenCount`
//!   excludes thoughts, so `output = candidatesTokenCount + thoughtsTokenCount` and `reasoning =
//!   thoughtsTokenCount` (unless the reported total shows thoughts already inside candidates).

use std::borrow::Cow;

use bytes::Bytes;

use super::estimate::{self, OutputCounter, Piece};
use super::json::{Defer, Fast};
use super::{anthropic, gemini, openai};
use crate::config::ProviderKind;
use crate::telemetry::{LlmCall, Usage};

/// Finish reasons kept per call (a request with a huge `n` must not grow this without bound).
pub const MAX_FINISH_REASONS: usize = 64;

/// Longest error text kept from a response body.
const MAX_ERROR_BYTES: usize = 1024;

/// Nesting kept when a body is re-serialised for a second reading (see [`normalized`]); every
/// field tollgate reads is shallower.
const KEEP_DEPTH: usize = 16;

/// Which provider API operation a request is: decides how its request and response are read
/// and how the call is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI `POST /v1/chat/completions` (and every OpenAI-compatible server).
    OpenAiChat,
    /// OpenAI `POST /v1/responses`.
    OpenAiResponses,
    /// OpenAI `POST /v1/embeddings`.
    OpenAiEmbeddings,
    /// OpenAI legacy `POST /v1/completions`.
    OpenAiCompletions,
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
    /// Anthropic `POST /v1/messages/count_tokens`.
    AnthropicCountTokens,
    /// Gemini `models/{model}:generateContent`.
    GeminiGenerate,
    /// Gemini `models/{model}:streamGenerateContent` (SSE with `alt=sse`, else a JSON array).
    GeminiStreamGenerate,
    /// Gemini `models/{model}:countTokens`.
    GeminiCountTokens,
    /// Gemini `models/{model}:embedContent`.
    GeminiEmbed,
}

/// The family of wire formats an [`Api`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// OpenAI and compatible servers, Azure OpenAI.
    OpenAi,
    /// Anthropic.
    Anthropic,
    /// Google Gemini.
    Gemini,
}

impl Api {
    /// The wire-format family, which selects the response reader.
    pub fn shape(self) -> Shape {
        match self {
            Api::OpenAiChat | Api::OpenAiResponses | Api::OpenAiEmbeddings | Api::OpenAiCompletions => Shape::OpenAi,
            Api::AnthropicMessages | Api::AnthropicCountTokens => Shape::Anthropic,
            Api::GeminiGenerate | Api::GeminiStreamGenerate | Api::GeminiCountTokens | Api::GeminiEmbed => {
                Shape::Gemini
            }
        }
    }

    /// `gen_ai.operation.name` (OpenTelemetry GenAI semantic conventions). The Responses API is
    /// `chat` (its conversational successor; the predefined value applies); token counting has
    /// no predefined value and is `count_tokens`.
    pub fn operation(self) -> &'static str {
        match self {
            Api::OpenAiChat | Api::OpenAiResponses | Api::AnthropicMessages => "chat",
            Api::OpenAiEmbeddings | Api::GeminiEmbed => "embeddings",
            Api::OpenAiCompletions => "text_completion",
            Api::GeminiGenerate | Api::GeminiStreamGenerate => "generate_content",
            Api::AnthropicCountTokens | Api::GeminiCountTokens => "count_tokens",
        }
    }

    /// Generates output (and so counts output tokens).
    pub fn is_generation(self) -> bool {
        matches!(
            self,
            Api::OpenAiChat
                | Api::OpenAiResponses
                | Api::OpenAiCompletions
                | Api::AnthropicMessages
                | Api::GeminiGenerate
                | Api::GeminiStreamGenerate
        )
    }

    /// Embeds input: input tokens only.
    pub fn is_embedding(self) -> bool {
        matches!(self, Api::OpenAiEmbeddings | Api::GeminiEmbed)
    }

    /// Streams report usage only when asked (`stream_options.include_usage`), so tollgate may
    /// add the option. Every other API always reports usage, and rejects unknown options.
    pub fn supports_usage_injection(self) -> bool {
        matches!(self, Api::OpenAiChat | Api::OpenAiCompletions)
    }
}

/// A recognised LLM call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// The operation.
    pub api: Api,
    /// Model named by the path (Gemini `models/{model}:...`, Azure deployment), which the body
    /// then does not carry.
    pub path_model: Option<String>,
}

/// Recognise an LLM call from its method and path (a query string is ignored). Only `POST`s
/// are calls. Paths match on their suffix, so any prefix a gateway or provider adds works
/// (`/openai/v1/...`, `/api/v1/...`, Vertex `.../publishers/google/models/...`). `hint`, the
/// route's configured provider, decides only paths that are ambiguous alone: `/messages` and
/// `/responses` without a `/v1` (or Azure `/openai`) prefix.
pub fn detect(hint: ProviderKind, method: &http::Method, path: &str) -> Option<Detected> {
    if method != http::Method::POST {
        return None;
    }
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let path = path.strip_suffix('/').unwrap_or(path);
    if let Some(d) = detect_gemini(path) {
        return Some(d);
    }
    let openai = |api, prefix: &str| {
        let dep = prefix.rsplit_once('/').filter(|(head, _)| head.ends_with("/deployments")).map(|(_, d)| d);
        Some(Detected { api, path_model: dep.filter(|d| !d.is_empty()).map(str::to_string) })
    };
    if let Some(prefix) = path.strip_suffix("/chat/completions") {
        return openai(Api::OpenAiChat, prefix);
    }
    if let Some(prefix) = path.strip_suffix("/completions") {
        return openai(Api::OpenAiCompletions, prefix);
    }
    if let Some(prefix) = path.strip_suffix("/embeddings") {
        return openai(Api::OpenAiEmbeddings, prefix);
    }
    if let Some(prefix) = path.strip_suffix("/responses") {
        let known = prefix.ends_with("/v1") || prefix.ends_with("/openai") || hint.is_openai_shaped();
        return if known { openai(Api::OpenAiResponses, prefix) } else { None };
    }
    // Anthropic's own paths are versioned; bare or otherwise prefixed only on an Anthropic route.
    let anthropic = |prefix: &str| prefix.ends_with("/v1") || hint == ProviderKind::Anthropic;
    if let Some(prefix) = path.strip_suffix("/messages/count_tokens") {
        return anthropic(prefix).then_some(Detected { api: Api::AnthropicCountTokens, path_model: None });
    }
    if let Some(prefix) = path.strip_suffix("/messages") {
        return anthropic(prefix).then_some(Detected { api: Api::AnthropicMessages, path_model: None });
    }
    None
}

/// `.../models/{model}:{method}` (the colon may be percent-encoded).
fn detect_gemini(path: &str) -> Option<Detected> {
    let (head, last) = path.rsplit_once('/')?;
    if !head.ends_with("/models") && head != "models" {
        return None;
    }
    let (model, method) = match last.rsplit_once(':') {
        Some(split) => split,
        None => {
            let at = last.to_ascii_lowercase().rfind("%3a")?;
            (&last[..at], &last[at + 3..])
        }
    };
    let api = match method {
        "generateContent" => Api::GeminiGenerate,
        "streamGenerateContent" => Api::GeminiStreamGenerate,
        "countTokens" => Api::GeminiCountTokens,
        "embedContent" => Api::GeminiEmbed,
        _ => return None,
    };
    Some(Detected { api, path_model: (!model.is_empty()).then(|| model.to_string()) })
}

/// The request fields tollgate needs, whatever the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// `model` from the body (Gemini and Azure name it in the path instead: see
    /// [`Detected::path_model`]).
    pub model: Option<String>,
    /// A streamed response was asked for (`stream: true`; Gemini: the streaming method).
    pub stream: bool,
    /// The response will report usage without tollgate asking: `stream_options.include_usage:
    /// true` on OpenAI chat/completions, always true for APIs that report usage unasked
    /// (Responses, Anthropic, Gemini) or never stream (embeddings). So `stream &&
    /// !include_usage` is exactly when usage must be requested.
    pub include_usage: bool,
    /// `stream_options` present (any value), which decides how that rewrite is done.
    pub has_stream_options: bool,
}

/// Read the request fields of `api` from its body; `None` when the body is not a JSON object of
/// the expected shape (it is forwarded untouched and the provider answers with its own 400).
/// Cheap: the usual shapes are read by the borrowing cursor without allocating beyond `model`.
pub fn inspect_request(api: Api, body: &[u8]) -> Option<RequestFacts> {
    if api.shape() == Shape::Gemini {
        // Everything tollgate needs is in the path; only check the body is an object.
        let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
        return (*first == b'{').then_some(RequestFacts {
            model: None,
            stream: api == Api::GeminiStreamGenerate,
            include_usage: true,
            has_stream_options: false,
        });
    }
    let info = openai::inspect_request(body)?;
    Some(RequestFacts {
        model: info.model,
        stream: info.stream,
        include_usage: info.include_usage || !api.supports_usage_injection(),
        has_stream_options: info.has_stream_options,
    })
}

/// Why tollgate cannot read a request body of `api` (`None` when it can): not JSON by
/// `serde_json`'s rules (a trailing comma, a byte-order mark, `NaN`: lenient servers accept
/// them), not an object, or with `model`/`stream`/`stream_options` of the wrong type. Cheap in
/// the usual case (the borrowing cursor reads the request fields); the reason is only worked
/// out for a body that fails.
pub fn unreadable_request(api: Api, body: &[u8]) -> Option<String> {
    let gemini = api.shape() == Shape::Gemini;
    if !gemini && openai::inspect_request(body).is_some() {
        return None;
    }
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Some(e.to_string());
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Some("not a JSON object".to_string());
    }
    (!gemini).then(|| "model, stream or stream_options of an unexpected type".to_string())
}

/// Whether tollgate should add `stream_options.include_usage` to this request.
pub fn needs_usage_injection(api: Api, facts: &RequestFacts) -> bool {
    api.supports_usage_injection() && facts.stream && !facts.include_usage
}

/// The body with `stream_options.include_usage = true` (see [`openai::inject_include_usage`]).
pub fn inject_include_usage(body: &[u8], facts: &RequestFacts) -> Result<Bytes, openai::OpenAiError> {
    let info = openai::RequestInfo {
        model: None,
        stream: facts.stream,
        include_usage: facts.include_usage,
        has_stream_options: facts.has_stream_options,
    };
    openai::inject_include_usage(body, &info)
}

/// Reads one call's response, payload by payload, into its [`LlmCall`]; estimates usage at the
/// end when the provider reported none, or when a stream ended before its terminal event (the
/// client went away, the stream was cut) with less output reported than was forwarded.
#[derive(Debug)]
pub struct Observer {
    api: Api,
    /// The request body, kept (by reference) only for a prompt estimate.
    request: Bytes,
    /// Output text seen, kept to be tokenized only if an estimate is needed at the end.
    counter: Option<OutputCounter>,
    /// Anthropic usage, assembled from `message_start` and `message_delta`.
    anthropic: anthropic::UsageParts,
    /// An SSE stream is observed (see [`Observer::streaming`]).
    streamed: bool,
    /// The stream's terminal event was observed: OpenAI `[DONE]`, Anthropic `message_stop`,
    /// a Gemini chunk with a finish reason, a Responses `response.completed` (or
    /// `.incomplete`, `.failed`), or an error event.
    terminal: bool,
}

impl Observer {
    /// An observer for a call of `api`. `request` is the (already buffered) request body, kept
    /// only to estimate prompt tokens if the provider reports no usage. `estimate_output`: keep
    /// the output text of whole (non-streamed) bodies too, for OpenAI-compatible servers that
    /// may omit usage; streams always keep theirs (see [`Observer::streaming`]).
    pub fn new(api: Api, request: Bytes, estimate_output: bool) -> Self {
        let counter = (estimate_output && api.is_generation()).then(OutputCounter::new);
        Observer {
            api,
            request,
            counter,
            anthropic: anthropic::UsageParts::default(),
            streamed: false,
            terminal: false,
        }
    }

    /// The response is an SSE stream: keep the text of the deltas forwarded, so a stream that
    /// ends before its usage event (client disconnected, stream cut) still settles with the
    /// output it delivered, and note its terminal event.
    pub fn streaming(&mut self) {
        self.streamed = true;
        if self.api.is_generation() && self.counter.is_none() {
            self.counter = Some(OutputCounter::new());
        }
    }

    /// The API being observed.
    pub fn api(&self) -> Api {
        self.api
    }

    /// The stream's terminal event was observed: the response is complete for the agent even
    /// if the body's own end (the chunked terminator) never arrives or is never read.
    pub fn complete(&self) -> bool {
        self.terminal
    }

    /// One JSON body or SSE data payload, in the upstream's API. Fills `call.response_id`,
    /// `response_model`, `finish_reasons` (at most [`MAX_FINISH_REASONS`]), `usage` and
    /// `error` (the first one seen). Returns true when the payload is an OpenAI usage-only
    /// chunk (no choices, usage set), which is dropped when tollgate injected `include_usage`.
    pub fn observe(&mut self, call: &mut LlmCall, data: &[u8]) -> bool {
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.terminal = true;
            return false;
        }
        if data.is_empty() {
            return false;
        }
        if self.api.shape() == Shape::OpenAi && self.api != Api::OpenAiResponses {
            return self.observe_openai(call, data);
        }
        if let Err(Defer) = self.observe_once(call, data) {
            if let Some(n) = normalized(data) {
                let _ = self.observe_once(call, &n);
            }
        }
        false
    }

    /// Read with the borrowing cursor; nothing is recorded unless the whole payload was read.
    fn observe_once(&mut self, call: &mut LlmCall, data: &[u8]) -> Fast<()> {
        let counting = self.counter.is_some();
        let seen = match self.api.shape() {
            Shape::Anthropic => {
                let (seen, usage) = anthropic::parse(data, counting)?;
                if let Some(u) = usage {
                    self.anthropic.merge(u);
                    call.usage = Some(self.anthropic.to_usage());
                }
                seen
            }
            Shape::Gemini => {
                let mut seen = gemini::parse(data, counting)?;
                seen.terminal = !seen.finish.is_empty() || seen.error.is_some();
                seen
            }
            Shape::OpenAi => openai::parse_responses(data, counting)?,
        };
        self.terminal |= seen.terminal;
        seen.apply(call, self.counter.as_mut());
        // Usage is final once the stream completed (or the body was whole): stop keeping text.
        if call.usage.is_some() && (self.terminal || !self.streamed) {
            self.counter = None;
        }
        Ok(())
    }

    /// Chat completions, completions, embeddings.
    fn observe_openai(&mut self, call: &mut LlmCall, data: &[u8]) -> bool {
        let Some(s) = openai::parse_response(data) else {
            return false;
        };
        let usage_only = s.is_usage_only() && self.api.supports_usage_injection();
        let seen = Seen {
            id: s.id,
            model: s.model,
            finish: s.choices.map(|c| c.finish_reasons).unwrap_or_default(),
            error: s.error.map(|e| ErrorSeen { kind: None, message: e.message }),
            usage: s.usage.map(|u| u.to_usage()),
            text: Vec::new(),
            terminal: false,
        };
        seen.apply(call, None);
        if call.usage.is_some() {
            // The provider reports usage (in the last chunk before `[DONE]`): it is final.
            self.counter = None;
        }
        if let Some(counter) = &mut self.counter {
            let mut text = Vec::new();
            let ok = openai::output_pieces(data, &mut text).is_ok();
            if ok {
                text.into_iter().for_each(|p| counter.push_piece(p));
            } else if let Some(n) = normalized(data) {
                let mut text = Vec::new();
                if openai::output_pieces(&n, &mut text).is_ok() {
                    text.into_iter().for_each(|p| counter.push_piece(p));
                }
            }
        }
        usage_only
    }

    /// End of the response: what is left to estimate, if anything (see [`Estimate`]). Cheap;
    /// the tokenizing is [`Estimate::apply`], which the caller runs off the async workers.
    /// Runs once; later calls return `None`.
    pub fn end(&mut self, call: &LlmCall) -> Option<Estimate> {
        let request = std::mem::take(&mut self.request);
        let counter = self.counter.take();
        if !(200..300).contains(&call.status) || !(self.api.is_generation() || self.api.is_embedding()) {
            return None;
        }
        let cut = self.streamed && !self.terminal;
        match &call.usage {
            // The provider's own count of a complete response.
            Some(_) if !cut => None,
            // A stream cut short: at least what it delivered.
            Some(_) => counter.filter(|c| !c.is_empty()).map(|c| Estimate { api: self.api, request: None, counter: c }),
            None if request.is_empty() => None,
            None => Some(Estimate { api: self.api, request: Some(request), counter: counter.unwrap_or_default() }),
        }
    }

    /// [`Observer::end`] and [`Estimate::apply`] in one step, on the calling thread.
    pub fn finish(&mut self, call: &mut LlmCall) {
        if let Some(e) = self.end(call) {
            e.apply(call);
        }
    }
}

/// Usage still to estimate at the end of a call: the prompt of a call that reported no usage,
/// and the output text it delivered. Tokenizing costs CPU in proportion to the text, so it is
/// applied off the async workers.
#[derive(Debug)]
pub struct Estimate {
    api: Api,
    /// The request body, when no usage was reported at all (the prompt is estimated too).
    request: Option<Bytes>,
    /// Output text forwarded to the agent.
    counter: OutputCounter,
}

impl Estimate {
    /// Fill `call.usage`: with no reported usage, an estimate of the prompt and of the output
    /// delivered; with usage reported by a stream that was cut short (Anthropic's
    /// `message_start`, a cut OpenAI stream), its output raised to what was delivered when
    /// that is more. Either way an estimate is flagged ([`Usage::estimated`]).
    pub fn apply(mut self, call: &mut LlmCall) {
        let output = self.counter.finish();
        match (&mut call.usage, self.request) {
            (Some(u), _) => {
                if output > u.output {
                    u.total = u.total.saturating_add(output - u.output);
                    u.output = output;
                    u.estimated = true;
                }
            }
            (None, Some(request)) => {
                let Some(input) = estimate::prompt_tokens(self.api, &request) else {
                    return;
                };
                call.usage = Some(Usage {
                    input,
                    output,
                    total: input + output,
                    cached_input: None,
                    reasoning: None,
                    estimated: true,
                });
            }
            (None, None) => {}
        }
    }
}

/// What one payload said, borrowed from it: each provider reader fills one, and it is applied
/// to the call only once the whole payload was read.
#[derive(Debug, Default)]
pub(crate) struct Seen<'a> {
    /// Provider's response id (kept from the first payload that has one).
    pub(crate) id: Option<Cow<'a, str>>,
    /// Model that answered (likewise).
    pub(crate) model: Option<Cow<'a, str>>,
    /// Finish reasons, in order.
    pub(crate) finish: Vec<Cow<'a, str>>,
    /// An error object or event.
    pub(crate) error: Option<ErrorSeen<'a>>,
    /// Complete usage (replaces any earlier report).
    pub(crate) usage: Option<Usage>,
    /// Output text, collected only when counting.
    pub(crate) text: Vec<Piece<'a>>,
    /// The payload is the stream's terminal event (see [`Observer::complete`]).
    pub(crate) terminal: bool,
}

/// An error object or event.
#[derive(Debug, Default)]
pub(crate) struct ErrorSeen<'a> {
    /// Provider's error class (`type`, `code` or `status`).
    pub(crate) kind: Option<Cow<'a, str>>,
    /// Human-readable message.
    pub(crate) message: Option<Cow<'a, str>>,
}

impl ErrorSeen<'_> {
    /// `kind: message`, bounded.
    fn text(&self) -> String {
        let mut s = match (&self.kind, &self.message) {
            (Some(k), Some(m)) => format!("{k}: {m}"),
            (None, Some(m)) => m.to_string(),
            (Some(k), None) => k.to_string(),
            (None, None) => "error event in response".to_string(),
        };
        if s.len() > MAX_ERROR_BYTES {
            let mut end = MAX_ERROR_BYTES;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push('…');
        }
        s
    }
}

impl Seen<'_> {
    fn apply(self, call: &mut LlmCall, counter: Option<&mut OutputCounter>) {
        if call.response_id.is_none() {
            call.response_id = self.id.filter(|s| !s.is_empty()).map(Cow::into_owned);
        }
        if call.response_model.is_none() {
            call.response_model = self.model.filter(|s| !s.is_empty()).map(Cow::into_owned);
        }
        for r in self.finish {
            if call.finish_reasons.len() < MAX_FINISH_REASONS {
                call.finish_reasons.push(r.into_owned());
            }
        }
        if let (Some(e), None) = (&self.error, &call.error) {
            call.error = Some(e.text());
        }
        if let Some(u) = self.usage {
            call.usage = Some(u);
        }
        if let Some(c) = counter {
            self.text.into_iter().for_each(|p| c.push_piece(p));
        }
    }
}

/// `data` re-serialised for a second reading when the cursor declined it: containers nested
/// deeper than [`KEEP_DEPTH`] become `null` and members whose names need escaping are dropped
/// (tollgate reads neither), escapes in names are resolved. Rare (deeply nested tool arguments,
/// escaped member names), so the `serde_json::Value` detour is acceptable there.
pub(crate) fn normalized(data: &[u8]) -> Option<Vec<u8>> {
    fn prune(v: &mut serde_json::Value, depth: usize) {
        match v {
            serde_json::Value::Array(_) | serde_json::Value::Object(_) if depth >= KEEP_DEPTH => {
                *v = serde_json::Value::Null;
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| prune(x, depth + 1)),
            serde_json::Value::Object(m) => {
                m.retain(|k, _| k.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'));
                m.values_mut().for_each(|x| prune(x, depth + 1));
            }
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(data).ok()?;
    prune(&mut v, 0);
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Shared by the provider modules' tests: a blank call, a sample request per API, and
    //! drivers that feed an [`Observer`] whole bodies or SSE streams cut anywhere.

    use std::sync::Arc;

    use super::*;
    use crate::protocol::llm::sse::{SseEvent, SseParser};

    /// A call with nothing observed and the given response status.
    pub(crate) fn call(status: u16) -> LlmCall {
        let agent = Arc::new(crate::capture::Agent::unknown("t"));
        let mut c = LlmCall::new(agent, Arc::from("r"), ProviderKind::Openai, "chat");
        c.status = status;
        c
    }

    /// A request whose only text is "Hello world", in the API's format.
    pub(crate) fn sample_request(api: Api) -> &'static [u8] {
        match api {
            Api::OpenAiChat => {
                br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello world"}],"stream":true}"#
            }
            Api::OpenAiResponses => br#"{"model":"gpt-4.1","input":"Hello world","stream":true}"#,
            Api::OpenAiEmbeddings => br#"{"model":"text-embedding-3-small","input":"Hello world"}"#,
            Api::OpenAiCompletions => br#"{"model":"gpt-3.5-turbo-instruct","prompt":"Hello world"}"#,
            Api::AnthropicMessages | Api::AnthropicCountTokens => {
                br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hello world"}]}"#
            }
            Api::GeminiEmbed => br#"{"content":{"parts":[{"text":"Hello world"}]}}"#,
            _ => br#"{"contents":[{"role":"user","parts":[{"text":"Hello world"}]}]}"#,
        }
    }

    /// One whole body, then the end of the response.
    pub(crate) fn run_json(api: Api, body: &[u8], status: u16, estimate_output: bool) -> LlmCall {
        let mut o = Observer::new(api, Bytes::from_static(sample_request(api)), estimate_output);
        let mut c = call(status);
        o.observe(&mut c, body);
        o.finish(&mut c);
        c
    }

    /// An SSE stream delivered in chunks ending at `cuts`.
    pub(crate) fn run_sse(api: Api, stream: &[u8], cuts: &[usize], estimate_output: bool) -> LlmCall {
        let mut o = Observer::new(api, Bytes::from_static(sample_request(api)), estimate_output);
        let mut c = call(200);
        let mut p = SseParser::new(1 << 16);
        let mut start = 0;
        for end in cuts.iter().copied().chain([stream.len()]) {
            p.feed(&stream[start..end], |_, ev| {
                if let SseEvent::Data(d) = ev {
                    o.observe(&mut c, d);
                }
            });
            start = end;
        }
        p.finish(|_, ev| {
            if let SseEvent::Data(d) = ev {
                o.observe(&mut c, d);
            }
        });
        o.finish(&mut c);
        c
    }

    /// `check` the call read from `stream` whole, cut at every position, and byte by byte.
    pub(crate) fn run_sse_every_split(api: Api, stream: &[u8], check: impl Fn(&LlmCall)) {
        check(&run_sse(api, stream, &[], false));
        for cut in 1..stream.len() {
            check(&run_sse(api, stream, &[cut], false));
        }
        check(&run_sse(api, stream, &(1..stream.len()).collect::<Vec<_>>(), false));
    }
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
