//! The response body of an LLM call as the agent receives it: upstream frames passed through as
//! they arrive while usage, model, id and finish reasons are read on the side; one [`LlmCall`]
//! is reported when the body ends, fails, or is dropped early (client went away).
//!
//! Streams pass through untouched, except when tollgate itself asked for usage: then each SSE
//! event is released once complete, the usage-only chunk the client never asked for is
//! dropped, and the `"usage": null` member the provider adds to every other chunk is removed
//! (byte-exactly, chunk by chunk), so the agent sees what it would have got without tollgate.
//! A stream whose terminal event was handed to the agent is complete, even if the agent
//! closes before the body's own end arrives. When the agent and the provider speak different APIs, each complete event is
//! converted by a [`StreamTranslator`] as it arrives (never the whole stream). Usage is always
//! read from the provider's own events, before translation. Non-streamed bodies are forwarded
//! chunk by chunk while a capped copy is kept to be parsed at the end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::api::Observer;
use super::openai;
use super::sse::{SseEvent, SseParser};
use super::translate::StreamTranslator;
use super::Reporter;
use crate::policy::chain::ResponseFilter;
use crate::telemetry::LlmCall;

/// Runs once with the finished call, before it is reported: feeds the balancer (latency,
/// tokens) and releases what the call held (in-flight count, provider slot).
pub type FinishHook = Box<dyn FnOnce(&mut LlmCall) + Send>;

/// How one response is read and, when needed, converted.
pub(crate) struct Observation {
    /// Reads usage and the rest in the provider's API.
    pub(crate) observer: Observer,
    /// Converts each SSE event into the agent's API.
    pub(crate) translator: Option<Box<dyn StreamTranslator>>,
    /// See [`FinishHook`].
    pub(crate) on_finish: Option<FinishHook>,
    /// Rewrites a held non-streamed body at its end (response guardrails; `Mode::Json` with
    /// `hold`). Streams are filtered through `translator` instead.
    pub(crate) filter: Option<Box<dyn ResponseFilter>>,
}

impl Observation {
    /// Observe only.
    pub(crate) fn plain(observer: Observer) -> Self {
        Observation { observer, translator: None, on_finish: None, filter: None }
    }
}

/// How the body is observed.
pub(crate) enum Mode {
    /// `text/event-stream`.
    Sse {
        parser: SseParser,
        /// Remove the usage-only chunk (tollgate injected `include_usage`).
        drop_usage: bool,
        /// Bytes of the incomplete event (drop mode only).
        held: BytesMut,
        /// The current event outgrew `max`: its bytes are passed through as they come.
        passthrough: bool,
        max: usize,
    },
    /// Anything else: a capped copy parsed at the end. With `hold`, nothing is forwarded
    /// until the end, where the copy is filtered and sent whole (a body over `max` stops
    /// being held and passes unfiltered).
    Json { copy: Kept, max: usize, truncated: bool, hold: bool },
}

/// The kept copy of a non-streamed body. A body that arrives in one chunk (the usual case) is
/// kept by reference; only a body split over several chunks is joined.
#[derive(Default)]
pub(crate) enum Kept {
    /// Nothing yet.
    #[default]
    Empty,
    /// The only chunk so far.
    One(Bytes),
    /// Several chunks, joined.
    Joined(Vec<u8>),
}

impl Kept {
    fn len(&self) -> usize {
        match self {
            Kept::Empty => 0,
            Kept::One(b) => b.len(),
            Kept::Joined(v) => v.len(),
        }
    }

    fn push(&mut self, chunk: &Bytes) {
        if chunk.is_empty() {
            return;
        }
        match self {
            Kept::Empty => *self = Kept::One(chunk.clone()),
            Kept::One(first) => {
                let mut v = Vec::with_capacity(first.len() + chunk.len());
                v.extend_from_slice(first);
                v.extend_from_slice(chunk);
                *self = Kept::Joined(v);
            }
            Kept::Joined(v) => v.extend_from_slice(chunk),
        }
    }

