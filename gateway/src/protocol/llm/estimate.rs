//! Token estimates for calls whose provider reported no usage: OpenAI-compatible servers that
//! ignore `include_usage`, streams cut short before their usage event, embedding APIs that
//! never report it. Counted with OpenAI's `o200k_base` BPE (exact for current OpenAI models, a
//! fair approximation for others); every estimate is flagged [`Usage::estimated`].
//!
//! Nothing is tokenized per request unless an estimate is needed: the prompt is walked once, at
//! the end of a call that reported no usage, and the output text of a stream (or of a whole
//! body on routes that ask for it) is only kept as it passes ([`OutputCounter`]) and tokenized
//! at the end of a call whose usage is missing or was cut short.
//!
//! Text is tokenized in pieces of at most [`PIECE`] bytes, cut before a space where possible.
//! BPE cost grows with the square of a pre-token's length (a long run of CJK text or base64 is
//! a single pre-token), so bounded pieces bound the CPU spent per byte; a cut before a space is
//! where the pre-tokenizer splits anyway, so the count barely moves.
//!
//! What is counted: text only (message strings and text parts, tool-call arguments, tool
//! results, tool definitions as their raw JSON), plus [`PER_MESSAGE`] tokens per message and
//! [`PER_REPLY`] per request for chat-like APIs, the framing overhead OpenAI documents for its
//! chat format. Images, audio and files are not counted.
//!
//! [`Usage::estimated`]: crate::telemetry::Usage::estimated

use std::borrow::Cow;
use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use super::api::{normalized, Api, Shape};
use super::json::{Cursor, Defer, Fast};

/// Why estimates are unavailable.
#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// The embedded `o200k_base` vocabulary could not be loaded.
    #[error("o200k_base tokenizer unavailable: {0}")]
    Tokenizer(String),
}

/// Most bytes handed to the tokenizer at once (see the module docs).
pub const PIECE: usize = 2048;

/// Output text an [`OutputCounter`] keeps to tokenize at the end of a call; longer outputs are
/// extrapolated from it.
pub const OUTPUT_BUDGET: usize = 32 * 1024;

/// Framing tokens per message (role and separators) in chat-like prompts.
pub const PER_MESSAGE: u64 = 3;

/// Tokens that prime the reply in chat-like prompts.
pub const PER_REPLY: u64 = 3;

/// Prompt text tokenized exactly; beyond it the count is extrapolated from the bytes/token
/// ratio seen so far, so a multi-megabyte prompt costs bounded CPU at the end of its call.
const PROMPT_BUDGET: usize = 256 * 1024;

/// Nesting walked for text; deeper content is counted as raw JSON.
const MAX_WALK: u32 = 12;

static BPE: OnceLock<Result<CoreBPE, EstimateError>> = OnceLock::new();

/// The shared tokenizer, loaded on first use. Loading takes a few hundred milliseconds: call
/// [`warm_up`] at startup (off the async runtime) to keep that off the first estimating call.
fn bpe() -> Result<&'static CoreBPE, &'static EstimateError> {
    BPE.get_or_init(|| {
        let loaded = match std::panic::catch_unwind(tiktoken_rs::o200k_base) {
            Ok(Ok(bpe)) => Ok(bpe),
            Ok(Err(e)) => Err(EstimateError::Tokenizer(e.to_string())),
            Err(_) => Err(EstimateError::Tokenizer("loading panicked".into())),
        };
        if let Err(e) = &loaded {
            tracing::warn!(error = %e, "token estimates disabled");
        }
        loaded
    })
    .as_ref()
}

/// Load the tokenizer now, so the first call that needs an estimate does not pay for it.
pub fn warm_up() -> Result<(), &'static EstimateError> {
    bpe().map(drop)
}

/// Whether estimates can be made (the tokenizer loaded).
pub fn available() -> bool {
    bpe().is_ok()
}

/// Tokens in `text` (`o200k_base`, no special tokens); 0 when estimates are unavailable.
pub fn count(text: &str) -> u64 {
    bpe().map_or(0, |b| count_with(b, text))
}

