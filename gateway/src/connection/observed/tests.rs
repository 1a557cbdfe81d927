//! The observation task fed event streams built from real wire formats, with the real
//! telemetry: exact token counts per agent scraped from the metrics text, whatever the split
//! of the byte stream into events.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gateway_common::CaptureRecord;
use tokio::sync::{mpsc, watch};

use super::tests_wire::*;
use super::*;
use crate::config::TelemetryConfig;

pub(super) const CONFIG: &str = "
capture: {self_mark: 0}
agents:
- {name: billing, match: {comm: billing-bot}}
- {name: support, match: {comm: support-bot}}
routes:
- {name: openai, match: {hosts: [api.openai.com]}, provider: openai}
- {name: anthropic, match: {hosts: [api.anthropic.com]}, provider: anthropic}
- {name: tools, match: {hosts: [mcp.internal]}, protocol: mcp}
- {name: booking, match: {hosts: [booking.internal]}, protocol: a2a}
- {name: terminated, match: {hosts: [intercepted.internal]}, provider: openai, intercept: true}
";

/// How a byte stream is cut into events.
#[derive(Debug, Clone, Copy)]
pub(super) enum Split {
    /// One event per message as written.
    Whole,
    /// Fixed-size pieces.
    Every(usize),
    /// Pseudo-random sizes 1..=97 from a seed.
    Random(u64),
}

pub(super) const SPLITS: [Split; 6] =
    [Split::Whole, Split::Every(1), Split::Every(2), Split::Every(7), Split::Every(64), Split::Random(17)];

impl Split {
    fn cut(self, b: &[u8]) -> Vec<Bytes> {
        let size = |state: &mut u64| -> usize {
            match self {
                Split::Whole => usize::MAX,
                Split::Every(n) => n,
                Split::Random(_) => {
                    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    1 + (*state >> 33) as usize % 97
                }
            }
        };
        let mut state = match self {
            Split::Random(s) => s,
            _ => 0,
        };
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let n = size(&mut state).min(b.len() - at);
            out.push(Bytes::copy_from_slice(&b[at..at + n]));
            at += n;
        }
        out
    }
}

/// The task under test with its telemetry.
pub(super) struct Harness {
    pub(super) tx: mpsc::Sender<TlsEvent>,
    pub(super) telemetry: Arc<Telemetry>,
    pub(super) calls: mpsc::Receiver<LlmCall>,
    /// What the proxy marks as intercepted (under `intercept: auto`).
    pub(super) intercepted: Arc<crate::connection::trust::Intercepted>,
    handle: JoinHandle<()>,
    _shutdown: watch::Sender<bool>,
}

impl Harness {
    pub(super) fn start(limits: ObservedLimits) -> Harness {
        Self::with_config(CONFIG, limits)
    }

    pub(super) fn with_config(yaml: &str, limits: ObservedLimits) -> Harness {
        Self::with_access_log(yaml, limits, "off")
    }

    pub(super) fn with_access_log(yaml: &str, limits: ObservedLimits, access_log: &str) -> Harness {
        let cfg = crate::config::from_str("t.yaml", yaml).expect("config");
        let tcfg = TelemetryConfig { access_log: access_log.into(), ..Default::default() };
        let telemetry = Arc::new(Telemetry::new(&tcfg).expect("telemetry"));
        let agents = Arc::new(AgentResolver::new(&cfg.agents, None));
        let (tx, rx) = mpsc::channel(1024);
        let (otx, calls) = mpsc::channel(1024);
        let (stx, srx) = watch::channel(false);
        let intercepted = Arc::new(crate::connection::trust::Intercepted::default());
        let deps = ObservedDeps {
            config: Arc::new(ArcSwap::from_pointee(cfg)),
            agents,
            telemetry: telemetry.clone(),
            limits,
            observer: Some(otx),
            intercepted: intercepted.clone(),
        };
        let handle = spawn(rx, deps, srx);
        Harness { tx, telemetry, calls, intercepted, handle, _shutdown: stx }
    }

    /// Send `bytes` of `conn` in `dir`, cut by `split`.
    pub(super) async fn send(&self, c: &TestConn, dir: Direction, bytes: &str, split: Split) {
        self.send_bytes(c, dir, bytes.as_bytes(), split).await;
    }

