//! The MCP server's response body as it streams to the agent: `application/json` (one message
//! or a batch) or `text/event-stream` (events carrying JSON-RPC responses, server requests and
//! notifications). Each message is matched to the request it answers by id; when the agent's
//! tool rules must hide tools from a `tools/list` result, the JSON body is held (bounded) and
//! SSE events are held one at a time (bounded) and rewritten. Otherwise bytes pass untouched
//! and only a bounded copy of a JSON body, or the SSE parser's current event, is kept.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::jsonrpc::{self, ResponseFacts};
use super::legacy::LegacyStream;
use crate::capture::Agent;
use crate::policy::mcp_tools::ToolRules;
use crate::protocol::http::BoxError;
use crate::protocol::llm::sse::{SseEvent, SseParser};
use crate::protocol::llm::Reporter;
use crate::telemetry::mcp::McpCall;

/// Why tollgate ended a response stream it had to filter.
#[derive(Debug, thiserror::Error)]
pub enum McpBodyError {
    /// A response that must be filtered is larger than tollgate may hold.
    #[error("MCP response exceeds {0} bytes and cannot be filtered: not forwarded")]
    TooLarge(usize),
}

/// The agent's tool rules, for hiding tools in `tools/list` results.
pub struct ToolFilter {
    /// Compiled rules.
    pub rules: Arc<ToolRules>,
    /// Who receives the list.
    pub agent: Arc<Agent>,
    /// The agent's groups.
    pub groups: Arc<[String]>,
}

impl ToolFilter {
    fn allowed(&self, tool: &str) -> bool {
        self.rules.refusal(&self.agent, &self.groups, tool).is_none()
    }
}

/// The requests of one HTTP exchange awaiting their responses, reported when it ends.
pub struct Exchange {
    /// One call per message sent (and `answered` once its response was seen).
    pub calls: Vec<(McpCall, bool)>,
    /// When the request arrived.
    pub t0: Instant,
    /// Where the calls go when the exchange ends.
    pub reporter: Arc<Reporter>,
    /// Set when tools must be hidden from `tools/list` results of this exchange.
    pub filter: Option<ToolFilter>,
    /// A legacy-transport GET stream: its session's POSTs name `tools/list` ids to filter here.
    pub legacy: Option<Arc<LegacyStream>>,
    /// The session the legacy stream registered under (from its `endpoint` event).
    pub legacy_session: Option<String>,
}

impl Exchange {
    /// Ids (JSON text) of the `tools/list` requests whose results must be filtered.
    fn list_ids(&self) -> Vec<String> {
        if self.filter.is_none() {
            return Vec::new();
        }
        let mut ids: Vec<String> = self
            .calls
            .iter()
            .filter(|(c, _)| c.method == "tools/list")
            .filter_map(|(c, _)| c.request_id.clone())
            .collect();
        if let Some(l) = &self.legacy {
            ids.extend(l.list_ids.lock().iter().cloned());
        }
        ids
    }

    /// Whether a response needs holding to be filtered (event by event for a legacy stream,
    /// whose `tools/list` answers are announced by later POSTs).
    pub fn filters(&self) -> bool {
        self.filter.is_some() && (self.legacy.is_some() || !self.list_ids().is_empty())
    }

    /// Record one server message.
    fn observe(&mut self, m: ResponseFacts) {
        let Some(id) = m.id else {
            if let Some((c, _)) = self.calls.first_mut() {
                c.notifications += 1;
            }
            return;
        };
        let elapsed = self.t0.elapsed();
        if let Some((c, answered)) = self.calls.iter_mut().find(|(c, a)| !a && c.request_id.as_deref() == Some(&id)) {
            *answered = true;
            c.duration = elapsed;
            if let Some((code, msg)) = m.error {
                c.error_code = Some(code);
                c.error = Some(msg);
            }
            if let Some(v) = m.protocol_version {
                c.protocol_version = Some(v);
            }
            if let Some(s) = m.server {
                c.server = Some(s.label());
            }
            if c.method == "initialize" && c.error_code.is_none() {
                if let Some(id) = &c.session_id {
                    let info = super::session::SessionInfo {
                        client: c.client.clone(),
                        server: c.server.clone(),
                        protocol_version: c.protocol_version.clone(),
                    };
                    super::session::record(id, info);
                }
            }
        }
    }