fn count_with(bpe: &CoreBPE, mut text: &str) -> u64 {
    let mut n = 0;
    while text.len() > PIECE {
        let at = cut(text, PIECE);
        n += bpe.encode_ordinary(&text[..at]).len() as u64;
        text = &text[at..];
    }
    if !text.is_empty() {
        n += bpe.encode_ordinary(text).len() as u64;
    }
    n
}

/// Where to end the next piece of `s` (longer than `max`): before the last space or newline in
/// its second half that follows a non-space, else at the last char boundary within `max`.
fn cut(s: &str, max: usize) -> usize {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end == 0 {
        return s.len();
    }
    let b = s.as_bytes();
    let lo = end / 2;
    for p in memchr::memrchr2_iter(b' ', b'\n', &b[lo..end]) {
        let at = lo + p;
        if at > 0 && !b[at - 1].is_ascii_whitespace() {
            return at;
        }
    }
    end
}

/// A unit of text found in a request or response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// Text to tokenize.
    Text(Cow<'a, str>),
    /// Tokens given as ids (prompt arrays of token ids).
    Tokens(u64),
}

/// Output tokens of a response, from its text as it streams past. Nothing is tokenized while
/// the response streams: deltas are only appended (up to [`OUTPUT_BUDGET`] bytes; beyond it
/// only their length is counted), and [`OutputCounter::finish`] tokenizes once, at the end of
/// a call that needs an estimate, off the async workers (see `ObservedBody`). So a stream is
/// never buffered whole and no CPU-heavy work runs per chunk.
#[derive(Debug, Default)]
pub struct OutputCounter {
    /// Text kept to be tokenized at the end (at most [`OUTPUT_BUDGET`] bytes).
    kept: String,
    /// Bytes of text seen beyond the budget: extrapolated from the kept text's ratio.
    extra: u64,
    /// Tokens given as ids.
    tokens: u64,
}

impl OutputCounter {
    /// An empty counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a text delta (appended, not tokenized).
    pub fn push(&mut self, text: &str) {
        let room = OUTPUT_BUDGET.saturating_sub(self.kept.len());
        if text.len() <= room {
            self.kept.push_str(text);
            return;
        }
        let mut at = room;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        self.kept.push_str(&text[..at]);
        self.extra = self.extra.saturating_add((text.len() - at) as u64);
    }

    /// Add tokens known without tokenizing.
    pub fn add_tokens(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_add(n);
    }

    pub(crate) fn push_piece(&mut self, p: Piece<'_>) {
        match p {
            Piece::Text(t) => self.push(&t),
            Piece::Tokens(n) => self.add_tokens(n),
        }
    }

    /// No output seen at all.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.extra == 0 && self.tokens == 0
    }

    /// Tokenize what was kept (CPU-heavy for long outputs: call off the async workers); the
    /// total so far, text beyond the budget extrapolated at the kept text's bytes per token
    /// (4 bytes per token when nothing was kept).
    pub fn finish(&mut self) -> u64 {
        let kept = count(&self.kept);
        let extra = match (self.kept.len() as u64, kept) {
            (0, _) | (_, 0) => self.extra.div_ceil(4),
            (bytes, n) => (self.extra.saturating_mul(n)).div_ceil(bytes),
        };
        self.kept.clear();
        self.extra = 0;
        self.tokens.saturating_add(kept).saturating_add(extra)
    }
}

/// Prompt tokens of a request body of `api`, with the framing overhead described in the module
/// docs. `None` when estimates are unavailable or the body is not JSON.
pub fn prompt_tokens(api: Api, body: &[u8]) -> Option<u64> {
    let bpe = bpe().ok()?;
    let mut p = Prompt::default();
    if let Err(Defer) = walk_request(api, body, bpe, &mut p) {
        p = Prompt::default();
        let n = normalized(body)?;
        walk_request(api, &n, bpe, &mut p).ok()?;
    }
    Some(p.total())
}