    /// Send binary `bytes` (compressed bodies) of `conn` in `dir`, cut by `split`.
    pub(super) async fn send_bytes(&self, c: &TestConn, dir: Direction, bytes: &[u8], split: Split) {
        for data in split.cut(bytes) {
            self.event(c.data(dir, data, false)).await;
        }
    }

    pub(super) async fn event(&self, ev: TlsEvent) {
        self.tx.send(ev).await.expect("task alive");
    }

    /// Wait for `n` reported LLM calls.
    pub(super) async fn llm_calls(&mut self, n: usize) -> Vec<LlmCall> {
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(Duration::from_secs(10), self.calls.recv()).await {
                Ok(Some(c)) => out.push(c),
                other => panic!("expected {n} calls, got {} ({other:?})", out.len()),
            }
        }
        out
    }

    /// Close the event stream, wait for the task, and scrape the metrics.
    pub(super) async fn finish(self) -> String {
        drop(self.tx);
        self.handle.await.expect("task");
        self.telemetry.metrics.encode()
    }

    pub(super) fn scrape(&self) -> String {
        self.telemetry.metrics.encode()
    }
}

/// One connection of an agent process.
pub(super) struct TestConn {
    pub(super) id: u64,
    pub(super) record: CaptureRecord,
}

impl TestConn {
    pub(super) fn new(id: u64, comm: &str, dst: [u8; 4]) -> TestConn {
        let mut record =
            CaptureRecord { family: 2, orig_dst_port: 443, tgid: 3_999_000 + id as u32, ..Default::default() };
        record.orig_dst_addr[..4].copy_from_slice(&dst);
        record.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        record.cookie = id;
        TestConn { id, record }
    }

    pub(super) fn data(&self, direction: Direction, data: Bytes, gap_before: bool) -> TlsEvent {
        TlsEvent::Data { conn: ConnId(self.id), record: self.record, direction, data, gap_before, gap_other: false }
    }

    pub(super) fn close(&self) -> TlsEvent {
        TlsEvent::Close { conn: ConnId(self.id), record: self.record }
    }
}

/// Sum of the series of `name` whose labels include every one of `labels`.
pub(super) fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub(super) fn tokens(text: &str, agent: &str, token_type: &str) -> f64 {
    let l = [("agent", agent), ("token_type", token_type), ("capture", "uprobe")];
    value(text, "tollgate_llm_tokens_total", &l)
}

use Direction::{Egress, Ingress};

/// Three OpenAI calls on one keep-alive connection: non-streamed (`Content-Length`), streamed
/// with usage (chunked SSE), non-streamed chunked.
async fn openai_keepalive(split: Split) -> (String, Vec<LlmCall>) {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(1, "billing-bot", [162, 159, 140, 245]);
    let auth = "Authorization: Bearer sk-test\r\n";
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", auth, OPENAI_CHAT_REQ), split).await;
    h.send(&c, Ingress, &resp_len("application/json", OPENAI_CHAT_RESP), split).await;
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", auth, OPENAI_STREAM_REQ), split).await;
    h.send(&c, Ingress, &resp_chunked("text/event-stream; charset=utf-8", &OPENAI_STREAM_EVENTS), split).await;
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", auth, OPENAI_CHAT_REQ), split).await;
    let (a, b) = OPENAI_CHAT_RESP.split_at(100);
    h.send(&c, Ingress, &resp_chunked("application/json", &[a, b]), split).await;
    let calls = h.llm_calls(3).await;
    h.event(c.close()).await;
    (h.finish().await, calls)
}

