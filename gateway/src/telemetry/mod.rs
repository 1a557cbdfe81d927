//! Telemetry facade: the proxy reports *facts* (a connection was spliced, an LLM call finished)
//! and this module turns each into metrics, a span and an access-log line. Keeping the proxy
//! ignorant of sinks means adding a sink never touches the request path.

pub mod a2a;
pub mod access_log;
pub mod bounds;
pub mod cost;
pub mod federation;
pub mod governance;
pub mod intercept;
pub mod labels;
pub mod mcp;
pub mod metrics;
pub mod node;
pub mod observed;
pub mod otlp_metrics;
pub mod resource;
pub mod trace;
pub mod uprobe_metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::capture::Agent;
use crate::config::{Config, ModelPrice, ProviderKind, TelemetryConfig};

pub use metrics::Metrics;

/// How the proxy handled a captured connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// TLS terminated with a minted cert, HTTP handled at L7.
    Intercepted,
    /// Plaintext HTTP handled at L7.
    Http,
    /// Bytes copied untouched (TLS to a non-intercepted host, or non-AI plaintext).
    Spliced,
    /// No kernel record: closed (tollgate is never an open proxy).
    NoRecord,
    /// Sniff timed out or failed.
    SniffFailed,
}

impl ConnKind {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnKind::Intercepted => "intercepted",
            ConnKind::Http => "http",
            ConnKind::Spliced => "spliced",
            ConnKind::NoRecord => "no_record",
            ConnKind::SniffFailed => "sniff_failed",
        }
    }
}

/// How tollgate saw a call or connection: the `capture` label, span attribute
/// (`tollgate.capture`) and access-log field, so dashboards can tell (or ignore) the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Capture {
    /// TLS terminated by tollgate (or plaintext HTTP through the proxy): seen and governed.
    #[default]
    Intercept,
    /// Plaintext read from the agent's TLS library by uprobes: seen, never governed.
    Uprobe,
    /// Bytes copied untouched: L4 facts only.
    Splice,
}

impl Capture {
    /// Label and attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Capture::Intercept => "intercept",
            Capture::Uprobe => "uprobe",
            Capture::Splice => "splice",
        }
    }
}

/// Token usage as reported by the provider (or estimated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt / input tokens.
    pub input: u64,
    /// Completion / output tokens.
    pub output: u64,
    /// Total as reported (input + output when the provider omits it).
    pub total: u64,
    /// Input tokens served from the provider's prompt cache, when reported.
    pub cached_input: Option<u64>,
    /// Reasoning tokens (part of output), when reported.
    pub reasoning: Option<u64>,
    /// Counted by tollgate's tokenizer because the provider gave none.
    pub estimated: bool,
}

/// One finished LLM call, reported once when the response body ends (or fails).
#[derive(Debug, Clone)]
pub struct LlmCall {
    /// Who made it.
    pub agent: Arc<Agent>,
    /// Route name from config.
    pub route: Arc<str>,
    /// API shape.
    pub provider: ProviderKind,
    /// `gen_ai.operation.name`: `chat`, `embeddings`, ...
    pub operation: &'static str,
    /// `model` from the request body.
    pub request_model: Option<String>,
    /// `model` from the response.
    pub response_model: Option<String>,
    /// Provider's response id.
    pub response_id: Option<String>,
    /// Streaming request.
    pub stream: bool,
    /// HTTP status returned to the client.
    pub status: u16,
    /// Usage, when the response carried it.
    pub usage: Option<Usage>,
    /// Finish reasons of the choices.
    pub finish_reasons: Vec<String>,
    /// Upstream host (for `server.address`).
    pub server_address: Option<String>,
    /// Upstream port.
    pub server_port: Option<u16>,
    /// HTTP method and path (for the access log).
    pub method: String,
    /// Request path.
    pub path: String,
    /// When the request arrived.
    pub start: SystemTime,
    /// Time to first body byte of the response.
    pub ttft: Option<Duration>,
    /// Request arrival to response end.
    pub duration: Duration,
    /// Failure description (upstream error, body error), if any.
    pub error: Option<String>,
    /// Incoming W3C `traceparent`, continued by the span.
    pub traceparent: Option<String>,
    /// Configured provider that served the call (gateway routes); `None` when passed through
    /// to the original destination.
    pub target: Option<Arc<str>>,
    /// Upstream attempts made (failover retries included); 1 for pass-through.
    pub attempts: u32,
    /// Ids of this call's span, fixed on arrival so the upstream request carries them in its
    /// `traceparent` (set only when spans are exported).
    pub span_ids: Option<SpanIds>,
    /// Body prefixes for the access log, when the route opted in (`log_payloads`).
    pub payload: Option<Box<Payload>>,
    /// What policies did to the call (guardrail verdicts, denials), as span events.
    pub policy_events: Vec<PolicyEvent>,
    /// How the call was seen (intercepted or observed through uprobes).
    pub capture: Capture,
}