    fn to_bytes(&self) -> Bytes {
        match self {
            Kept::Empty => Bytes::new(),
            Kept::One(b) => b.clone(),
            Kept::Joined(v) => Bytes::copy_from_slice(v),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Kept::Empty => &[],
            Kept::One(b) => b,
            Kept::Joined(v) => v,
        }
    }
}

impl Mode {
    pub(crate) fn sse(max_event: usize, drop_usage: bool) -> Self {
        Mode::Sse {
            parser: SseParser::new(max_event),
            drop_usage,
            held: BytesMut::new(),
            passthrough: false,
            max: max_event,
        }
    }

    pub(crate) fn json(max: usize) -> Self {
        Mode::Json { copy: Kept::Empty, max, truncated: false, hold: false }
    }

    /// [`Mode::json`] holding the body for a response filter.
    pub(crate) fn json_held(max: usize) -> Self {
        Mode::Json { copy: Kept::Empty, max, truncated: false, hold: true }
    }
}

/// Observed upstream response body (see the module docs).
pub struct ObservedBody {
    inner: Incoming,
    mode: Mode,
    obs: Observation,
    call: Option<Box<LlmCall>>,
    t0: Instant,
    reporter: Arc<Reporter>,
    /// The call was reported; nothing more is read from upstream.
    ended: bool,
    /// Trailers waiting behind a flushed tail.
    pending: Option<Frame<Bytes>>,
}

impl ObservedBody {
    pub(crate) fn new(
        inner: Incoming,
        mode: Mode,
        call: Box<LlmCall>,
        t0: Instant,
        reporter: Arc<Reporter>,
        obs: Observation,
    ) -> Self {
        let mut obs = obs;
        if matches!(mode, Mode::Sse { .. }) {
            obs.observer.streaming();
        }
        ObservedBody { inner, mode, obs, call: Some(call), t0, reporter, ended: false, pending: None }
    }

    /// Process one upstream data chunk; returns what the client gets now.
    fn on_data(&mut self, chunk: Bytes) -> Bytes {
        match self.call.as_deref_mut() {
            Some(call) => {
                let out = on_data(&mut self.mode, &mut self.obs, call, self.t0, chunk);
                if let Some(p) = call.payload.as_deref_mut() {
                    p.push_response(&out);
                }
                out
            }
            None => chunk,
        }
    }

    /// Bytes still held back at end of stream: an unterminated final event, or what the
    /// translator emits to close the agent's stream.
    fn take_tail(&mut self) -> Bytes {
        let tail = self.tail();
        if let Some(p) = self.call.as_deref_mut().and_then(|c| c.payload.as_deref_mut()) {
            p.push_response(&tail);
        }
        tail
    }

    fn tail(&mut self) -> Bytes {
        if let (Some(tr), Some(call), Mode::Sse { parser, .. }) =
            (self.obs.translator.as_mut(), self.call.as_deref_mut(), &mut self.mode)
        {
            let mut out = Vec::new();
            let observer = &mut self.obs.observer;
            parser.finish(|_, ev| {
                if let SseEvent::Data(d) = ev {
                    observer.observe(call, d);
                    tr.event(d, &mut out);
                }
            });
            tr.finish(&mut out);
            return Bytes::from(out);
        }
        match &mut self.mode {
            Mode::Sse { held, .. } => held.split().freeze(),
            Mode::Json { copy, hold: true, .. } => {
                let whole = copy.as_slice();
                match self.obs.filter.as_mut().and_then(|f| f.body(whole)) {
                    Some(new) => Bytes::from(new),
                    None => copy.to_bytes(),
                }
            }
            Mode::Json { .. } => Bytes::new(),
        }
    }

