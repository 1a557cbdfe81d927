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
/// end when the provider reported none.
#[derive(Debug)]
pub struct Observer {
    api: Api,
    /// The request body, kept (by reference) only for a prompt estimate.
    request: Bytes,
    /// Output tokens counted from text deltas, when asked for.
    counter: Option<OutputCounter>,
    /// Anthropic usage, assembled from `message_start` and `message_delta`.
    anthropic: anthropic::UsageParts,
}

impl Observer {
    /// An observer for a call of `api`. `request` is the (already buffered) request body, kept
    /// only to estimate prompt tokens if the provider reports no usage. `estimate_output`:
    /// count output text tokens incrementally as deltas arrive (for OpenAI-compatible servers
    /// that may omit usage); without it an estimate has no output tokens.
    pub fn new(api: Api, request: Bytes, estimate_output: bool) -> Self {
        let counter = (estimate_output && api.is_generation()).then(OutputCounter::new);
        Observer { api, request, counter, anthropic: anthropic::UsageParts::default() }
    }

    /// The API being observed.
    pub fn api(&self) -> Api {
        self.api
    }

    /// One JSON body or SSE data payload, in the upstream's API. Fills `call.response_id`,
    /// `response_model`, `finish_reasons` (at most [`MAX_FINISH_REASONS`]), `usage` and
    /// `error` (the first one seen). Returns true when the payload is an OpenAI usage-only
    /// chunk (no choices, usage set), which is dropped when tollgate injected `include_usage`.
    pub fn observe(&mut self, call: &mut LlmCall, data: &[u8]) -> bool {
        let data = data.trim_ascii();
        if data.is_empty() || data == b"[DONE]" {
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
            Shape::Gemini => gemini::parse(data, counting)?,
            Shape::OpenAi => openai::parse_responses(data, counting)?,
        };
        seen.apply(call, self.counter.as_mut());
        if call.usage.is_some() {
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
        };
        seen.apply(call, None);
        if call.usage.is_some() {
            // The provider reports usage: nothing left to estimate.
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

    /// End of the response: when no usage was reported on a successful (2xx) generation or
    /// embedding call, fill an estimate (`Usage::estimated`) from the request's prompt text and
    /// the counted output. Runs once; later calls do nothing.
    pub fn finish(&mut self, call: &mut LlmCall) {
        let request = std::mem::take(&mut self.request);
        let counter = self.counter.take();
        if call.usage.is_some()
            || !(200..300).contains(&call.status)
            || !(self.api.is_generation() || self.api.is_embedding())
            || request.is_empty()
        {
            return;
        }
        let Some(input) = estimate::prompt_tokens(self.api, &request) else {
            return;
        };
        // Tokenized only now that it is known the provider reported nothing.
        let output = counter.map_or(0, |mut c| c.finish());
        call.usage =
            Some(Usage { input, output, total: input + output, cached_input: None, reasoning: None, estimated: true });
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
mod tests {
    use super::test_support::{call, run_json, run_sse, run_sse_every_split};
    use super::*;

    fn det(hint: ProviderKind, path: &str) -> Option<(Api, Option<String>)> {
        detect(hint, &http::Method::POST, path).map(|d| (d.api, d.path_model))
    }

    #[test]
    fn detects_every_api_by_path() {
        use Api::*;
        let oa = ProviderKind::Openai;
        let cases: &[(&str, Api, Option<&str>)] = &[
            ("/v1/chat/completions", OpenAiChat, None),
            ("/chat/completions", OpenAiChat, None),
            ("/openai/v1/chat/completions", OpenAiChat, None),
            ("/api/v1/chat/completions?x=1", OpenAiChat, None),
            ("/v1beta/openai/chat/completions", OpenAiChat, None),
            ("/v1/responses", OpenAiResponses, None),
            ("/openai/v1/responses", OpenAiResponses, None),
            ("/openai/responses", OpenAiResponses, None),
            ("/v1/embeddings", OpenAiEmbeddings, None),
            ("/embeddings", OpenAiEmbeddings, None),
            ("/v1/completions", OpenAiCompletions, None),
            (
                "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21",
                OpenAiChat,
                Some("gpt-4o-prod"),
            ),
            ("/openai/deployments/inst/completions", OpenAiCompletions, Some("inst")),
            ("/openai/deployments/emb-3/embeddings", OpenAiEmbeddings, Some("emb-3")),
            ("/v1/messages", AnthropicMessages, None),
            ("/v1/messages/count_tokens", AnthropicCountTokens, None),
            ("/v1beta/models/gemini-2.5-flash:generateContent", GeminiGenerate, Some("gemini-2.5-flash")),
            (
                "/v1beta/models/gemini-2.0-flash-001:streamGenerateContent?alt=sse",
                GeminiStreamGenerate,
                Some("gemini-2.0-flash-001"),
            ),
            ("/v1/models/gemini-1.5-pro:countTokens", GeminiCountTokens, Some("gemini-1.5-pro")),
            ("/v1beta/models/text-embedding-004:embedContent", GeminiEmbed, Some("text-embedding-004")),
            ("/v1beta/models/gemini-2.5-pro%3AgenerateContent", GeminiGenerate, Some("gemini-2.5-pro")),
            (
                "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent",
                GeminiGenerate,
                Some("gemini-2.0-flash"),
            ),
        ];
        for (path, api, model) in cases {
            assert_eq!(det(oa, path), Some((*api, model.map(str::to_string))), "{path}");
        }
        // Ambiguous alone: the route's provider decides.
        assert_eq!(det(ProviderKind::Anthropic, "/messages").map(|d| d.0), Some(AnthropicMessages));
        assert_eq!(
            det(ProviderKind::Anthropic, "/anthropic/messages/count_tokens").map(|d| d.0),
            Some(AnthropicCountTokens)
        );
        assert_eq!(det(oa, "/messages"), None);
        assert_eq!(det(ProviderKind::OpenaiCompatible, "/responses").map(|d| d.0), Some(OpenAiResponses));
        assert_eq!(det(ProviderKind::Anthropic, "/responses"), None);
        // Not calls.
        assert_eq!(detect(oa, &http::Method::GET, "/v1/chat/completions"), None);
        for path in
            ["/v1/models", "/v1/responses/resp_1/cancel", "/v1beta/models/x:batchEmbedContents", "/v1/files", "/"]
        {
            assert_eq!(det(oa, path), None, "{path}");
        }
    }

    #[test]
    fn api_properties() {
        assert_eq!(Api::OpenAiResponses.operation(), "chat");
        assert_eq!(Api::GeminiStreamGenerate.operation(), "generate_content");
        assert_eq!(Api::OpenAiCompletions.operation(), "text_completion");
        assert_eq!(Api::GeminiEmbed.operation(), "embeddings");
        assert_eq!(Api::AnthropicCountTokens.operation(), "count_tokens");
        assert_eq!(Api::GeminiCountTokens.shape(), Shape::Gemini);
        assert!(Api::AnthropicMessages.is_generation() && !Api::OpenAiEmbeddings.is_generation());
        assert!(!Api::GeminiCountTokens.is_generation() && !Api::GeminiCountTokens.is_embedding());
    }

    #[test]
    fn request_facts_per_api() {
        let chat = br#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
        let f = inspect_request(Api::OpenAiChat, chat).unwrap();
        assert_eq!((f.model.as_deref(), f.stream, f.include_usage), (Some("gpt-4o"), true, false));
        assert!(needs_usage_injection(Api::OpenAiChat, &f));
        let out = inject_include_usage(chat, &f).unwrap();
        assert!(inspect_request(Api::OpenAiChat, &out).unwrap().include_usage);

        // Responses and Anthropic always report usage and reject unknown options.
        let f = inspect_request(Api::OpenAiResponses, br#"{"model":"o4-mini","input":"hi","stream":true}"#).unwrap();
        assert!(f.stream && f.include_usage && !needs_usage_injection(Api::OpenAiResponses, &f));
        let f = inspect_request(Api::AnthropicMessages, br#"{"model":"claude-opus-4-1","max_tokens":5,"stream":true}"#)
            .unwrap();
        assert_eq!((f.model.as_deref(), f.stream), (Some("claude-opus-4-1"), true));
        assert!(!needs_usage_injection(Api::AnthropicMessages, &f));

        let f = inspect_request(Api::GeminiStreamGenerate, br#" {"contents":[]}"#).unwrap();
        assert_eq!((f.model, f.stream), (None, true));
        assert!(!inspect_request(Api::GeminiGenerate, b"{}").unwrap().stream);
        assert_eq!(inspect_request(Api::GeminiGenerate, b"[]"), None);
        assert_eq!(inspect_request(Api::OpenAiChat, b"nope"), None);
    }

    #[test]
    fn chat_usage_only_chunk_and_completions_and_embeddings() {
        let mut o = Observer::new(Api::OpenAiChat, Bytes::new(), false);
        let mut c = call(200);
        assert!(!o.observe(&mut c, br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}"#));
        assert!(o.observe(&mut c, br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":0}}}"#));
        assert!(!o.observe(&mut c, b"[DONE]"));
        o.finish(&mut c);
        assert_eq!(
            (c.response_id.as_deref(), c.finish_reasons.as_slice()),
            (Some("chatcmpl-1"), &["stop".to_string()][..])
        );
        let u = c.usage.unwrap();
        assert_eq!((u.input, u.output, u.total, u.cached_input, u.estimated), (9, 2, 11, Some(0), false));

        let body = br#"{"id":"cmpl-9","object":"text_completion","created":1,"model":"gpt-3.5-turbo-instruct",
            "choices":[{"text":"\n\nThis is a test.","index":0,"logprobs":null,"finish_reason":"length"}],
            "usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        let c = run_json(Api::OpenAiCompletions, body, 200, false);
        assert_eq!(c.finish_reasons, vec!["length"]);
        assert_eq!(c.usage.map(|u| (u.input, u.output, u.total)), Some((5, 7, 12)));

        let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292,-0.0028842222]}],
            "model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let c = run_json(Api::OpenAiEmbeddings, body, 200, false);
        assert_eq!(c.response_model.as_deref(), Some("text-embedding-3-small"));
        let u = c.usage.unwrap();
        assert_eq!((u.input, u.output, u.total, u.estimated), (8, 0, 8, false));

        let c = run_json(Api::OpenAiChat, br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#, 429, false);
        assert_eq!((c.error.as_deref(), c.usage), (Some("Rate limit reached"), None));
    }

    const RESPONSES_STREAM: &str = concat!(
        "event: response.created\n",
        r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null}}"#,
        "\n\nevent: response.in_progress\n",
        r#"data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","status":"in_progress","model":"gpt-4.1-2025-04-14","output":[],"usage":null}}"#,
        "\n\nevent: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hello","logprobs":[]}"#,
        "\n\nevent: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_1","output_index":0,"content_index":0,"delta":" world","logprobs":[]}"#,
        "\n\nevent: response.output_text.done\n",
        r#"data: {"type":"response.output_text.done","sequence_number":6,"item_id":"msg_1","output_index":0,"content_index":0,"text":"Hello world","logprobs":[]}"#,
        "\n\nevent: response.completed\n",
        r#"data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","status":"completed","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hello world","annotations":[]}]}],"usage":{"input_tokens":1337,"input_tokens_details":{"cached_tokens":1152},"output_tokens":302,"output_tokens_details":{"reasoning_tokens":256},"total_tokens":1639}}}"#,
        "\n\n"
    );

    #[test]
    fn responses_stream_any_chunking() {
        run_sse_every_split(Api::OpenAiResponses, RESPONSES_STREAM.as_bytes(), |c| {
            assert_eq!(c.response_id.as_deref(), Some("resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654"));
            assert_eq!(c.response_model.as_deref(), Some("gpt-4.1-2025-04-14"));
            assert_eq!(c.finish_reasons, vec!["completed"]);
            assert_eq!(
                c.usage,
                Some(Usage {
                    input: 1337,
                    output: 302,
                    total: 1639,
                    cached_input: Some(1152),
                    reasoning: Some(256),
                    estimated: false
                })
            );
            assert_eq!(c.error, None);
        });
    }

    #[test]
    fn responses_bodies_incomplete_failed_and_errors() {
        let body = br#"{"id":"resp_1","object":"response","created_at":1,"status":"incomplete","error":null,
            "incomplete_details":{"reason":"max_output_tokens"},"model":"o4-mini-2025-04-16",
            "output":[{"type":"reasoning","id":"rs_1","summary":[]}],
            "usage":{"input_tokens":20,"input_tokens_details":{"cached_tokens":0},"output_tokens":16,"output_tokens_details":{"reasoning_tokens":16},"total_tokens":36}}"#;
        let c = run_json(Api::OpenAiResponses, body, 200, false);
        assert_eq!(
            (c.response_id.as_deref(), c.finish_reasons.as_slice()),
            (Some("resp_1"), &["max_output_tokens".to_string()][..])
        );
        assert_eq!(c.usage.map(|u| (u.input, u.output, u.reasoning)), Some((20, 16, Some(16))));

        let failed = "data: {\"type\":\"response.failed\",\"sequence_number\":3,\"response\":{\"id\":\"resp_2\",\"status\":\"failed\",\"model\":\"gpt-4.1\",\"error\":{\"code\":\"server_error\",\"message\":\"The model failed to generate a response.\"},\"usage\":null}}\n\n";
        let c = run_sse(Api::OpenAiResponses, failed.as_bytes(), &[], false);
        assert_eq!(c.error.as_deref(), Some("server_error: The model failed to generate a response."));
        assert_eq!(c.finish_reasons, vec!["failed"]);

        let ev = "event: error\ndata: {\"type\":\"error\",\"code\":\"ERR_SOMETHING\",\"message\":\"Something went wrong\",\"param\":null,\"sequence_number\":1}\n\n";
        let c = run_sse(Api::OpenAiResponses, ev.as_bytes(), &[], false);
        assert_eq!(c.error.as_deref(), Some("ERR_SOMETHING: Something went wrong"));

        let http = br#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
        let c = run_json(Api::OpenAiResponses, http, 404, false);
        assert_eq!(
            c.error.as_deref(),
            Some("model_not_found: The model `gpt-9` does not exist or you do not have access to it.")
        );
    }

    #[test]
    fn unusual_payloads_still_read() {
        // Tool input nested deeper than the cursor skips, and an escaped member name.
        let deep = format!(
            r#"{{"id":"msg_d","type":"message","model":"claude-haiku-4-5","content":[{{"type":"tool_use","id":"t","name":"f","input":{{"a":{}1{}}}}}],"stop_reason":"tool_use","\u0075sage":{{"input_tokens":10,"output_tokens":20}}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        let c = run_json(Api::AnthropicMessages, deep.as_bytes(), 200, false);
        assert_eq!(
            (c.response_id.as_deref(), c.finish_reasons.as_slice()),
            (Some("msg_d"), &["tool_use".to_string()][..])
        );
        assert_eq!(c.usage.map(|u| (u.input, u.output, u.estimated)), Some((10, 20, false)));

        // Garbage is ignored; an over-long error message is bounded.
        let mut c = call(200);
        let mut o = Observer::new(Api::GeminiGenerate, Bytes::new(), false);
        o.observe(&mut c, b"{not json");
        o.observe(&mut c, b"\"text\"");
        assert!(c.usage.is_none() && c.error.is_none());
        let long = format!(r#"{{"error":{{"code":500,"message":"{}","status":"INTERNAL"}}}}"#, "é".repeat(2000));
        o.observe(&mut c, long.as_bytes());
        let e = c.error.unwrap();
        assert!(e.starts_with("INTERNAL: éé") && e.len() <= MAX_ERROR_BYTES + 3, "{}", e.len());
    }

    #[test]
    fn finish_reasons_are_bounded() {
        let choices: Vec<String> = (0..100).map(|i| format!(r#"{{"index":{i},"finish_reason":"stop"}}"#)).collect();
        let body = format!(r#"{{"choices":[{}]}}"#, choices.join(","));
        assert_eq!(run_json(Api::OpenAiChat, body.as_bytes(), 200, false).finish_reasons.len(), MAX_FINISH_REASONS);
    }
}