#[tokio::test]
async fn openai_calls_on_one_connection_exact_in_any_split() {
    for split in SPLITS {
        let (text, calls) = openai_keepalive(split).await;
        assert_eq!(tokens(&text, "billing", "input"), 19.0 + 13.0 + 19.0, "{split:?}\n{text}");
        assert_eq!(tokens(&text, "billing", "output"), 10.0 + 7.0 + 10.0, "{split:?}");
        assert_eq!(tokens(&text, "billing", "total"), 29.0 + 20.0 + 29.0, "{split:?}");
        let req = [("agent", "billing"), ("route", "openai"), ("status", "200"), ("capture", "uprobe")];
        assert_eq!(value(&text, "tollgate_llm_requests_total", &req), 3.0, "{split:?}");
        assert_eq!(value(&text, "tollgate_llm_estimated_tokens_total", &[]), 0.0, "{split:?}");
        assert!(calls.iter().all(|c| c.usage.is_some_and(|u| !u.estimated) && c.error.is_none()), "{calls:?}");
        assert!(calls[1].stream);
        assert_eq!(calls[1].response_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!(calls[1].finish_reasons, vec!["stop"]);
        assert_eq!(calls[0].server_address.as_deref(), Some("api.openai.com"));
        let ttft = [("capture", "uprobe"), ("gen_ai_request_model", "gpt-4o-mini")];
        assert_eq!(value(&text, "gen_ai_server_time_to_first_token_seconds_count", &ttft), 1.0);
    }
}

/// A route tollgate intercepts reports its calls from the proxy; the uprobes see the agent's
/// side of the same TLS session (with tollgate), which must not be counted a second time.
#[tokio::test]
async fn intercepted_routes_are_not_counted_again_from_uprobes() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(1, "billing-bot", [162, 159, 140, 245]);
    let auth = "Authorization: Bearer sk-test\r\n";
    h.send(&c, Egress, &post("intercepted.internal", "/v1/chat/completions", auth, OPENAI_CHAT_REQ), Split::Whole)
        .await;
    h.send(&c, Ingress, &resp_len("application/json", OPENAI_CHAT_RESP), Split::Whole).await;
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", auth, OPENAI_CHAT_REQ), Split::Whole).await;
    h.send(&c, Ingress, &resp_len("application/json", OPENAI_CHAT_RESP), Split::Whole).await;
    let calls = h.llm_calls(1).await;
    h.event(c.close()).await;
    let text = h.finish().await;
    assert_eq!(calls[0].route.as_ref(), "openai", "{calls:?}");
    assert_eq!(value(&text, "tollgate_llm_requests_total", &[]), 1.0, "{text}");
    assert_eq!(value(&text, "tollgate_llm_requests_total", &[("route", "terminated")]), 0.0, "{text}");
}

/// Under `intercept: auto` (the `openai` route here) the proxy marks the connections it
/// terminates; only those are left to it, the spliced ones are counted from the uprobes.
#[tokio::test]
async fn auto_routes_skip_only_the_connections_the_proxy_terminates() {
    let mut h = Harness::start(ObservedLimits::default());
    let auth = "Authorization: Bearer sk-test\r\n";
    let proxied = TestConn::new(1, "billing-bot", [162, 159, 140, 245]);
    let mark = h.intercepted.mark(proxied.record.cookie);
    h.send(&proxied, Egress, &post("api.openai.com", "/v1/chat/completions", auth, OPENAI_CHAT_REQ), Split::Whole)
        .await;
    h.send(&proxied, Ingress, &resp_len("application/json", OPENAI_CHAT_RESP), Split::Whole).await;
    let spliced = TestConn::new(2, "support-bot", [162, 159, 140, 245]);
    h.send(&spliced, Egress, &post("api.openai.com", "/v1/chat/completions", auth, OPENAI_CHAT_REQ), Split::Whole)
        .await;
    h.send(&spliced, Ingress, &resp_len("application/json", OPENAI_CHAT_RESP), Split::Whole).await;
    let calls = h.llm_calls(1).await;
    drop(mark);
    let text = h.finish().await;
    assert_eq!(&*calls[0].agent.name, "support", "{calls:?}");
    assert_eq!(value(&text, "tollgate_llm_requests_total", &[("agent", "support")]), 1.0, "{text}");
    assert_eq!(value(&text, "tollgate_llm_requests_total", &[("agent", "billing")]), 0.0, "{text}");
}