/// [`prompt_tokens`] on the estimate pool instead of the calling async worker: tokenizing a
/// large prompt takes long enough (hundreds of ms in debug builds) to hold up every other
/// connection on that worker. At most [`estimate_threads`] prompts are tokenized at once, on
/// Tokio's blocking threads; further callers wait (asynchronously, holding only the body they
/// already read, so the queue is bounded by `limits.max_connections`). Outside a Tokio runtime
/// it counts inline.
pub async fn prompt_tokens_off_runtime(api: Api, body: bytes::Bytes) -> Option<u64> {
    static SLOTS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    if tokio::runtime::Handle::try_current().is_err() {
        return prompt_tokens(api, &body);
    }
    let slots = SLOTS.get_or_init(|| tokio::sync::Semaphore::new(estimate_threads()));
    let _slot = slots.acquire().await.ok()?;
    tokio::task::spawn_blocking(move || prompt_tokens(api, &body)).await.ok().flatten()
}

/// Prompts tokenized at once by [`prompt_tokens_off_runtime`]: half the CPUs, at least one, so
/// a burst of large prompts leaves the other half to the async workers (accepting, relaying).
pub fn estimate_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// A prompt count in progress.
#[derive(Default)]
struct Prompt {
    /// Every token so far (text, ids, overhead).
    tokens: u64,
    /// Tokens and bytes of text tokenized exactly (the extrapolation ratio).
    text_tokens: u64,
    text_bytes: usize,
    /// Text past the budget.
    over_bytes: usize,
}

impl Prompt {
    fn add(&mut self, bpe: &CoreBPE, p: Piece<'_>) {
        match p {
            Piece::Tokens(n) => self.tokens = self.tokens.saturating_add(n),
            Piece::Text(t) => {
                // Tokenize what fits the budget (cut before a space), extrapolate the rest.
                let room = PROMPT_BUDGET.saturating_sub(self.text_bytes);
                let head = match t.len() {
                    n if n <= room => n,
                    _ if room < 64 => 0,
                    _ => cut(&t, room),
                };
                if head > 0 {
                    let n = count_with(bpe, &t[..head]);
                    self.tokens += n;
                    self.text_tokens += n;
                    self.text_bytes += head;
                }
                self.over_bytes += t.len() - head;
            }
        }
    }

    fn total(&self) -> u64 {
        let over = self.over_bytes as u64;
        let extra = if self.text_bytes >= 1024 {
            over.saturating_mul(self.text_tokens).div_ceil(self.text_bytes as u64)
        } else {
            over.div_ceil(4)
        };
        self.tokens + extra
    }
}

/// How a top-level request member is counted.
enum Role {
    /// A list of turns (or one turn given as a string): overhead per turn plus its text.
    Turns,
    /// One turn (system prompt, instructions).
    Turn,
    /// Text without framing (completion prompts, embedding inputs).
    Plain,
    /// Raw JSON (tool definitions).
    Raw,
    /// A nested request (Gemini `countTokens` wrapping a generate request).
    Nested,
    Skip,
}

fn role(api: Api, key: &[u8]) -> Role {
    match (api, key) {
        (Api::OpenAiChat, b"messages") => Role::Turns,
        (Api::OpenAiResponses, b"input") => Role::Turns,
        (Api::OpenAiResponses, b"instructions") => Role::Turn,
        (Api::OpenAiCompletions, b"prompt") | (Api::OpenAiEmbeddings, b"input") => Role::Plain,
        (Api::AnthropicMessages | Api::AnthropicCountTokens, b"messages") => Role::Turns,
        (Api::AnthropicMessages | Api::AnthropicCountTokens, b"system") => Role::Turn,
        (Api::GeminiEmbed, b"content") => Role::Plain,
        (Api::GeminiEmbed, _) => Role::Skip,
        (_, b"contents") if api.shape() == Shape::Gemini => Role::Turns,
        (_, b"systemInstruction" | b"system_instruction") if api.shape() == Shape::Gemini => Role::Turn,
        (Api::GeminiCountTokens, b"generateContentRequest" | b"generate_content_request") => Role::Nested,
        (Api::OpenAiEmbeddings | Api::OpenAiCompletions, _) => Role::Skip,
        (_, b"tools" | b"functions") => Role::Raw,
        _ => Role::Skip,
    }
}

