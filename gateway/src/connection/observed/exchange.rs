//! One request/response exchange on an observed connection, by what its route speaks: an LLM
//! call ([`super::llm`]), MCP messages, an A2A hop or agent card, or something tollgate only
//! frames. MCP and A2A feed the proxy's own readers ([`Exchange`], [`ResponseReader`]) and
//! report through the same telemetry, marked `capture = uprobe`.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::http1::Head;
use super::llm::LlmExchange;
use crate::capture::Agent;
use crate::config::{ProviderKind, RouteProtocol};
use crate::protocol::a2a::rpc::{ResponseReader, RpcRequest};
use crate::protocol::llm::sse::{SseEvent, SseParser};
use crate::protocol::llm::Reporter;
use crate::protocol::mcp::body::Exchange;
use crate::protocol::mcp::jsonrpc::{self, RequestFacts};
use crate::telemetry::a2a::A2aHop;
use crate::telemetry::mcp::McpCall;
use crate::telemetry::{Capture, SpanIds};

/// A body outgrew what may be held for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Overflow;

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum End {
    /// Its response ended by its own framing (or by close, for read-until-close bodies).
    Complete,
    /// The connection closed first.
    Closed,
    /// Bytes of the response were lost (capture gap).
    Gap,
    /// The response ended whole, but bytes of its request were lost, or responses before it
    /// may have been (its pairing is in doubt): read, but its usage flagged estimated.
    Flagged,
    /// tollgate dropped the connection's L7 state (a bound; the reason).
    Dropped(&'static str),
}

impl End {
    pub(super) fn is_complete(&self) -> bool {
        matches!(self, End::Complete | End::Flagged)
    }

    /// Usage read from the response cannot count as exact.
    pub(super) fn flags(&self) -> bool {
        matches!(self, End::Flagged)
    }

    /// What was observed is missing bytes: usage cannot be exact unless the terminal event
    /// was seen.
    pub(super) fn loses_bytes(&self) -> bool {
        matches!(self, End::Gap | End::Dropped(_))
    }

    /// The error recorded on a call cut by this end (a gap is no error of the call's, only of
    /// its observation: it shows as estimated usage).
    pub(super) fn cut_error(&self) -> Option<String> {
        match self {
            End::Complete | End::Flagged | End::Gap => None,
            End::Closed => Some("connection closed before the response ended".into()),
            End::Dropped(r) => Some(format!("observation dropped ({r}) before the response ended")),
        }
    }

    /// The error of a call that never got a response.
    pub(super) fn no_response(&self) -> String {
        match self {
            End::Dropped(r) => format!("observation dropped ({r}) before a response"),
            End::Gap => "capture gap before a response".into(),
            End::Complete | End::Flagged | End::Closed => "connection closed before a response".into(),
        }
    }
}

/// The route a request was matched to, as observation needs it.
#[derive(Debug, Clone)]
pub(super) struct RouteInfo {
    /// Route name.
    pub(super) name: Arc<str>,
    /// What the route's destination speaks.
    pub(super) protocol: RouteProtocol,
    /// Route API kind.
    pub(super) provider: ProviderKind,
    /// `log_payloads.max_bytes` when on.
    pub(super) log_payloads: Option<usize>,
    /// `match.paths`.
    pub(super) paths: Arc<[String]>,
    /// `server.address` (the request's Host, without port) and `server.port` (original
    /// destination port): what an intercepted call reports (SNI and port).
    pub(super) server: (String, u16),
    /// Agent name of the destination pod (A2A on Kubernetes nodes).
    pub(super) callee_pod: Option<Arc<str>>,
}

/// What every exchange of a connection shares.
pub(super) struct Meta {
    /// The agent, resolved from the kernel record.
    pub(super) agent: Arc<Agent>,
    /// The route of this request.
    pub(super) route: RouteInfo,
    /// Where calls are reported.
    pub(super) reporter: Arc<Reporter>,
    /// `limits.max_sse_event_bytes`.
    pub(super) max_sse_event: usize,
    /// `limits.max_inspect_bytes`.
    pub(super) max_inspect: usize,
    /// `mcp.max_batch_len`.
    pub(super) max_batch: usize,
}

/// One exchange in flight.
pub(super) enum Call {
    /// A recognised LLM call.
    Llm(Box<LlmExchange>),
    /// MCP messages of one HTTP request.
    Mcp(Box<McpExchange>),
    /// An A2A JSON-RPC hop.
    A2a(Box<A2aExchange>),
    /// An A2A agent-card fetch (its name names later hops' callee).
    Card(Box<CardFetch>),
    /// Framed only.
    Other,
}

impl Call {
    /// The exchange a request head starts.
    pub(super) fn start(meta: Option<Meta>, head: &Head, max_body: usize) -> Call {
        let Some(meta) = meta else { return Call::Other };
        let path = head.path.split_once('?').map_or(head.path.as_str(), |(p, _)| p);
        match meta.route.protocol {
            RouteProtocol::Llm => {
                let paths = &meta.route.paths;
                if !paths.is_empty() && !paths.iter().any(|p| path.starts_with(p.as_str())) {
                    return Call::Other;
                }
                let Ok(method) = http::Method::from_bytes(head.method.as_bytes()) else { return Call::Other };
                match crate::protocol::llm::api::detect(meta.route.provider, &method, &head.path) {
                    Some(det) => Call::Llm(Box::new(LlmExchange::new(&meta, det, head, max_body))),
                    None => Call::Other,
                }
            }
            RouteProtocol::Mcp => Call::Mcp(Box::new(McpExchange::new(meta, head, max_body))),
            RouteProtocol::A2a if head.method == "POST" => Call::A2a(Box::new(A2aExchange::new(meta, head, max_body))),
            RouteProtocol::A2a if head.method == "GET" && crate::protocol::a2a::is_card_path(path) => {
                let key = format!("{}:{}", meta.route.server.0, meta.route.server.1);
                Call::Card(Box::new(CardFetch { key, buf: Vec::new(), overflow: false, ok: false }))
            }
            RouteProtocol::A2a => Call::Other,
        }
    }

    /// Request body bytes.
    pub(super) fn request_body(&mut self, b: &[u8]) -> Result<(), Overflow> {
        match self {
            Call::Llm(x) => x.request_body(b),
            Call::Mcp(x) => keep(&mut x.request, b, x.max_request),
            Call::A2a(x) => keep(&mut x.request, b, x.max_request),
            Call::Card(_) | Call::Other => Ok(()),
        }
    }

    /// The request ended.
    pub(super) fn request_end(&mut self) {
        match self {
            Call::Llm(x) => x.request_end(),
            Call::Mcp(x) => x.request_end(),
            Call::A2a(x) => x.request_end(),
            Call::Card(_) | Call::Other => {}
        }
    }

    /// The (final, non-1xx) response head.
    pub(super) fn response_head(&mut self, head: &Head) {
        match self {
            Call::Llm(x) => x.response_head(head),
            Call::Mcp(x) => x.response_head(head),
            Call::A2a(x) => x.response_head(head),
            Call::Card(x) => x.ok = (200..300).contains(&head.status),
            Call::Other => {}
        }
    }

    /// The plaintext a body of this exchange may hold (and so its decoder); `None`: its bodies
    /// are not read, so not decoded either.
    pub(super) fn body_bound(&self) -> Option<usize> {
        match self {
            Call::Llm(x) => Some(x.max_inspect()),
            Call::Mcp(x) => Some(x.meta.max_inspect),
            Call::A2a(x) => Some(x.meta.max_inspect),
            Call::Card(_) => Some(crate::protocol::a2a::MAX_CARD_BYTES),
            Call::Other => None,
        }
    }

    /// Where a body given up is counted.
    pub(super) fn reporter(&self) -> Option<&Arc<Reporter>> {
        match self {
            Call::Llm(x) => Some(x.reporter()),
            Call::Mcp(x) => Some(&x.meta.reporter),
            Call::A2a(x) => Some(&x.meta.reporter),
            Call::Card(_) | Call::Other => None,
        }
    }

    /// The response body cannot be decoded: what was read of it is let go, nothing more is
    /// read (the exchange ends flagged, its usage estimated).
    pub(super) fn lose_response_body(&mut self) {
        match self {
            Call::Llm(x) => x.lose_response_body(),
            Call::Mcp(x) => x.body = McpBody::Waiting,
            Call::A2a(x) => x.reader = ResponseReader::new(x.hop.stream, 0),
            Call::Card(x) => {
                x.overflow = true;
                x.buf = Vec::new();
            }
            Call::Other => {}
        }
    }

    /// Response body bytes.
    pub(super) fn response_body(&mut self, b: &Bytes) {
        match self {
            Call::Llm(x) => x.response_body(b),
            Call::Mcp(x) => x.response_body(b),
            Call::A2a(x) => x.reader.feed(b),
            Call::Card(x) => {
                if x.buf.len() + b.len() > crate::protocol::a2a::MAX_CARD_BYTES {
                    x.overflow = true;
                    x.buf = Vec::new();
                } else if !x.overflow {
                    x.buf.extend_from_slice(b);
                }
            }
            Call::Other => {}
        }
    }

    /// The exchange is over: report it.
    pub(super) fn finish(self, end: End) {
        match self {
            Call::Llm(x) => x.finish(end),
            Call::Mcp(x) => x.finish(end),
            Call::A2a(x) => x.finish(end),
            Call::Card(x) => {
                if x.ok && !x.overflow && end == End::Complete {
                    crate::protocol::a2a::remember_card(x.key, &x.buf);
                }
            }
            Call::Other => {}
        }
    }
}

fn keep(buf: &mut BytesMut, b: &[u8], max: usize) -> Result<(), Overflow> {
    if buf.len() + b.len() > max {
        return Err(Overflow);
    }
    buf.extend_from_slice(b);
    Ok(())
}

pub(super) fn is_sse(head: &Head) -> bool {
    head.header("content-type")
        .is_some_and(|v| v.trim_start().get(..17).is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream")))
}

/// An agent card on its way to the agent, kept (bounded) until it ends.
pub(super) struct CardFetch {
    key: String,
    buf: Vec<u8>,
    overflow: bool,
    ok: bool,
}

/// How an MCP response body is read.
enum McpBody {
    Waiting,
    Json { buf: Vec<u8>, max: usize, overflow: bool },
    Sse(SseParser),
}

/// The MCP messages of one observed HTTP request.
pub(super) struct McpExchange {
    pub(super) meta: Meta,
    head: Head,
    request: BytesMut,
    max_request: usize,
    ex: Option<Exchange>,
    body: McpBody,
    t0: Instant,
}

impl McpExchange {
    fn new(meta: Meta, head: &Head, max_request: usize) -> Self {
        McpExchange {
            meta,
            head: head.clone(),
            request: BytesMut::new(),
            max_request,
            ex: None,
            body: McpBody::Waiting,
            t0: Instant::now(),
        }
    }

    fn call(&self, http_method: &'static str, method: String) -> McpCall {
        let m = &self.meta;
        let path = self.head.path.split_once('?').map_or(self.head.path.as_str(), |(p, _)| p);
        let mut c = McpCall::new(m.agent.clone(), m.route.name.clone(), http_method, path, method);
        c.capture = Capture::Uprobe;
        c.session_id = self.head.header(crate::protocol::mcp::SESSION).map(str::to_string);
        c.protocol_version = self.head.header(crate::protocol::mcp::VERSION).map(str::to_string);
        c.traceparent = self.head.header("traceparent").map(str::to_string);
        c.server_address = Some(m.route.server.clone());
        if m.reporter.telemetry().tracing() {
            c.span_ids = Some(SpanIds::new(c.traceparent.as_deref()));
        }
        c
    }

    /// Read the messages once (POST), or make the one call of a GET stream or DELETE.
    fn request_end(&mut self) {
        if self.ex.is_some() {
            return;
        }
        let mut calls = Vec::new();
        match self.head.method.as_str() {
            "POST" => {
                // What tollgate cannot read passes through the proxy unreported too.
                if let Ok(msgs) = jsonrpc::parse_request(&self.request, self.meta.max_batch) {
                    for m in &msgs {
                        let mut c = self.call("POST", m.method.clone().unwrap_or_else(|| "response".into()));
                        crate::protocol::mcp::fill(&mut c, m);
                        calls.push((c, false));
                    }
                }
            }
            other => {
                let http_method = match other {
                    "GET" => "GET",
                    "DELETE" => "DELETE",
                    _ => "OTHER",
                };
                let mut c = self.call(http_method, http_method.to_string());
                crate::protocol::mcp::fill(&mut c, &RequestFacts::default());
                calls.push((c, false));
            }
        }
        self.request = BytesMut::new();
        self.ex = Some(Exchange {
            calls,
            t0: self.t0,
            reporter: self.meta.reporter.clone(),
            filter: None,
            legacy: None,
            legacy_session: None,
        });
    }

    fn response_head(&mut self, head: &Head) {
        self.request_end();
        let Some(ex) = self.ex.as_mut() else { return };
        let session = head.header(crate::protocol::mcp::SESSION).map(str::to_string);
        let post = self.head.method == "POST";
        for (c, answered) in ex.calls.iter_mut() {
            c.status = head.status;
            if c.session_id.is_none() {
                c.session_id.clone_from(&session);
            }
            // Notifications and client responses (202), and HTTP errors: nothing to correlate.
            if post && (!(200..300).contains(&head.status) || head.status == 202) {
                if !(200..300).contains(&head.status) {
                    c.error = Some(format!("HTTP {}", head.status));
                }
                *answered = true;
            }
        }
        if self.head.method == "DELETE" && (200..300).contains(&head.status) {
            if let Some(id) = ex.calls.first().and_then(|(c, _)| c.session_id.as_deref()) {
                crate::protocol::mcp::session::forget(id);
            }
        }
        let read = (200..300).contains(&head.status) && head.status != 202 || !post;
        self.body = match (read, is_sse(head)) {
            (false, _) => McpBody::Waiting,
            (true, true) => McpBody::Sse(SseParser::new(self.meta.max_sse_event)),
            (true, false) if post => McpBody::Json { buf: Vec::new(), max: self.meta.max_inspect, overflow: false },
            // A GET or DELETE answered without a stream: nothing to read.
            (true, false) => McpBody::Waiting,
        };
    }

    fn response_body(&mut self, b: &[u8]) {
        let Some(ex) = self.ex.as_mut() else { return };
        match &mut self.body {
            McpBody::Sse(p) => p.feed(b, |_, ev| {
                if let SseEvent::Data(d) = ev {
                    ex.observe_message(d);
                }
            }),
            McpBody::Json { overflow: true, .. } => {}
            McpBody::Json { buf, max, overflow } => {
                if buf.len() + b.len() > *max {
                    *overflow = true;
                    *buf = Vec::new();
                } else {
                    buf.extend_from_slice(b);
                }
            }
            McpBody::Waiting => {}
        }
    }

    fn finish(mut self, end: End) {
        self.request_end();
        let Some(mut ex) = self.ex.take() else { return };
        match &mut self.body {
            McpBody::Sse(p) => p.finish(|_, ev| {
                if let SseEvent::Data(d) = ev {
                    ex.observe_message(d);
                }
            }),
            McpBody::Json { buf, overflow: false, .. } if !buf.is_empty() && !end.loses_bytes() => {
                ex.observe_message(buf);
            }
            McpBody::Json { .. } | McpBody::Waiting => {}
        }
        let error = match &end {
            End::Complete | End::Flagged => None,
            End::Gap => Some("capture gap: response not fully observed".to_string()),
            other => other.cut_error(),
        };
        ex.finish(error);
    }
}

/// One observed A2A hop.
pub(super) struct A2aExchange {
    pub(super) meta: Meta,
    hop: Box<A2aHop>,
    request: BytesMut,
    max_request: usize,
    reader: ResponseReader,
    responded: bool,
    t0: Instant,
}

impl A2aExchange {
    fn new(meta: Meta, head: &Head, max_request: usize) -> Self {
        let r = &meta.route;
        let traceparent = head.header("traceparent").map(str::to_string);
        let destination = format!("{}:{}", r.server.0, r.server.1);
        let hop = Box::new(A2aHop::arrived(
            meta.reporter.telemetry(),
            meta.agent.clone(),
            r.name.clone(),
            crate::protocol::a2a::callee_at(&destination, r.callee_pod.as_ref(), &r.name),
            traceparent,
            r.server.clone(),
            Capture::Uprobe,
        ));
        let max = meta.max_inspect;
        A2aExchange {
            meta,
            hop,
            request: BytesMut::new(),
            max_request,
            reader: ResponseReader::new(false, max),
            responded: false,
            t0: Instant::now(),
        }
    }

    fn request_end(&mut self) {
        if self.hop.method != "invalid" || self.request.is_empty() {
            return;
        }
        let rpc = RpcRequest::parse(&self.request);
        self.hop.method = rpc.method;
        self.hop.request_id = rpc.id;
        self.hop.skill = rpc.skill;
        self.hop.task_id = rpc.task_id;
        self.request = BytesMut::new();
    }

    fn response_head(&mut self, head: &Head) {
        self.request_end();
        self.responded = true;
        self.hop.status = head.status;
        self.hop.stream = is_sse(head);
        let max = if self.hop.stream { self.meta.max_sse_event } else { self.meta.max_inspect };
        self.reader = ResponseReader::new(self.hop.stream, max);
    }

    fn finish(mut self, end: End) {
        self.request_end();
        let error = match (&end, self.responded) {
            (End::Complete | End::Flagged, _) => None,
            (End::Gap, true) => Some("capture gap: response not fully observed".to_string()),
            (_, true) => end.cut_error(),
            (_, false) => Some(end.no_response()),
        };
        crate::protocol::a2a::settle(&mut self.hop, &mut self.reader, self.t0, error);
        self.meta.reporter.telemetry().a2a_hop(&self.hop);
    }
}