    /// Observe one message body (JSON text); returns its filtered form when tools were hidden.
    fn message(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let facts = match jsonrpc::parse_response(data) {
            Ok(f) => f,
            Err(e) => {
                if let (Some(l), None) = (&self.legacy, &self.legacy_session) {
                    if let Some(id) = super::legacy::session_of_endpoint(data) {
                        super::legacy::register(&id, l.clone());
                        if let Some((c, _)) = self.calls.first_mut() {
                            c.session_id = Some(id.clone());
                        }
                        self.legacy_session = Some(id);
                        return None;
                    }
                }
                tracing::debug!(error = %e, "unparsed MCP server message");
                return None;
            }
        };
        let mut out = None;
        if let Some(f) = &self.filter {
            let ids = self.list_ids();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            if facts.iter().any(|m| m.id.as_deref().is_some_and(|id| ids.contains(&id))) {
                if let Some(l) = &self.legacy {
                    // Answered: the stream stops waiting for these ids.
                    l.list_ids.lock().retain(|x| !facts.iter().any(|m| m.id.as_deref() == Some(x.as_str())));
                }
                let allowed = |t: &str| f.allowed(t);
                match jsonrpc::filter_tools_list(data, &ids, &allowed) {
                    Ok(Some((body, n))) => {
                        let own = facts.iter().find_map(|m| {
                            self.calls.iter().position(|(c, _)| c.request_id.is_some() && c.request_id == m.id)
                        });
                        // On a legacy stream the list was asked by a POST: count it on the stream.
                        if let Some((c, _)) = self.calls.get_mut(own.unwrap_or(0)) {
                            c.tools_hidden += n;
                        }
                        out = Some(body);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, "tools/list result not filterable"),
                }
            }
        }
        for m in facts {
            self.observe(m);
        }
        out
    }

    /// Observe one server message (a JSON body or one SSE event's data) without filtering:
    /// the uprobe observation path, which sees the response but cannot change it.
    pub(crate) fn observe_message(&mut self, data: &[u8]) {
        let _ = self.message(data);
    }

    /// Report every call: unanswered ones end now, with `error` when the stream failed.
    pub fn finish(&mut self, error: Option<String>) {
        let elapsed = self.t0.elapsed();
        for (mut c, answered) in self.calls.drain(..) {
            if !answered {
                c.duration = elapsed;
                if c.request_id.is_some() && c.error.is_none() {
                    c.error = error.clone();
                }
            }
            self.reporter.telemetry().mcp_call(&c);
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(id) = self.legacy_session.take() {
            super::legacy::unregister(&id);
        }
        if !self.calls.is_empty() {
            self.finish(Some("response not completed (agent went away)".into()));
        }
    }
}

enum Mode {
    /// `application/json`: a bounded copy, or (`hold`) the whole body held for filtering.
    Json { buf: Vec<u8>, max: usize, overflow: bool, hold: bool },
    /// `text/event-stream`; `held` keeps the bytes of the event in progress when filtering.
    Sse { parser: SseParser, held: Option<Vec<u8>>, max: usize },
}

/// An upstream MCP response body, observed (and filtered when needed) on its way to the agent.
pub struct McpBody<B = Incoming> {
    inner: B,
    mode: Mode,
    ex: Exchange,
    done: bool,
    /// tollgate's own events for a legacy stream (denials), written between server events.
    inject: Option<mpsc::Receiver<Bytes>>,
}

impl<B> McpBody<B> {
    /// Observe a JSON response: keep at most `max` bytes; `hold` returns it only once whole.
    pub fn json(inner: B, ex: Exchange, max: usize) -> Self {
        let hold = ex.filters();
        McpBody {
            inner,
            mode: Mode::Json { buf: Vec::new(), max, overflow: false, hold },
            ex,
            done: false,
            inject: None,
        }
    }

    /// Observe an SSE response with events of at most `max` bytes.
    pub fn sse(inner: B, ex: Exchange, max: usize) -> Self {
        let held = ex.filters().then(Vec::new);
        McpBody { inner, mode: Mode::Sse { parser: SseParser::new(max), held, max }, ex, done: false, inject: None }
    }

    /// Write the events `rx` yields into the stream, between the server's events (the stream
    /// must be held event by event, see [`Exchange::filters`]).
    pub fn with_injection(mut self, rx: mpsc::Receiver<Bytes>) -> Self {
        self.inject = Some(rx);
        self
    }