/// One policy action on a call, exported as a span event so a trace shows why a call was
/// refused or rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEvent {
    /// Event name (`tollgate.guardrail`, `tollgate.policy.denied`).
    pub name: &'static str,
    /// Attributes (`tollgate.guard`, `tollgate.action`, ...).
    pub attributes: Vec<(&'static str, String)>,
}

/// Capped copies of a call's bodies, kept only for routes with `log_payloads.enabled`.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    /// Cap per body.
    pub max: usize,
    /// Request body prefix.
    pub request: Vec<u8>,
    /// Response body prefix, as the agent received it.
    pub response: Vec<u8>,
    /// A body was longer than `max`.
    pub truncated: bool,
}

impl Payload {
    /// Keep the first `max` bytes of `request`.
    pub fn new(max: usize, request: &[u8]) -> Self {
        let mut p = Payload { max, ..Default::default() };
        p.request.extend_from_slice(&request[..request.len().min(max)]);
        p.truncated = request.len() > max;
        p
    }

    /// Append response bytes up to the cap.
    pub fn push_response(&mut self, chunk: &[u8]) {
        let room = self.max.saturating_sub(self.response.len());
        self.response.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() > room {
            self.truncated = true;
        }
    }
}

/// W3C trace context of one call's span: the agent's trace (or a new one) and tollgate's own
/// span id, so the provider-side work hangs below tollgate's span in the same trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    /// Trace id: the incoming one, else random.
    pub trace_id: [u8; 16],
    /// tollgate's span id (random).
    pub span_id: [u8; 8],
    /// Sampled flag of the incoming context (new traces are sampled).
    pub sampled: bool,
}

impl SpanIds {
    /// Ids for a call whose request carried `incoming` (`traceparent` value, may be invalid).
    pub fn new(incoming: Option<&str>) -> Self {
        let parsed = incoming.and_then(parse_traceparent);
        let (trace_id, sampled) = parsed.unwrap_or_else(|| (nonzero(rand::random()), true));
        SpanIds { trace_id, span_id: nonzero(rand::random()), sampled }
    }

    /// `traceparent` value naming tollgate's span as the parent.
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        for b in self.trace_id.iter().chain(self.span_id.iter()) {
            if s.len() == 35 {
                s.push('-');
            }
            s.push_str(&format!("{b:02x}"));
        }
        s.push_str(if self.sampled { "-01" } else { "-00" });
        s
    }
}

/// An all-zero id is invalid in W3C trace context.
fn nonzero<const N: usize>(mut id: [u8; N]) -> [u8; N] {
    if id.iter().all(|b| *b == 0) {
        id[N - 1] = 1;
    }
    id
}