#[tokio::test]
async fn anthropic_stream_with_tool_call() {
    for split in SPLITS {
        let mut h = Harness::start(ObservedLimits::default());
        let c = TestConn::new(2, "support-bot", [160, 79, 104, 10]);
        let extra = "x-api-key: sk-ant\r\nanthropic-version: 2023-06-01\r\n";
        h.send(&c, Egress, &post("api.anthropic.com", "/v1/messages", extra, ANTHROPIC_REQ), split).await;
        h.send(&c, Ingress, &resp_chunked("text/event-stream; charset=utf-8", &ANTHROPIC_EVENTS), split).await;
        let calls = h.llm_calls(1).await;
        let text = h.finish().await;
        assert_eq!(tokens(&text, "support", "input"), 472.0, "{split:?}\n{text}");
        assert_eq!(tokens(&text, "support", "output"), 89.0, "{split:?}");
        assert_eq!(calls[0].finish_reasons, vec!["tool_use"]);
        assert_eq!(calls[0].request_model.as_deref(), Some("claude-sonnet-4-5"));
        assert!(calls[0].usage.is_some_and(|u| !u.estimated));
    }
}

#[tokio::test]
async fn mcp_tool_calls_counted_per_tool_json_and_sse() {
    for split in SPLITS {
        let h = Harness::start(ObservedLimits::default());
        let c = TestConn::new(3, "billing-bot", [10, 0, 0, 7]);
        let extra = "Mcp-Session-Id: 5f1c\r\nMcp-Protocol-Version: 2025-06-18\r\n";
        h.send(&c, Egress, &post("mcp.internal:8443", "/mcp", extra, MCP_CALL), split).await;
        h.send(&c, Ingress, &resp_len("application/json", MCP_RESULT), split).await;
        h.send(&c, Egress, &post("mcp.internal:8443", "/mcp", extra, MCP_CALL_2), split).await;
        let event = format!("event: message\ndata: {MCP_RESULT_2}\n\n");
        h.send(&c, Ingress, &resp_chunked("text/event-stream", &[&event]), split).await;
        h.event(c.close()).await;
        let text = h.finish().await;
        let per = |tool| {
            let l = [("agent", "billing"), ("tool", tool), ("verdict", "allowed"), ("capture", "uprobe")];
            value(&text, "tollgate_mcp_tool_calls_total", &l)
        };
        assert_eq!((per("get_weather"), per("search_docs")), (1.0, 1.0), "{split:?}\n{text}");
        let ok = [("agent", "billing"), ("method", "tools/call"), ("outcome", "ok"), ("capture", "uprobe")];
        assert_eq!(value(&text, "tollgate_mcp_requests_total", &ok), 2.0, "{split:?}");
    }
}

#[tokio::test]
async fn a2a_hop_with_caller_and_callee() {
    for split in SPLITS {
        let h = Harness::start(ObservedLimits::default());
        let c = TestConn::new(4, "support-bot", [10, 0, 0, 9]);
        let get = "GET /.well-known/agent-card.json HTTP/1.1\r\nHost: booking.internal\r\nAccept: */*\r\n\r\n";
        h.send(&c, Egress, get, split).await;
        h.send(&c, Ingress, &resp_len("application/json", A2A_CARD), split).await;
        h.send(&c, Egress, &post("booking.internal", "/", "", A2A_SEND), split).await;
        h.send(&c, Ingress, &resp_len("application/json", A2A_TASK), split).await;
        h.event(c.close()).await;
        let text = h.finish().await;
        let hop = [
            ("source", "support"),
            ("target", "booking-agent"),
            ("method", "message/send"),
            ("outcome", "completed"),
            ("capture", "uprobe"),
        ];
        assert_eq!(value(&text, "tollgate_a2a_hops_total", &hop), 1.0, "{split:?}\n{text}");
    }
}

