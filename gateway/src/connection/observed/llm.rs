//! One observed LLM call: the request body read once for model and stream flags, the response
//! fed to the same [`Observer`] the proxy uses (JSON bodies whole and bounded, SSE event by
//! event, never the whole stream), and one [`LlmCall`] reported through the same [`Reporter`].

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::exchange::{End, Meta, Overflow};
use super::http1::Head;
use crate::config::ProviderKind;
use crate::protocol::llm::api::{self, Detected, Observer};
use crate::protocol::llm::sse::{SseEvent, SseParser};
use crate::protocol::llm::Reporter;
use crate::telemetry::{Capture, LlmCall, Payload, SpanIds};

/// How the response body is read.
enum Body {
    /// No response head yet, or a body that cannot be read (it does not decode).
    Waiting,
    /// `text/event-stream`: each event observed as it completes.
    Sse(SseParser),
    /// Anything else: a copy up to `limits.max_inspect_bytes`, read at the end (as the proxy).
    Json { copy: Vec<u8>, max: usize, truncated: bool },
}

/// An LLM call in flight on an observed connection.
pub(super) struct LlmExchange {
    call: Box<LlmCall>,
    det: Detected,
    provider: ProviderKind,
    request: BytesMut,
    request_done: bool,
    /// Bytes of the request body kept at most (the per-direction bound).
    max_request: usize,
    observer: Option<Observer>,
    body: Body,
    t0: Instant,
    reporter: Arc<Reporter>,
    log_payloads: Option<usize>,
    max_sse_event: usize,
    max_inspect: usize,
}

impl LlmExchange {
    /// A call recognised from its request head.
    pub(super) fn new(meta: &Meta, det: Detected, head: &Head, max_request: usize) -> Self {
        let route = &meta.route;
        let mut call =
            Box::new(LlmCall::new(meta.agent.clone(), route.name.clone(), route.provider, det.api.operation()));
        call.capture = Capture::Uprobe;
        call.method = head.method.clone();
        call.path = head.path.split_once('?').map_or(head.path.as_str(), |(p, _)| p).to_string();
        call.traceparent = head.header("traceparent").map(str::to_string);
        if meta.reporter.telemetry().tracing() {
            call.span_ids = Some(SpanIds::new(call.traceparent.as_deref()));
        }
        call.server_address = Some(route.server.0.clone());
        call.server_port = Some(route.server.1);
        LlmExchange {
            call,
            det,
            provider: route.provider,
            request: BytesMut::new(),
            request_done: false,
            max_request,
            observer: None,
            body: Body::Waiting,
            t0: Instant::now(),
            reporter: meta.reporter.clone(),
            log_payloads: route.log_payloads,
            max_sse_event: meta.max_sse_event,
            max_inspect: meta.max_inspect,
        }
    }

    /// Request body bytes: kept (bounded) until the request ends.
    pub(super) fn request_body(&mut self, b: &[u8]) -> Result<(), Overflow> {
        if self.request.len() + b.len() > self.max_request {
            return Err(Overflow);
        }
        self.request.extend_from_slice(b);
        Ok(())
    }

    /// The request ended: read model and stream flag once.
    pub(super) fn request_end(&mut self) {
        if self.request_done {
            return;
        }
        self.request_done = true;
        let bytes = &self.request;
        match api::inspect_request(self.det.api, bytes) {
            Some(info) => {
                self.call.stream = info.stream || self.det.api == api::Api::GeminiStreamGenerate;
                self.call.request_model = info.model.or_else(|| self.det.path_model.clone());
            }
            None => self.call.request_model = self.det.path_model.clone(),
        }
        if let Some(max) = self.log_payloads {
            self.call.payload = Some(Box::new(Payload::new(max, bytes)));
        }
    }