/// Trace id and sampled flag of a version-00 `traceparent`.
fn parse_traceparent(v: &str) -> Option<([u8; 16], bool)> {
    let mut parts = v.trim().split('-');
    let (ver, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if ver.len() != 2 || ver == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(trace.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    u64::from_str_radix(span, 16).ok().filter(|s| *s != 0)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (id != [0; 16]).then_some((id, flags & 1 == 1))
}

impl LlmCall {
    /// A call with nothing observed yet; the request path fills in the rest.
    pub fn new(agent: Arc<Agent>, route: Arc<str>, provider: ProviderKind, operation: &'static str) -> Self {
        LlmCall {
            agent,
            route,
            provider,
            operation,
            request_model: None,
            response_model: None,
            response_id: None,
            stream: false,
            status: 0,
            usage: None,
            finish_reasons: Vec::new(),
            server_address: None,
            server_port: None,
            method: String::new(),
            path: String::new(),
            start: SystemTime::now(),
            ttft: None,
            duration: Duration::ZERO,
            error: None,
            traceparent: None,
            target: None,
            attempts: 1,
            span_ids: None,
            payload: None,
            policy_events: Vec::new(),
            capture: Capture::Intercept,
        }
    }
}

/// L4 facts about a spliced connection.
#[derive(Debug, Clone)]
pub struct L4Conn {
    /// Who made it.
    pub agent: Arc<Agent>,
    /// TLS SNI, when the connection was TLS.
    pub sni: Option<String>,
    /// Original destination.
    pub dst: SocketAddr,
    /// Bytes agent → destination.
    pub bytes_up: u64,
    /// Bytes destination → agent.
    pub bytes_down: u64,
    /// Connection lifetime.
    pub duration: Duration,
    /// Failure, if the splice ended with an error.
    pub error: Option<String>,
}

/// Telemetry sinks, shared by every connection task.
pub struct Telemetry {
    /// Prometheus registry and metric families.
    pub metrics: Metrics,
    /// Config reload and Kubernetes metrics (same registry).
    pub node: node::NodeMetrics,
    /// Policy denials, token-limit rejections and state, guardrail verdicts (same registry).
    pub governance: governance::GovernanceMetrics,
    /// Agent-to-agent hop metrics (same registry).
    pub a2a: a2a::A2aMetrics,
    /// MCP request and tool-call metrics (same registry).
    pub mcp: mcp::McpMetrics,
    /// MCP federation upstream health, restarts and sessions.
    pub federation: std::sync::Arc<federation::FederationMetrics>,
    /// Refusals by the bounds on one request's work, buffered body bytes (same registry).
    pub bounds: bounds::BoundMetrics,
    /// Bounds of the uprobe observation path (same registry).
    pub observed: observed::ObservedMetrics,
    /// `intercept: auto` decisions and failed interception handshakes (same registry).
    pub intercept: intercept::InterceptMetrics,
    access: access_log::AccessLog,
    tracer: Option<trace::Tracer>,
    pusher: Option<otlp_metrics::MetricsPusher>,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// Metric registration failed (duplicate name: a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Access log file could not be opened.
    #[error("access log {path}: {source}")]
    AccessLog {
        /// Configured path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// OTLP exporter could not be built.
    #[error("otlp exporter: {0}")]
    Otlp(String),
    /// OTLP metric push could not be set up.
    #[error("otlp metrics: {0}")]
    OtlpMetrics(#[from] otlp_metrics::OtlpMetricsError),
    /// The price table is unusable.
    #[error(transparent)]
    Pricing(#[from] cost::CostError),
}

impl Telemetry {
    /// Build every configured sink, without prices (no cost metric). Must be called inside a
    /// tokio runtime (OTLP and the access log writer run as tasks).
    pub fn new(cfg: &TelemetryConfig) -> Result<Self, TelemetryError> {
        Self::with_pricing(cfg, &[])
    }

    /// Build every sink of a full config: telemetry settings plus the `pricing` table.
    pub fn from_config(cfg: &Config) -> Result<Self, TelemetryError> {
        Self::with_pricing(&cfg.telemetry, &cfg.pricing)
    }

    /// [`Telemetry::new`] with model prices for `tollgate_llm_cost_usd_total`.
    pub fn with_pricing(cfg: &TelemetryConfig, pricing: &[ModelPrice]) -> Result<Self, TelemetryError> {
        let metrics = Metrics::with_pricing(cfg.max_label_values, cost::PriceTable::new(pricing)?)?;
        let node = node::NodeMetrics::register(&metrics.registry)?;
        let governance = governance::GovernanceMetrics::register(&metrics.registry)?;
        let a2a = a2a::A2aMetrics::register(&metrics.registry, cfg.max_label_values)?;
        let mcp = mcp::McpMetrics::register(&metrics.registry, cfg.max_label_values)?;
        let federation = std::sync::Arc::new(federation::FederationMetrics::register(&metrics.registry)?);
        let bounds = bounds::BoundMetrics::register(&metrics.registry)?;
        let observed = observed::ObservedMetrics::register(&metrics.registry)?;
        let intercept = intercept::InterceptMetrics::register(&metrics.registry)?;
        let otlp = cfg.otlp.as_ref();
        let tracer = match otlp.filter(|o| o.traces) {
            Some(o) => Some(trace::Tracer::new(o, metrics.dropped.with_label_values(&["otlp_spans"]))?),
            None => None,
        };
        let pusher = match otlp.filter(|o| o.metrics.enabled) {
            Some(o) => Some(otlp_metrics::MetricsPusher::spawn(
                o,
                metrics.gatherer(),
                metrics.dropped.with_label_values(&["otlp_metrics"]),
            )?),
            None => None,
        };
        let access = access_log::AccessLog::with_dropped_counter(
            &cfg.access_log,
            metrics.dropped.with_label_values(&["access_log"]),
        )?;
        Ok(Telemetry {
            access,
            metrics,
            node,
            governance,
            mcp,
            federation,
            bounds,
            observed,
            intercept,
            a2a,
            tracer,
            pusher,
        })
    }

    /// A captured connection was accepted and classified.
    pub fn connection(&self, agent: Option<&Agent>, kind: ConnKind) {
        self.metrics.connection(agent, kind);
    }

    /// A spliced connection ended.
    pub fn l4_done(&self, c: &L4Conn) {
        self.metrics.l4_done(c);
        self.access.l4(c);
    }

    /// Whether spans are exported (then calls carry [`SpanIds`] and propagate them).
    pub fn tracing(&self) -> bool {
        self.tracer.is_some()
    }

    /// An LLM call ended.
    pub fn llm_call(&self, c: &LlmCall) {
        self.metrics.llm_call(c);
        if let Some(t) = &self.tracer {
            t.llm_call(c);
        }
        self.access.llm(c);
    }

    /// Flush spans, push the final metrics and flush log lines (shutdown).
    pub async fn shutdown(&self) {
        if let Some(t) = &self.tracer {
            t.shutdown().await;
        }
        if let Some(p) = &self.pusher {
            p.shutdown().await;
        }
        self.access.flush().await;
    }
}

#[cfg(test)]
mod access_log_fields;

#[cfg(test)]
mod span_id_tests {
    use super::{Payload, SpanIds};

    #[test]
    fn payload_prefixes_are_capped() {
        let mut p = Payload::new(5, b"abc");
        assert!(!p.truncated);
        p.push_response(b"012");
        p.push_response(b"3456");
        assert_eq!((p.request.as_slice(), p.response.as_slice(), p.truncated), (&b"abc"[..], &b"01234"[..], true));
        assert!(Payload::new(2, b"abc").truncated);
    }

    #[test]
    fn incoming_trace_is_continued_and_bad_ones_replaced() {
        let ids = SpanIds::new(Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"));
        let tp = ids.traceparent();
        assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{tp}");
        assert!(tp.ends_with("-00") && !tp.contains("b7ad6b7169203331"), "{tp}");
        assert_eq!(tp.len(), 55);
        for bad in [
            "",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-xyz",
        ] {
            let ids = SpanIds::new(Some(bad));
            assert!(ids.sampled && ids.trace_id != [0; 16], "{bad}");
            assert!(!ids.traceparent().contains("0af7651916cd43dd8448eb211c80319c"), "{bad}");
        }
    }
}