/// A gap in a stream ends the call with its usage flagged estimated; the parser picks up the
/// next response on the connection, which is exact again.
#[tokio::test]
async fn gap_gives_an_estimated_call_then_resynchronises() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(5, "billing-bot", [162, 159, 140, 245]);
    let auth = "Authorization: Bearer sk-test\r\n";
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", auth, OPENAI_STREAM_REQ), Split::Whole).await;
    let stream = resp_chunked("text/event-stream", &OPENAI_STREAM_EVENTS);
    // The bytes after the third event (usage chunk included) are lost.
    let cut = stream.find(", 3\"").expect("third event") + 200;
    h.send(&c, Ingress, &stream[..cut], Split::Whole).await;
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", auth, OPENAI_CHAT_REQ), Split::Whole).await;
    // What arrives after the gap: the tail of an event, then the next response.
    let next = format!("0\r\n\r\n{}", resp_len("application/json", OPENAI_CHAT_RESP));
    h.event(c.data(Ingress, Bytes::from(format!("ompletion_tokens\":7}}}}\n\n\r\n{next}")), true)).await;
    let calls = h.llm_calls(2).await;
    let text = h.finish().await;
    // The estimate settles off the task, so the two may be reported in either order.
    let (cut_call, exact) = match calls[0].stream {
        true => (&calls[0], &calls[1]),
        false => (&calls[1], &calls[0]),
    };
    let u = cut_call.usage.expect("estimated usage");
    assert!(u.estimated, "{cut_call:?}");
    assert!(u.input > 0 && u.output > 0, "{u:?}");
    assert_eq!(exact.usage.map(|u| (u.input, u.output, u.estimated)), Some((19, 10, false)));
    let est = [("agent", "billing"), ("capture", "uprobe")];
    assert!(value(&text, "tollgate_llm_estimated_tokens_total", &est) > 0.0, "{text}");
}

/// Two connections of two agents, their events interleaved one by one, stay separate.
#[tokio::test]
async fn interleaved_connections_stay_separate() {
    let mut h = Harness::start(ObservedLimits::default());
    let a = TestConn::new(10, "billing-bot", [162, 159, 140, 245]);
    let b = TestConn::new(11, "support-bot", [162, 159, 140, 245]);
    let auth = "Authorization: Bearer sk-test\r\n";
    let req_a = post("api.openai.com", "/v1/chat/completions", auth, OPENAI_CHAT_REQ);
    let req_b = post("api.openai.com", "/v1/chat/completions", auth, OPENAI_STREAM_REQ);
    let resp_a = resp_len("application/json", OPENAI_CHAT_RESP);
    let resp_b = resp_chunked("text/event-stream", &OPENAI_STREAM_EVENTS);
    for (dir, x, y) in [(Egress, &req_a, &req_b), (Ingress, &resp_a, &resp_b)] {
        let (xs, ys) = (Split::Every(5).cut(x.as_bytes()), Split::Every(3).cut(y.as_bytes()));
        for i in 0..xs.len().max(ys.len()) {
            if let Some(d) = xs.get(i) {
                h.event(a.data(dir, d.clone(), false)).await;
            }
            if let Some(d) = ys.get(i) {
                h.event(b.data(dir, d.clone(), false)).await;
            }
        }
    }
    h.llm_calls(2).await;
    let text = h.finish().await;
    assert_eq!((tokens(&text, "billing", "input"), tokens(&text, "billing", "output")), (19.0, 10.0), "{text}");
    assert_eq!((tokens(&text, "support", "input"), tokens(&text, "support", "output")), (13.0, 7.0), "{text}");
}

/// Two pipelined requests, an interim `100 Continue`, and a response read until close.
#[tokio::test]
async fn pipelining_continue_and_read_until_close() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(12, "billing-bot", [162, 159, 140, 245]);
    let auth = "Authorization: Bearer sk-test\r\nExpect: 100-continue\r\n";
    let req = post("api.openai.com", "/v1/chat/completions", auth, OPENAI_CHAT_REQ);
    let (head, body) = req.split_at(req.find("\r\n\r\n").expect("head") + 4);
    h.send(&c, Egress, head, Split::Whole).await;
    h.send(&c, Ingress, "HTTP/1.1 100 Continue\r\n\r\n", Split::Whole).await;
    h.send(&c, Egress, body, Split::Whole).await;
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", "", OPENAI_STREAM_REQ), Split::Whole).await;
    h.send(&c, Ingress, &resp_len("application/json", OPENAI_CHAT_RESP), Split::Every(9)).await;
    let until_close: String = OPENAI_STREAM_EVENTS.concat();
    let r = format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n{until_close}");
    h.send(&c, Ingress, &r, Split::Every(11)).await;
    h.event(c.close()).await;
    let calls = h.llm_calls(2).await;
    let text = h.finish().await;
    assert_eq!(calls[0].usage.map(|u| (u.input, u.output)), Some((19, 10)), "{calls:?}");
    assert_eq!(calls[1].usage.map(|u| (u.input, u.output, u.estimated)), Some((13, 7, false)), "{calls:?}");
    assert_eq!(tokens(&text, "billing", "total"), 49.0);
}