fn walk_request(api: Api, body: &[u8], bpe: &CoreBPE, p: &mut Prompt) -> Fast<()> {
    let mut c = Cursor::new(body);
    walk_object(&mut c, api, bpe, p, 0)?;
    c.end()?;
    if api.is_generation() || matches!(api, Api::AnthropicCountTokens | Api::GeminiCountTokens) {
        p.tokens += PER_REPLY;
    }
    Ok(())
}

fn walk_object<'a>(c: &mut Cursor<'a>, api: Api, bpe: &CoreBPE, p: &mut Prompt, depth: u32) -> Fast<()> {
    c.object(|c, key| match role(api, key) {
        Role::Nested if depth == 0 && c.peek_byte() == Some(b'{') => walk_object(c, api, bpe, p, 1),
        Role::Nested | Role::Skip => c.skip(),
        r => {
            let mut sink = |piece: Piece<'_>| p.add(bpe, piece);
            match r {
                Role::Turns if c.peek_byte() == Some(b'[') => c.array(|c| {
                    sink(Piece::Tokens(PER_MESSAGE));
                    texts(c, 1, &mut sink)
                }),
                Role::Plain => texts(c, 0, &mut sink),
                Role::Raw => raw(c, &mut sink),
                _ => {
                    sink(Piece::Tokens(PER_MESSAGE));
                    texts(c, 1, &mut sink)
                }
            }
        }
    })
}

/// Hand every piece of text in a content value to `sink`: strings, arrays of strings or token
/// ids, and the text-bearing members of content parts, messages and output items of every
/// supported API (see the key list below). Other members are skipped.
pub(crate) fn texts<'a, F: FnMut(Piece<'a>)>(c: &mut Cursor<'a>, depth: u32, sink: &mut F) -> Fast<()> {
    match c.peek_byte() {
        Some(b'"') => {
            if let Some(s) = c.opt_string()? {
                if !s.is_empty() {
                    sink(Piece::Text(s));
                }
            }
            Ok(())
        }
        Some(b'[') if depth < MAX_WALK => c.array(|c| {
            if matches!(c.peek_byte(), Some(b'0'..=b'9')) {
                c.skip()?;
                sink(Piece::Tokens(1));
                Ok(())
            } else {
                texts(c, depth + 1, sink)
            }
        }),
        Some(b'{') if depth < MAX_WALK => c.object(|c, key| match key {
            // Text, parts and messages (all APIs), reasoning (OpenAI-compatible servers,
            // Anthropic thinking), tool calls and their results.
            b"text" | b"content" | b"parts" | b"thinking" | b"refusal" | b"reasoning_content" | b"reasoning"
            | b"output" | b"arguments" | b"partial_json" | b"summary" | b"tool_calls" | b"function"
            | b"functionCall" | b"function_call" | b"functionResponse" | b"function_response" => {
                texts(c, depth + 1, sink)
            }
            // Structured tool inputs and results, counted as written.
            b"input" | b"args" | b"response" => raw(c, sink),
            _ => c.skip(),
        }),
        Some(b'[' | b'{') => raw(c, sink),
        _ => c.skip(),
    }
}