    /// Report the call (once). `error` is set for upstream failures and early drops.
    fn finish(&mut self, error: Option<String>) {
        self.ended = true;
        let Some(mut call) = self.call.take() else {
            return;
        };
        let observer = &mut self.obs.observer;
        match &mut self.mode {
            Mode::Sse { parser, .. } => parser.finish(|_, ev| {
                if let SseEvent::Data(d) = ev {
                    observer.observe(&mut call, d);
                }
            }),
            Mode::Json { copy, truncated: false, .. } if copy.len() > 0 => {
                observer.observe(&mut call, copy.as_slice());
            }
            Mode::Json { .. } => {}
        }
        call.duration = self.t0.elapsed();
        if error.is_some() {
            call.error = error;
        }
        let estimate = observer.end(&call);
        let needs_tokenizer = estimate.is_some();
        let hook = self.obs.on_finish.take();
        let reporter = self.reporter.clone();
        let settle = move |mut call: Box<LlmCall>| {
            if let Some(e) = estimate {
                e.apply(&mut call);
            }
            if let Some(hook) = hook {
                hook(&mut call);
            }
            reporter.report(*call);
        };
        // Tokenizing an estimate costs CPU in proportion to the text: never on an async worker.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if needs_tokenizer => {
                rt.spawn_blocking(move || settle(call));
            }
            _ => settle(call),
        }
    }
}