/// A connection closed mid-stream is recorded as cut: error set, usage at least what was
/// delivered and flagged estimated.
#[tokio::test]
async fn close_mid_stream_is_a_cut_call() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(13, "billing-bot", [162, 159, 140, 245]);
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", "", OPENAI_STREAM_REQ), Split::Whole).await;
    h.send(
        &c,
        Ingress,
        &resp_chunked("text/event-stream", &OPENAI_STREAM_EVENTS[..3]).replace("0\r\n\r\n", ""),
        Split::Whole,
    )
    .await;
    h.event(c.close()).await;
    let calls = h.llm_calls(1).await;
    assert!(calls[0].error.as_deref().is_some_and(|e| e.contains("closed")), "{calls:?}");
    assert!(calls[0].usage.is_some_and(|u| u.estimated && u.output > 0), "{calls:?}");
    h.finish().await;
}

#[tokio::test]
async fn bounds_drop_state_and_are_counted() {
    let limits = ObservedLimits { max_connections: 1, max_head_bytes: 256, max_body_bytes: 64, ..Default::default() };
    let mut h = Harness::start(limits);
    let a = TestConn::new(20, "billing-bot", [162, 159, 140, 245]);
    let b = TestConn::new(21, "billing-bot", [162, 159, 140, 245]);
    // `a` holds the only slot (`b` is refused); its request body is over 64 bytes: dropped,
    // its call reported cut.
    let req = post("api.openai.com", "/v1/chat/completions", "", OPENAI_STREAM_REQ);
    let (head, body) = req.split_at(req.find("\r\n\r\n").expect("head") + 4);
    h.send(&a, Egress, head, Split::Every(16)).await;
    h.send(&b, Egress, "GET / HTTP/1.1\r\n", Split::Whole).await;
    h.send(&a, Egress, body, Split::Every(16)).await;
    let calls = h.llm_calls(1).await;
    assert!(calls[0].error.as_deref().is_some_and(|e| e.contains("body_bytes")), "{calls:?}");
    // The slot is free again: a head over 256 bytes.
    let big = format!("GET / HTTP/1.1\r\nHost: api.openai.com\r\nX-Pad: {}\r\n\r\n", "p".repeat(300));
    let c = TestConn::new(22, "billing-bot", [162, 159, 140, 245]);
    h.send(&c, Egress, &big, Split::Every(50)).await;
    // HTTP/2 is detected, not parsed.
    let d = TestConn::new(23, "billing-bot", [162, 159, 140, 245]);
    h.send(&d, Egress, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Split::Whole).await;
    let text = h.finish().await;
    for (reason, n) in [("body_bytes", 1.0), ("max_connections", 1.0), ("header_bytes", 1.0), ("http2", 1.0)] {
        assert_eq!(value(&text, "tollgate_uprobe_l7_dropped_total", &[("reason", reason)]), n, "{reason}\n{text}");
    }
}

#[tokio::test]
async fn idle_connections_are_dropped() {
    let limits = ObservedLimits { idle_timeout: Duration::from_millis(40), ..Default::default() };
    let h = Harness::start(limits);
    let c = TestConn::new(30, "billing-bot", [162, 159, 140, 245]);
    h.send(&c, Egress, "GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n", Split::Whole).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = h.scrape();
    assert_eq!(value(&text, "tollgate_uprobe_l7_dropped_total", &[("reason", "idle")]), 1.0, "{text}");
    assert_eq!(value(&text, "tollgate_uprobe_l7_connections", &[]), 0.0, "{text}");
    h.finish().await;
}