/// A string as text; an object or array as its raw JSON text.
fn raw<'a, F: FnMut(Piece<'a>)>(c: &mut Cursor<'a>, sink: &mut F) -> Fast<()> {
    match c.peek_byte() {
        Some(b'"') => texts(c, 0, sink),
        Some(b'[' | b'{') => {
            let r = c.skip_raw()?;
            if r.len() > 2 {
                sink(Piece::Text(Cow::Borrowed(std::str::from_utf8(r).map_err(|_| Defer)?)));
            }
            Ok(())
        }
        _ => c.skip(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::api::test_support::{run_json, run_sse};
    use super::*;
    use crate::telemetry::Usage;

    #[test]
    fn counts_with_o200k() {
        assert!(available());
        assert_eq!(count("Hello world"), 2);
        assert_eq!(count(""), 0);
        let long = "The quick brown fox jumps over the lazy dog. ".repeat(400);
        let whole = bpe().unwrap().encode_ordinary(&long).len() as u64;
        assert_eq!(count(&long), whole, "cuts before spaces keep the exact count");
    }

    #[test]
    fn cuts_never_split_characters() {
        let cjk = "漢字かな交じり文".repeat(500);
        let mut rest = cjk.as_str();
        while rest.len() > PIECE {
            let at = cut(rest, PIECE);
            assert!(at > 0 && at <= PIECE && rest.is_char_boundary(at));
            rest = &rest[at..];
        }
        let n = count(&cjk);
        assert!(n > 1000 && n < 12_000, "{n}");
    }

    #[test]
    fn output_counter_matches_whole_text_within_a_percent() {
        let text =
            "Streaming tokens arrive in small deltas, some split mid-word; \"quotes\", numbers 12345 and\nnewlines. "
                .repeat(300);
        let whole = count(&text);
        for step in [1usize, 3, 7, 64, 5000] {
            let mut c = OutputCounter::new();
            let mut rest = text.as_str();
            while !rest.is_empty() {
                let mut at = step.min(rest.len());
                while !rest.is_char_boundary(at) {
                    at += 1;
                }
                c.push(&rest[..at]);
                assert!(c.kept.len() <= OUTPUT_BUDGET, "bounded");
                rest = &rest[at..];
            }
            let got = c.finish();
            assert!(got.abs_diff(whole) * 100 <= whole, "step {step}: {got} vs {whole}");
        }
    }

    fn prompt(api: Api, body: &str) -> u64 {
        prompt_tokens(api, body.as_bytes()).unwrap()
    }

    #[test]
    fn prompt_text_per_api() {
        let hw = count("Hello world");
        let chat = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Hello world"},
            {"role":"user","content":[{"type":"text","text":"Hello world"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#;
        assert_eq!(prompt(Api::OpenAiChat, chat), 2 * PER_MESSAGE + 2 * hw + PER_REPLY);
        let escaped = r#"{"messages":[{"role":"user","content":"Hello\u0020world"}]}"#;
        assert_eq!(prompt(Api::OpenAiChat, escaped), PER_MESSAGE + hw + PER_REPLY);

        let responses = r#"{"model":"o4-mini","instructions":"Hello world","input":"Hello world"}"#;
        assert_eq!(prompt(Api::OpenAiResponses, responses), 2 * PER_MESSAGE + 2 * hw + PER_REPLY);
        let items = r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"Hello world"}]},
            {"type":"function_call_output","call_id":"c1","output":"Hello world"}]}"#;
        assert_eq!(prompt(Api::OpenAiResponses, items), 2 * PER_MESSAGE + 2 * hw + PER_REPLY);

        assert_eq!(prompt(Api::OpenAiEmbeddings, r#"{"input":["Hello world","Hello world"],"model":"m"}"#), 2 * hw);
        assert_eq!(prompt(Api::OpenAiEmbeddings, r#"{"input":[[1,2,3],[4]]}"#), 4);
        assert_eq!(prompt(Api::OpenAiCompletions, r#"{"prompt":"Hello world","max_tokens":5}"#), hw + PER_REPLY);

        let anthropic = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"system":[{"type":"text","text":"Hello world"}],
            "messages":[{"role":"user","content":"Hello world"},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{"q":1}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"Hello world"}]}]}]}"#;
        let tool_input = count(r#"{"q":1}"#);
        assert_eq!(prompt(Api::AnthropicMessages, anthropic), 4 * PER_MESSAGE + 3 * hw + tool_input + PER_REPLY);

        let gemini = r#"{"systemInstruction":{"parts":[{"text":"Hello world"}]},
            "contents":[{"role":"user","parts":[{"text":"Hello world"},{"inlineData":{"mimeType":"image/png","data":"AAAA"}}]}]}"#;
        assert_eq!(prompt(Api::GeminiGenerate, gemini), 2 * PER_MESSAGE + 2 * hw + PER_REPLY);
        assert_eq!(prompt(Api::GeminiEmbed, r#"{"content":{"parts":[{"text":"Hello world"}]}}"#), hw);
    }

    #[test]
    fn tools_count_as_raw_json_and_bad_bodies_give_none() {
        let tools = r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]"#;
        let body = format!(r#"{{"messages":[],"tools":{tools}}}"#);
        assert_eq!(prompt(Api::OpenAiChat, &body), count(tools) + PER_REPLY);
        assert_eq!(prompt_tokens(Api::OpenAiChat, b"not json"), None);
        // Deeper than the cursor walks: still counted (through the normalised copy).
        let deep = format!(
            r#"{{"messages":[{{"role":"user","content":"Hello world","x":{}1{}}}]}}"#,
            "[".repeat(80),
            "]".repeat(80)
        );
        assert_eq!(prompt(Api::OpenAiChat, &deep), PER_MESSAGE + count("Hello world") + PER_REPLY);
    }

    #[test]
    fn estimates_when_compatible_servers_omit_usage() {
        let hw = count("Hello world");
        let prompt = PER_MESSAGE + hw + PER_REPLY;
        let s = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"llama-3.1-8b\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello\"}}]}\n\n\
                 data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"llama-3.1-8b\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":\"stop\"}]}\n\n\
                 data: [DONE]\n\n";
        for cut in [0, 17, 150] {
            let cuts: &[usize] = if cut == 0 { &[] } else { &[cut] };
            let c = run_sse(Api::OpenAiChat, s.as_bytes(), cuts, true);
            assert_eq!(
                c.usage,
                Some(Usage {
                    input: prompt,
                    output: hw,
                    total: prompt + hw,
                    cached_input: None,
                    reasoning: None,
                    estimated: true
                })
            );
        }
        // Without output counting the estimate has input only.
        let c = run_sse(Api::OpenAiChat, s.as_bytes(), &[], false);
        assert_eq!(c.usage.map(|u| (u.input, u.output, u.estimated)), Some((prompt, 0, true)));

        let r = "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hello world\"}\n\n\
                 data: {\"type\":\"response.audio.delta\",\"delta\":\"UklGRiQAAABXQVZFZm10IBAAAAABAAEA\"}\n\n";
        let c = run_sse(Api::OpenAiResponses, r.as_bytes(), &[], true);
        assert_eq!(c.usage.map(|u| (u.input, u.output, u.estimated)), Some((PER_MESSAGE + hw + PER_REPLY, hw, true)));

        // Non-streamed body without usage: output read from the message.
        let body = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello world","reasoning_content":"Hello world"},"finish_reason":"stop"}]}"#;
        let c = run_json(Api::OpenAiChat, body, 200, true);
        assert_eq!(c.usage.map(|u| (u.output, u.estimated)), Some((2 * hw, true)));

        // No estimate for failures or count-only APIs.
        assert_eq!(run_json(Api::OpenAiChat, br#"{"error":{"message":"bad"}}"#, 400, true).usage, None);
        assert_eq!(run_json(Api::GeminiCountTokens, b"{}", 200, true).usage, None);
    }

    #[test]
    fn huge_prompts_are_extrapolated() {
        let text = "word ".repeat(200_000);
        let body = format!(r#"{{"input":["{text}","{text}"]}}"#);
        let n = prompt(Api::OpenAiEmbeddings, &body);
        let exact = 2 * count(&text);
        assert!(n.abs_diff(exact) * 50 <= exact, "{n} vs {exact}");
    }
}