    /// Handle one chunk: the bytes to forward now (`None`: held).
    fn chunk(&mut self, data: Bytes) -> Result<Option<Bytes>, McpBodyError> {
        match &mut self.mode {
            Mode::Json { buf, max, overflow, hold } => {
                if *overflow {
                    return Ok(Some(data));
                }
                if buf.len() + data.len() > *max {
                    if *hold {
                        return Err(McpBodyError::TooLarge(*max));
                    }
                    *overflow = true;
                    buf.clear();
                    return Ok(Some(data));
                }
                buf.extend_from_slice(&data);
                Ok((!*hold).then_some(data))
            }
            Mode::Sse { parser, held, max } => {
                let ex = &mut self.ex;
                let Some(pending) = held else {
                    parser.feed(&data, |_, ev| {
                        if let SseEvent::Data(d) = ev {
                            ex.message(d);
                        }
                    });
                    return Ok(Some(data));
                };
                let mut out = Vec::with_capacity(data.len());
                let mut last = 0;
                let mut oversized = false;
                parser.feed(&data, |end, ev| {
                    let rewritten = match ev {
                        SseEvent::Data(d) => ex.message(d),
                        // An event too large to read cannot be filtered: refuse, never leak.
                        SseEvent::Oversized => {
                            oversized = true;
                            None
                        }
                        _ => None,
                    };
                    pending.extend_from_slice(&data[last..end]);
                    match rewritten {
                        None => out.extend_from_slice(pending),
                        Some(body) => rewrite_event(pending, &body, &mut out),
                    }
                    pending.clear();
                    last = end;
                });
                pending.extend_from_slice(&data[last..]);
                if oversized || pending.len() > *max {
                    return Err(McpBodyError::TooLarge(*max));
                }
                Ok((!out.is_empty()).then(|| Bytes::from(out)))
            }
        }
    }