/// A gap after Anthropic reported its (partial) usage in `message_start`: the reported numbers
/// are not final, so the call is flagged estimated rather than counted as exact.
#[tokio::test]
async fn gap_after_partial_usage_is_flagged() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(6, "support-bot", [160, 79, 104, 10]);
    h.send(&c, Egress, &post("api.anthropic.com", "/v1/messages", "", ANTHROPIC_REQ), Split::Whole).await;
    let stream = resp_chunked("text/event-stream", &ANTHROPIC_EVENTS);
    let cut = stream.find("event: content_block_delta").expect("first delta");
    h.send(&c, Ingress, &stream[..cut], Split::Every(5)).await;
    h.event(c.data(Ingress, Bytes::from_static(b"\"message_stop\"}\n\n"), true)).await;
    let calls = h.llm_calls(1).await;
    let u = calls[0].usage.expect("usage");
    assert!(u.estimated, "{u:?}");
    assert_eq!(u.input, 472);
    assert!(calls[0].error.is_none(), "{calls:?}");
    h.event(c.close()).await;
    h.finish().await;
}

/// A response whose `Content-Encoding` does not match its bytes (here plain JSON sent as `br`)
/// is not read: the call is reported with an estimate flagged as such, never as exact numbers.
#[tokio::test]
async fn compressed_response_is_estimated_not_misread() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(7, "billing-bot", [162, 159, 140, 245]);
    let extra = "Accept-Encoding: gzip, deflate\r\n";
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", extra, OPENAI_CHAT_REQ), Split::Whole).await;
    // The bytes would even parse, but they are not brotli: they are not read.
    let resp =
        resp_len("application/json", OPENAI_CHAT_RESP).replace("Content-Type", "Content-Encoding: br\r\nContent-Type");
    h.send(&c, Ingress, &resp, Split::Every(4)).await;
    let calls = h.llm_calls(1).await;
    let u = calls[0].usage.expect("estimated usage");
    assert!(u.estimated && u.input > 0 && u.input != 19, "{u:?}");
    assert_eq!(calls[0].status, 200);
    h.finish().await;
}

/// Requests piling up without responses, and bytes that are not HTTP, drop the connection's
/// state and are counted; the calls in flight are reported, not lost.
#[tokio::test]
async fn pipeline_bound_and_non_http_are_counted() {
    let mut h = Harness::start(ObservedLimits { max_pipeline: 2, ..Default::default() });
    let a = TestConn::new(50, "billing-bot", [162, 159, 140, 245]);
    let req = post("api.openai.com", "/v1/chat/completions", "", OPENAI_CHAT_REQ);
    for _ in 0..3 {
        h.send(&a, Egress, &req, Split::Whole).await;
    }
    let calls = h.llm_calls(2).await;
    assert!(calls.iter().all(|c| c.error.as_deref().is_some_and(|e| e.contains("pipeline"))), "{calls:?}");
    let b = TestConn::new(51, "billing-bot", [162, 159, 140, 245]);
    h.send(&b, Egress, &req, Split::Whole).await;
    h.send(&b, Ingress, "\x16\x03\x03\x00\x2a\x02\x00\x00\x26\x03\x03\n", Split::Whole).await;
    let calls = h.llm_calls(1).await;
    assert!(calls[0].error.as_deref().is_some_and(|e| e.contains("not_http")), "{calls:?}");
    let text = h.finish().await;
    for reason in ["pipeline", "not_http"] {
        assert_eq!(value(&text, "tollgate_uprobe_l7_dropped_total", &[("reason", reason)]), 1.0, "{reason}\n{text}");
    }
    let failed = [("agent", "billing"), ("status", "0"), ("capture", "uprobe")];
    assert_eq!(value(&text, "tollgate_llm_requests_total", &failed), 3.0, "{text}");
}