/// Observe one upstream chunk into `call`; returns the bytes the client gets now.
fn on_data(mode: &mut Mode, obs: &mut Observation, call: &mut LlmCall, t0: Instant, chunk: Bytes) -> Bytes {
    if call.ttft.is_none() && !chunk.is_empty() {
        call.ttft = Some(t0.elapsed());
    }
    let observer = &mut obs.observer;
    if let (Some(tr), Mode::Sse { parser, .. }) = (obs.translator.as_mut(), &mut *mode) {
        let mut out = Vec::new();
        parser.feed(&chunk, |_, ev| {
            if let SseEvent::Data(d) = ev {
                observer.observe(call, d);
                tr.event(d, &mut out);
            }
        });
        return Bytes::from(out);
    }
    match mode {
        Mode::Json { copy, max, truncated, hold: hold @ true } => {
            if copy.len() + chunk.len() <= *max {
                copy.push(&chunk);
                return Bytes::new();
            }
            // Too big to hold: release what is held and pass the rest through unfiltered.
            *hold = false;
            *truncated = true;
            let mut out = BytesMut::from(copy.as_slice());
            out.extend_from_slice(&chunk);
            *copy = Kept::Empty;
            out.freeze()
        }
        Mode::Json { copy, max, truncated, .. } => {
            if !*truncated {
                if copy.len() + chunk.len() <= *max {
                    copy.push(&chunk);
                } else {
                    *truncated = true;
                    *copy = Kept::Empty;
                }
            }
            chunk
        }
        Mode::Sse { parser, drop_usage: false, .. } => {
            parser.feed(&chunk, |_, ev| {
                if let SseEvent::Data(d) = ev {
                    observer.observe(call, d);
                }
            });
            chunk
        }
        Mode::Sse { parser, drop_usage: true, held, passthrough, max } => {
            let mut out = Out::default();
            let mut cursor = 0;
            parser.feed(&chunk, |end, ev| {
                let (usage_only, stripped) = match ev {
                    SseEvent::Data(d) => match observer.observe(call, d) {
                        true => (true, None),
                        false => (false, openai::without_null_usage(d.trim_ascii()).map(|s| (d, s))),
                    },
                    _ => (false, None),
                };
                if *passthrough {
                    out.push_held(held);
                    out.push(chunk.slice(cursor..end));
                } else if usage_only {
                    held.clear();
                } else if let Some(raw) = stripped.and_then(|(d, s)| replace_data(held, &chunk[cursor..end], d, &s)) {
                    held.clear();
                    out.push(Bytes::from(raw));
                } else {
                    out.push_held(held);
                    out.push(chunk.slice(cursor..end));
                }
                *passthrough = false;
                cursor = end;
            });
            let rest = chunk.len() - cursor;
            if *passthrough || held.len() + rest > *max {
                out.push_held(held);
                out.push(chunk.slice(cursor..));
                *passthrough = true;
            } else {
                held.extend_from_slice(&chunk[cursor..]);
            }
            out.finish()
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(f) = this.pending.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let frame = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => {
                            // Trailers end the body; anything still held goes out first.
                            let tail = this.take_tail();
                            this.finish(None);
                            if tail.is_empty() {
                                return Poll::Ready(Some(Ok(trailers)));
                            }
                            this.pending = Some(trailers);
                            return Poll::Ready(Some(Ok(Frame::data(tail))));
                        }
                    };
                    let mut out = this.on_data(frame);
                    if this.inner.is_end_stream() {
                        // Known length fully read: hyper may not poll again, so finish now.
                        let tail = this.take_tail();
                        if !tail.is_empty() {
                            let mut joined = BytesMut::from(&out[..]);
                            joined.extend_from_slice(&tail);
                            out = joined.freeze();
                        }
                        this.finish(None);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    if this.ended {
                        return Poll::Ready(None);
                    }
                }
                Some(Err(e)) => {
                    if this.obs.observer.complete() && this.pending.is_none() {
                        // The upstream failed after the terminal event (a reset instead of the
                        // chunked terminator): the agent has the whole response.
                        let tail = this.take_tail();
                        this.finish(None);
                        if tail.is_empty() {
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                    this.finish(Some(format!("upstream body: {e}")));
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let tail = this.take_tail();
                    this.finish(None);
                    if tail.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(tail))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.pending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.mode {
            Mode::Sse { drop_usage: true, .. } => SizeHint::default(),
            Mode::Json { hold: true, .. } => SizeHint::default(),
            _ if self.obs.translator.is_some() => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if self.call.is_some() {
            // A stream whose terminal event was handed on is complete for the agent: SDKs stop
            // reading at `[DONE]` (or `message_stop`) and close before the body's end arrives.
            let err = if self.inner.is_end_stream() || self.obs.observer.complete() {
                None
            } else {
                Some("client disconnected before the response ended".to_string())
            };
            self.finish(err);
        }
    }
}

/// The event whose raw bytes are `held` followed by `tail`, with its data payload `data`
/// replaced by `new`; `None` when the payload is not found verbatim in the raw bytes (data
/// spread over several `data:` lines), so the event is left as it was.
fn replace_data(held: &[u8], tail: &[u8], data: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let mut raw = Vec::with_capacity(held.len() + tail.len());
    raw.extend_from_slice(held);
    raw.extend_from_slice(tail);
    let data = data.trim_ascii();
    let at = memchr::memmem::find(&raw, data)?;
    raw.splice(at..at + data.len(), new.iter().copied());
    Some(raw)
}

/// Output of one chunk: a zero-copy slice in the common case, a joined buffer when held bytes
/// or a dropped event split it.
#[derive(Default)]
struct Out {
    single: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl Out {
    fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        match (&mut self.single, &mut self.joined) {
            (_, Some(j)) => j.extend_from_slice(&b),
            (None, None) => self.single = Some(b),
            (Some(s), None) => {
                let mut j = BytesMut::with_capacity(s.len() + b.len());
                j.extend_from_slice(s);
                j.extend_from_slice(&b);
                self.single = None;
                self.joined = Some(j);
            }
        }
    }

    fn push_held(&mut self, held: &mut BytesMut) {
        if !held.is_empty() {
            self.push(held.split().freeze());
        }
    }

    fn finish(self) -> Bytes {
        match (self.single, self.joined) {
            (_, Some(j)) => j.freeze(),
            (Some(s), None) => s,
            (None, None) => Bytes::new(),
        }
    }
}

#[cfg(test)]
#[path = "body_tests.rs"]
mod end_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn run(drop_usage: bool, input: &[u8], cuts: &[usize]) -> (Vec<u8>, LlmCall) {
        let mut mode = Mode::sse(1 << 16, drop_usage);
        let mut obs = Observation::plain(Observer::new(super::super::api::Api::OpenAiChat, Bytes::new(), false));
        let mut call = test_call();
        let mut out = Vec::new();
        let mut start = 0;
        let mut bounds = cuts.to_vec();
        bounds.push(input.len());
        let t0 = Instant::now();
        for end in bounds {
            let chunk = Bytes::copy_from_slice(&input[start..end]);
            out.extend_from_slice(&on_data(&mut mode, &mut obs, &mut call, t0, chunk));
            start = end;
        }
        if let Mode::Sse { held, .. } = &mode {
            out.extend_from_slice(held);
        }
        (out, call)
    }

    fn test_call() -> LlmCall {
        let agent = Arc::new(crate::capture::Agent::unknown("t"));
        let mut c = LlmCall::new(agent, Arc::from("r"), crate::config::ProviderKind::Openai, "chat");
        c.stream = true;
        c.status = 200;
        c.method = "POST".into();
        c.path = "/v1/chat/completions".into();
        c
    }

    const STREAM: &[u8] = b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n\
data: [DONE]\n\n";

    fn without_usage_chunk() -> Vec<u8> {
        let s = std::str::from_utf8(STREAM).unwrap();
        let start = s.find("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],").unwrap();
        let end = start + s[start..].find("\n\n").unwrap() + 2;
        [&STREAM[..start], &STREAM[end..]].concat()
    }

    #[test]
    fn usage_chunk_dropped_when_injected_any_chunking() {
        let want = without_usage_chunk();
        for cut in 1..STREAM.len() {
            let (out, call) = run(true, STREAM, &[cut]);
            assert_eq!(out, want, "cut {cut}");
            assert_eq!(call.usage.map(|u| u.total), Some(11));
            assert_eq!(call.finish_reasons, vec!["stop"]);
        }
        let bytewise: Vec<usize> = (1..STREAM.len()).collect();
        assert_eq!(run(true, STREAM, &bytewise).0, want);
    }

    /// What OpenAI streams when asked for usage: `"usage":null` in every chunk, then the
    /// usage-only chunk. The agent that did not ask gets neither, byte-exactly otherwise.
    #[test]
    fn null_usage_and_usage_chunk_removed_when_injected_any_chunking() {
        let with = std::str::from_utf8(STREAM)
            .unwrap()
            .replace("\"finish_reason\":null}]}", "\"finish_reason\":null}],\"usage\":null}");
        let with = with.replace("\"finish_reason\":\"stop\"}]}", "\"finish_reason\":\"stop\"}],\"usage\":null}");
        assert_eq!(with.matches("\"usage\":null").count(), 2);
        let want = without_usage_chunk();
        let bytewise: Vec<usize> = (1..with.len()).collect();
        for cuts in (1..with.len()).map(|c| vec![c]).chain([bytewise, vec![]]) {
            let (out, call) = run(true, with.as_bytes(), &cuts);
            assert_eq!(String::from_utf8(out).unwrap(), String::from_utf8(want.clone()).unwrap(), "cuts {cuts:?}");
            assert_eq!(call.usage.map(|u| u.total), Some(11));
        }
        // The client asked: everything as sent.
        assert_eq!(run(false, with.as_bytes(), &[7]).0, with.as_bytes());
    }

    #[test]
    fn usage_chunk_kept_when_client_asked() {
        let bytewise: Vec<usize> = (1..STREAM.len()).collect();
        let (out, call) = run(false, STREAM, &bytewise);
        assert_eq!(out, STREAM);
        assert_eq!(call.usage.map(|u| (u.input, u.output)), Some((9, 2)));
        assert_eq!(call.response_id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(call.response_model.as_deref(), Some("gpt-4o"));
    }
}