    /// End of the upstream body: what is still to send, after the calls are reported.
    fn end(&mut self) -> Option<Bytes> {
        let tail = match &mut self.mode {
            Mode::Json { buf, overflow: false, hold, .. } if !buf.is_empty() => {
                let rewritten = self.ex.message(buf);
                match (hold, rewritten) {
                    (true, Some(b)) => Some(Bytes::from(b)),
                    (true, None) => Some(Bytes::from(std::mem::take(buf))),
                    (false, _) => None,
                }
            }
            Mode::Json { .. } => None,
            Mode::Sse { parser, held, .. } => {
                let ex = &mut self.ex;
                let mut rewritten = None;
                parser.finish(|_, ev| {
                    if let SseEvent::Data(d) = ev {
                        rewritten = ex.message(d);
                    }
                });
                match (held.take(), rewritten) {
                    (Some(p), Some(body)) => {
                        let mut out = Vec::new();
                        rewrite_event(&p, &body, &mut out);
                        Some(Bytes::from(out))
                    }
                    (Some(p), None) if !p.is_empty() => Some(Bytes::from(p)),
                    _ => None,
                }
            }
        };
        self.ex.finish(None);
        tail
    }
}

/// The raw event `raw` with its data replaced by `data`: other fields (`event`, `id`, `retry`)
/// are kept in order, the `data` lines become one line (JSON has no raw newlines).
fn rewrite_event(raw: &[u8], data: &[u8], out: &mut Vec<u8>) {
    let mut wrote = false;
    // Lines end in CRLF, LF or a lone CR (all valid SSE); the empty pieces are skipped.
    for line in raw.split(|b| *b == b'\n' || *b == b'\r') {
        if line.is_empty() {
            continue;
        }
        if line.starts_with(b"data") && matches!(line.get(4), None | Some(b':')) {
            if !wrote {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(data);
                out.push(b'\n');
                wrote = true;
            }
            continue;
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
}

impl<B> Body for McpBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError> + std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some(rx) = &mut this.inject {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(ev)) => return Poll::Ready(Some(Ok(Frame::data(ev)))),
                    Poll::Ready(None) => this.inject = None,
                    Poll::Pending => {}
                }
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match this.chunk(data) {
                        // The server (hyper) stops polling once a sized body is complete: end
                        // here, with the last bytes, rather than waiting for a `None`.
                        Ok(out) if this.inner.is_end_stream() => {
                            this.done = true;
                            let out = match (out, this.end()) {
                                (Some(a), Some(b)) => {
                                    let mut v = Vec::with_capacity(a.len() + b.len());
                                    v.extend_from_slice(&a);
                                    v.extend_from_slice(&b);
                                    Some(Bytes::from(v))
                                }
                                (a, b) => a.or(b),
                            };
                            return Poll::Ready(out.map(|b| Ok(Frame::data(b))));
                        }
                        Ok(Some(out)) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        Ok(None) => continue,
                        Err(e) => {
                            this.done = true;
                            this.ex.finish(Some(e.to_string()));
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    },
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => {
                    this.done = true;
                    this.ex.finish(Some(format!("upstream body: {e}")));
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => {
                    this.done = true;
                    return Poll::Ready(this.end().map(|b| Ok(Frame::data(b))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match &self.mode {
            // Passed through unchanged: the upstream's length stands.
            Mode::Json { hold: false, .. } | Mode::Sse { held: None, .. } if !self.done => self.inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewritten_event_keeps_other_fields() {
        let mut out = Vec::new();
        rewrite_event(b"event: message\r\nid: 7\r\ndata: {\"a\":\ndata: 1}\r\n\r\n", b"{\"b\":2}", &mut out);
        assert_eq!(out, b"event: message\nid: 7\ndata: {\"b\":2}\n\n");
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;
    use crate::config::TelemetryConfig;
    use crate::telemetry::Telemetry;

    fn reporter() -> Arc<Reporter> {
        let cfg = TelemetryConfig { access_log: "off".into(), ..Default::default() };
        Arc::new(Reporter::new(Arc::new(Telemetry::new(&cfg).expect("telemetry")), None))
    }

    fn exchange(reporter: &Arc<Reporter>, methods: &[(&str, &str)], filter: bool) -> Exchange {
        let agent = Arc::new(Agent::unknown("a"));
        let calls = methods
            .iter()
            .map(|(id, m)| {
                let mut c = McpCall::new(agent.clone(), Arc::from("r"), "POST", "/mcp", m.to_string());
                c.request_id = Some(id.to_string());
                (c, false)
            })
            .collect();
        let filter = filter.then(|| {
            let cfg = serde_yaml_ng::from_str("tools: [{name: no-delete, deny: ['delete_*']}]").expect("yaml");
            ToolFilter { rules: Arc::new(ToolRules::new(&cfg).expect("rules")), agent, groups: Arc::from(Vec::new()) }
        });
        Exchange { calls, t0: Instant::now(), reporter: reporter.clone(), filter, legacy: None, legacy_session: None }
    }

    /// Feed `input` cut at `cuts`; return what the agent receives and the calls' state.
    fn run(body: &mut McpBody<http_body_util::Empty<Bytes>>, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for end in cuts.iter().copied().chain([input.len()]) {
            if let Ok(Some(b)) = body.chunk(Bytes::copy_from_slice(&input[start..end])) {
                out.extend_from_slice(&b);
            }
            start = end;
        }
        let answered: Vec<(Option<i64>, u32, u32)> =
            body.ex.calls.iter().map(|(c, a)| (c.error_code.filter(|_| *a), c.tools_hidden, c.notifications)).collect();
        if let Some(t) = body.end() {
            out.extend_from_slice(&t);
        }
        out.extend(format!("|{answered:?}").bytes());
        out
    }

    const SSE: &[u8] = b"event: message\r\nid: 1\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\r\n\r\n\
event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"tools\":[{\"name\":\"get_weather\"},{\"name\":\"delete_file\"}]}}\n\n\
event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"error\":{\"code\":-32601,\"message\":\"no\"}}\n\n";

    #[test]
    fn sse_observed_and_filtered_at_every_split() {
        let r = reporter();
        let methods = [("2", "tools/list"), ("3", "ping")];
        for filter in [false, true] {
            let mut whole = McpBody::sse(http_body_util::Empty::new(), exchange(&r, &methods, filter), 1 << 16);
            let want = run(&mut whole, SSE, &[]);
            let text = String::from_utf8_lossy(&want).to_string();
            assert_eq!(text.contains("delete_file"), !filter, "{text}");
            assert!(text.contains("get_weather") && text.contains("id: 1"), "{text}");
            assert!(
                text.ends_with(if filter {
                    "[(None, 1, 1), (Some(-32601), 0, 0)]"
                } else {
                    "[(None, 0, 1), (Some(-32601), 0, 0)]"
                }),
                "{text}"
            );
            if !filter {
                assert!(want.starts_with(SSE), "pass-through is byte for byte");
            }
            for cut in 1..SSE.len() {
                let mut b = McpBody::sse(http_body_util::Empty::new(), exchange(&r, &methods, filter), 1 << 16);
                assert_eq!(run(&mut b, SSE, &[cut]), want, "filter {filter} split at {cut}");
            }
            let bytewise: Vec<usize> = (1..SSE.len()).collect();
            let mut b = McpBody::sse(http_body_util::Empty::new(), exchange(&r, &methods, filter), 1 << 16);
            assert_eq!(run(&mut b, SSE, &bytewise), want, "filter {filter} byte by byte");
        }
    }

    #[test]
    fn json_held_only_when_filtering_at_every_split() {
        let r = reporter();
        let json = br#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"get_weather"},{"name":"delete_file"}]}}"#;
        for filter in [false, true] {
            let mut whole =
                McpBody::json(http_body_util::Empty::new(), exchange(&r, &[("2", "tools/list")], filter), 1 << 16);
            let want = run(&mut whole, json, &[]);
            let text = String::from_utf8_lossy(&want).to_string();
            assert_eq!(text.contains("delete_file"), !filter, "{text}");
            for cut in 1..json.len() {
                let mut b =
                    McpBody::json(http_body_util::Empty::new(), exchange(&r, &[("2", "tools/list")], filter), 1 << 16);
                assert_eq!(run(&mut b, json, &[cut]), want, "split at {cut}");
            }
        }
        // Too large to hold: refused rather than leaked unfiltered.
        let mut b =
            McpBody::json(http_body_util::Empty::<Bytes>::new(), exchange(&r, &[("2", "tools/list")], true), 16);
        assert!(b.chunk(Bytes::from_static(json)).is_err());
    }
}