    /// The response head.
    pub(super) fn response_head(&mut self, head: &Head) {
        // A response before the request's end (an early error): read what was sent.
        self.request_end();
        self.call.status = head.status;
        let sse = head
            .header("content-type")
            .is_some_and(|v| v.trim_start().get(..17).is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream")));
        let request = std::mem::take(&mut self.request).freeze();
        let mut observer = Observer::new(self.det.api, request, self.provider == ProviderKind::OpenaiCompatible);
        // A compressed body arrives decoded (`super::decode`); one that cannot be is given up
        // by `lose_response_body`.
        self.body = if sse {
            observer.streaming();
            Body::Sse(SseParser::new(self.max_sse_event))
        } else {
            Body::Json { copy: Vec::new(), max: self.max_inspect, truncated: false }
        };
        self.observer = Some(observer);
    }

    /// `limits.max_inspect_bytes`: the plaintext a body may hold.
    pub(super) fn max_inspect(&self) -> usize {
        self.max_inspect
    }

    /// Where the call is reported.
    pub(super) fn reporter(&self) -> &Arc<Reporter> {
        &self.reporter
    }

    /// The body cannot be decoded: nothing of it is read (usage estimated from the request).
    pub(super) fn lose_response_body(&mut self) {
        self.body = Body::Waiting;
    }

    /// Response body bytes.
    pub(super) fn response_body(&mut self, b: &Bytes) {
        if b.is_empty() {
            return;
        }
        if self.call.ttft.is_none() {
            self.call.ttft = Some(self.t0.elapsed());
        }
        if let Some(p) = self.call.payload.as_deref_mut() {
            p.push_response(b);
        }
        let (Some(observer), call) = (self.observer.as_mut(), &mut *self.call) else { return };
        match &mut self.body {
            Body::Sse(parser) => parser.feed(b, |_, ev| {
                if let SseEvent::Data(d) = ev {
                    observer.observe(call, d);
                }
            }),
            Body::Json { copy, max, truncated } => {
                if !*truncated {
                    if copy.len() + b.len() <= *max {
                        copy.extend_from_slice(b);
                    } else {
                        *truncated = true;
                        *copy = Vec::new();
                    }
                }
            }
            Body::Waiting => {}
        }
    }

    /// Report the call. Tokenizing an estimate runs off the async workers, as in the proxy.
    pub(super) fn finish(mut self, end: End) {
        self.request_end();
        let mut call = self.call;
        let mut observer = match self.observer.take() {
            Some(o) => o,
            None => {
                // No response seen: nothing to read usage from.
                call.duration = self.t0.elapsed();
                call.error = Some(end.no_response());
                self.reporter.report(*call);
                return;
            }
        };
        match &mut self.body {
            Body::Sse(parser) => parser.finish(|_, ev| {
                if let SseEvent::Data(d) = ev {
                    observer.observe(&mut call, d);
                }
            }),
            // Lost bytes make a copy unreadable at best and misleading at worst.
            Body::Json { copy, truncated: false, .. } if !copy.is_empty() && !end.loses_bytes() => {
                observer.observe(&mut call, copy);
            }
            Body::Json { .. } | Body::Waiting => {}
        }
        call.duration = self.t0.elapsed();
        let complete = end.is_complete() || observer.complete();
        if !complete {
            if let Some(e) = end.cut_error() {
                call.error = Some(e);
            }
        }
        // A gap (or a dropped state) leaves the count open unless the terminal event was seen;
        // a response whose request lost bytes, or whose pairing is in doubt, is never exact.
        let flag = (!complete && end.loses_bytes()) || end.flags();
        let estimate = observer.end(&call);
        let needs_tokenizer = estimate.is_some();
        let reporter = self.reporter.clone();
        let settle = move |mut call: Box<LlmCall>| {
            if let Some(e) = estimate {
                e.apply(&mut call);
            }
            if flag {
                if let Some(u) = call.usage.as_mut() {
                    u.estimated = true;
                }
            }
            reporter.report(*call);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if needs_tokenizer => {
                rt.spawn_blocking(move || settle(call));
            }
            _ => settle(call),
        }
    }
}