/// Observed calls write the access-log lines intercepted ones do, with `capture: uprobe`.
#[tokio::test]
async fn access_log_lines_carry_capture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let mut h = Harness::with_access_log(CONFIG, ObservedLimits::default(), &path.display().to_string());
    let c = TestConn::new(60, "billing-bot", [162, 159, 140, 245]);
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", "", OPENAI_CHAT_REQ), Split::Every(3)).await;
    h.send(&c, Ingress, &resp_len("application/json", OPENAI_CHAT_RESP), Split::Every(3)).await;
    let extra = "Mcp-Session-Id: 5f1c\r\n";
    let m = TestConn::new(61, "billing-bot", [10, 0, 0, 7]);
    h.send(&m, Egress, &post("mcp.internal", "/mcp", extra, MCP_CALL), Split::Whole).await;
    h.send(&m, Ingress, &resp_len("application/json", MCP_RESULT), Split::Whole).await;
    h.llm_calls(1).await;
    let telemetry = h.telemetry.clone();
    h.finish().await;
    telemetry.shutdown().await;
    let text = std::fs::read_to_string(&path).expect("access log");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let llm = lines.iter().find(|l| l["kind"] == "llm").expect("llm line");
    assert_eq!((&llm["capture"], &llm["agent"]["name"]), (&"uprobe".into(), &"billing".into()), "{llm}");
    assert_eq!(
        (&llm["input_tokens"], &llm["output_tokens"], &llm["tokens_estimated"]),
        (&19.into(), &10.into(), &false.into())
    );
    let mcp = lines.iter().find(|l| l["kind"] == "mcp").expect("mcp line");
    assert_eq!(
        (&mcp["capture"], &mcp["tool"], &mcp["session_id"]),
        (&"uprobe".into(), &"get_weather".into(), &"5f1c".into()),
        "{mcp}"
    );
}

/// Request bytes lost: the response is still read (its numbers are the provider's), but the
/// call cannot be told apart from what was lost, so its usage is flagged estimated.
#[tokio::test]
async fn request_gap_reads_the_response_but_flags_it() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(8, "billing-bot", [162, 159, 140, 245]);
    let req = post("api.openai.com", "/v1/chat/completions", "", OPENAI_STREAM_REQ);
    let (first, rest) = req.split_at(req.len() - 20);
    h.send(&c, Egress, first, Split::Whole).await;
    h.event(c.data(Egress, Bytes::copy_from_slice(&rest.as_bytes()[10..]), true)).await;
    h.send(&c, Ingress, &resp_chunked("text/event-stream", &OPENAI_STREAM_EVENTS), Split::Every(7)).await;
    // The next exchange is exact again.
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", "", OPENAI_CHAT_REQ), Split::Whole).await;
    h.send(&c, Ingress, &resp_len("application/json", OPENAI_CHAT_RESP), Split::Whole).await;
    let calls = h.llm_calls(2).await;
    h.finish().await;
    assert_eq!(calls[0].usage.map(|u| (u.input, u.output, u.estimated)), Some((13, 7, true)), "{calls:?}");
    assert_eq!(calls[1].usage.map(|u| (u.input, u.output, u.estimated)), Some((19, 10, false)), "{calls:?}");
}

/// The tail of a request lost, and nothing more written before the response: only the
/// response's events can say so (`gap_other`). The response is read but flagged estimated,
/// never reported exact; the next exchange (whose first bytes carry `gap_before`) is exact.
#[tokio::test]
async fn request_tail_gap_reported_by_the_response_flags_it() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(9, "billing-bot", [162, 159, 140, 245]);
    let req = post("api.openai.com", "/v1/chat/completions", "", OPENAI_CHAT_REQ);
    h.send(&c, Egress, &req[..req.len() - 20], Split::Whole).await;
    let resp = resp_len("application/json", OPENAI_CHAT_RESP);
    for piece in Split::Every(64).cut(resp.as_bytes()) {
        let mut ev = c.data(Ingress, piece, false);
        if let TlsEvent::Data { gap_other, .. } = &mut ev {
            *gap_other = true;
        }
        h.event(ev).await;
    }
    let next = post("api.openai.com", "/v1/chat/completions", "", OPENAI_CHAT_REQ);
    h.event(c.data(Egress, Bytes::from(next), true)).await;
    h.send(&c, Ingress, &resp, Split::Whole).await;
    let calls = h.llm_calls(2).await;
    h.finish().await;
    assert_eq!(calls[0].usage.map(|u| (u.input, u.output, u.estimated)), Some((19, 10, true)), "{calls:?}");
    assert_eq!(calls[1].usage.map(|u| (u.input, u.output, u.estimated)), Some((19, 10, false)), "{calls:?}");
}
