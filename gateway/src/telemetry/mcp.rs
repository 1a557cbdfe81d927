//! Telemetry of MCP (Model Context Protocol) requests: one [`McpCall`] per JSON-RPC message an
//! agent sent (or per GET stream / DELETE), turned into metrics following the OpenTelemetry MCP
//! semantic conventions (`mcp.client.operation.duration`), tollgate's own counters, a span
//! `{mcp.method.name} {target}` and an access-log line. Kept apart from the LLM telemetry so the
//! LLM hot path is untouched.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Span, Status};
use opentelemetry::KeyValue;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Serialize;

use super::access_log::{epoch_secs, AgentFields};
use super::labels::LabelLimiter;
use super::trace::{attr, caller_attributes};
use super::{Capture, SpanIds, Telemetry};
use crate::capture::Agent;

/// Buckets from the MCP semconv advice for `mcp.client.operation.duration` (seconds).
const MCP_DURATION_BUCKETS: &[f64] = &[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// Method names of the MCP spec, exported as-is; anything else a client sends goes through
/// the label limiter so a client cannot create unbounded series.
const KNOWN_METHODS: &[&str] = &[
    "initialize",
    "server/discover",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/roots/list_changed",
    "GET",
    "DELETE",
];

/// What tool governance decided about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum McpVerdict {
    /// No tool involved, or no rule covers the agent.
    None,
    /// A `tools/call` the rules let through.
    Allowed,
    /// A `tools/call` refused by the named rule; never sent to the server.
    Denied(String),
    /// A `tools/call` the rules allow but the named tool-call limit (`mcp.tool_limits`)
    /// refused for now; never sent to the server.
    RateLimited(String),
}

impl McpVerdict {
    /// Label and attribute value.
    pub fn as_str(&self) -> &'static str {
        match self {
            McpVerdict::None => "none",
            McpVerdict::Allowed => "allowed",
            McpVerdict::Denied(_) => "denied",
            McpVerdict::RateLimited(_) => "rate_limited",
        }
    }

    /// The rule that refused the call, if one did.
    pub fn rule(&self) -> Option<&str> {
        match self {
            McpVerdict::Denied(r) | McpVerdict::RateLimited(r) => Some(r),
            _ => None,
        }
    }

    /// Whether tollgate refused the call itself (denied or rate limited).
    pub fn refused(&self) -> bool {
        self.rule().is_some()
    }
}

/// One finished MCP request (a JSON-RPC message, a GET stream or a DELETE), reported once.
#[derive(Debug, Clone)]
pub struct McpCall {
    /// Who sent it.
    pub agent: Arc<Agent>,
    /// Route name.
    pub route: Arc<str>,
    /// HTTP method and path of the exchange that carried it.
    pub http_method: &'static str,
    /// Request path (query excluded).
    pub path: String,
    /// `mcp.method.name`: the JSON-RPC method, or `GET` / `DELETE` for stream and session ends.
    pub method: String,
    /// `jsonrpc.request.id` as JSON text (`1`, `"abc"`); `None` for notifications.
    pub request_id: Option<String>,
    /// `gen_ai.tool.name` of a `tools/call`.
    pub tool: Option<String>,
    /// Name argument of `prompts/get` or URI of `resources/read` (span name target).
    pub target: Option<String>,
    /// `Mcp-Session-Id` of the request, or the one the server assigned.
    pub session_id: Option<String>,
    /// `MCP-Protocol-Version` header, or the version `initialize` negotiated.
    pub protocol_version: Option<String>,
    /// Client `name/version` from `initialize` / `server/discover`.
    pub client: Option<String>,
    /// Server `name/version` from the response to `initialize` / `server/discover`.
    pub server: Option<String>,
    /// Tool governance decision.
    pub verdict: McpVerdict,
    /// HTTP status the agent got.
    pub status: u16,
    /// JSON-RPC error code of the response, if it was an error.
    pub error_code: Option<i64>,
    /// Transport or protocol failure description.
    pub error: Option<String>,
    /// Tools removed from a `tools/list` result by the rules.
    pub tools_hidden: u32,
    /// Server notifications and requests seen on the response stream.
    pub notifications: u32,
    /// When the request arrived.
    pub start: SystemTime,
    /// Arrival to the end of its response (or of the stream).
    pub duration: Duration,
    /// Incoming W3C `traceparent`.
    pub traceparent: Option<String>,
    /// This request's span ids (set when spans are exported), propagated upstream.
    pub span_ids: Option<SpanIds>,
    /// Upstream host and port.
    pub server_address: Option<(String, u16)>,
    /// How the request was seen (intercepted or observed through uprobes).
    pub capture: Capture,
}

impl McpCall {
    /// A request with nothing observed yet.
    pub fn new(agent: Arc<Agent>, route: Arc<str>, http_method: &'static str, path: &str, method: String) -> Self {
        McpCall {
            agent,
            route,
            http_method,
            path: path.to_string(),
            method,
            request_id: None,
            tool: None,
            target: None,
            session_id: None,
            protocol_version: None,
            client: None,
            server: None,
            verdict: McpVerdict::None,
            status: 0,
            error_code: None,
            error: None,
            tools_hidden: 0,
            notifications: 0,
            start: SystemTime::now(),
            duration: Duration::ZERO,
            traceparent: None,
            span_ids: None,
            server_address: None,
            capture: Capture::Intercept,
        }
    }

    /// `error.type` per the semconv: `tool_denied`, `tool_rate_limited`, the JSON-RPC error
    /// code, the HTTP status, or `transport`; `None` when the request succeeded.
    pub fn error_type(&self) -> Option<String> {
        match self.verdict {
            McpVerdict::Denied(_) => return Some("tool_denied".into()),
            McpVerdict::RateLimited(_) => return Some("tool_rate_limited".into()),
            _ => {}
        }
        if let Some(c) = self.error_code {
            return Some(c.to_string());
        }
        if self.status >= 400 {
            return Some(self.status.to_string());
        }
        self.error.as_ref().map(|_| "transport".into())
    }

    /// `outcome` label: ok, denied, rate_limited, error (JSON-RPC), http_error, transport_error.
    pub fn outcome(&self) -> &'static str {
        match (&self.verdict, self.error_code, self.status, &self.error) {
            (McpVerdict::Denied(_), ..) => "denied",
            (McpVerdict::RateLimited(_), ..) => "rate_limited",
            (_, Some(_), ..) => "error",
            (_, _, s, _) if s >= 400 => "http_error",
            (_, _, _, Some(_)) => "transport_error",
            _ => "ok",
        }
    }
}

/// The MCP metric families (see the README's metrics table).
pub struct McpMetrics {
    duration: HistogramVec,
    tool_calls: IntCounterVec,
    requests: IntCounterVec,
    hidden: IntCounterVec,
    tools: LabelLimiter,
    methods: LabelLimiter,
}

impl McpMetrics {
    /// Register every family on `registry`; tool and unknown method names are bounded by
    /// `max_label_values` each.
    pub fn register(registry: &Registry, max_label_values: usize) -> Result<Self, prometheus::Error> {
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "mcp_client_operation_duration_seconds",
                "MCP request duration as seen by the agent (OTel mcp.client.operation.duration), by agent, \
                 method, tool and error type",
            )
            .buckets(MCP_DURATION_BUCKETS.to_vec()),
            &["agent", "mcp_method_name", "gen_ai_tool_name", "error_type", "capture"],
        )?;
        let tool_calls = IntCounterVec::new(
            Opts::new("tollgate_mcp_tool_calls_total", "MCP tools/call requests by agent, tool and verdict"),
            &["agent", "tool", "verdict", "capture"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_mcp_requests_total",
                "MCP requests (JSON-RPC messages) by agent, route, method and outcome",
            ),
            &["agent", "route", "method", "outcome", "capture"],
        )?;
        let hidden = IntCounterVec::new(
            Opts::new(
                "tollgate_mcp_tools_hidden_total",
                "Tools removed from tools/list results by tool rules, by agent",
            ),
            &["agent"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(tool_calls.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(hidden.clone()))?;
        Ok(McpMetrics {
            duration,
            tool_calls,
            requests,
            hidden,
            tools: LabelLimiter::new(max_label_values),
            methods: LabelLimiter::new(max_label_values),
        })
    }

    /// Count one finished request under the (already bounded) `agent` label.
    pub fn record(&self, agent: &str, c: &McpCall) {
        let method: Arc<str> = match KNOWN_METHODS.iter().find(|m| **m == c.method) {
            Some(m) => Arc::from(*m),
            None => self.methods.get(&c.method),
        };
        let tool = c.tool.as_deref().map(|t| self.tools.get(t));
        let tool_label = tool.as_deref().unwrap_or("");
        // A GET stream lives as long as the agent keeps it open: not an operation's duration.
        if c.http_method != "GET" {
            let error_type = c.error_type().unwrap_or_default();
            self.duration
                .with_label_values(&[agent, &method, tool_label, &error_type, c.capture.as_str()])
                .observe(c.duration.as_secs_f64());
        }
        self.requests.with_label_values(&[agent, &c.route, &method, c.outcome(), c.capture.as_str()]).inc();
        if c.method == "tools/call" {
            let verdict = match c.verdict {
                McpVerdict::None => "allowed",
                ref v => v.as_str(),
            };
            self.tool_calls.with_label_values(&[agent, tool_label, verdict, c.capture.as_str()]).inc();
        }
        if c.tools_hidden > 0 {
            self.hidden.with_label_values(&[agent]).inc_by(u64::from(c.tools_hidden));
        }
    }
}

#[derive(Serialize)]
struct McpLine<'a> {
    ts: f64,
    kind: &'static str,
    agent: AgentFields<'a>,
    route: &'a str,
    capture: &'static str,
    http_method: &'static str,
    path: &'a str,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<&'a str>,
    verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    outcome: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "is_zero")]
    tools_hidden: u32,
    #[serde(skip_serializing_if = "is_zero")]
    notifications: u32,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Telemetry {
    /// An MCP request ended: metrics, span, access-log line, and an audit line when the tool
    /// rules or tool-call limits refused it.
    pub fn mcp_call(&self, c: &McpCall) {
        let agent = self.metrics.agent_label(&c.agent.name);
        self.mcp.record(&agent, c);
        let refusal = match &c.verdict {
            McpVerdict::Denied(rule) => Some(("mcp_tools", rule, "mcp tool call denied")),
            McpVerdict::RateLimited(rule) => Some(("mcp_tool_limits", rule, "mcp tool call rate limited")),
            _ => None,
        };
        if let Some((policy, rule, what)) = refusal {
            self.governance.denial(&agent, policy, rule);
            tracing::info!(
                target: "audit",
                agent = %c.agent.name,
                route = %c.route,
                tool = c.tool.as_deref().unwrap_or(""),
                policy = policy,
                rule = %rule,
                "{what}"
            );
        }
        if let Some(t) = &self.tracer {
            mcp_span(t, c);
        }
        let rule = c.verdict.rule();
        let line = McpLine {
            ts: epoch_secs(c.start),
            kind: "mcp",
            agent: AgentFields::from(&*c.agent),
            route: &c.route,
            capture: c.capture.as_str(),
            http_method: c.http_method,
            path: &c.path,
            method: &c.method,
            id: c.request_id.as_deref(),
            tool: c.tool.as_deref(),
            session_id: c.session_id.as_deref(),
            protocol_version: c.protocol_version.as_deref(),
            client: c.client.as_deref(),
            server: c.server.as_deref(),
            verdict: c.verdict.as_str(),
            rule,
            outcome: c.outcome(),
            status: c.status,
            error_code: c.error_code,
            error: c.error.as_deref(),
            tools_hidden: c.tools_hidden,
            notifications: c.notifications,
            duration_ms: c.duration.as_secs_f64() * 1e3,
            trace_id: c.span_ids.map(|s| hex(&s.trace_id)),
        };
        self.access.push(|buf| serde_json::to_writer(buf, &line).is_ok());
    }
}

/// The span of one MCP request: `{mcp.method.name} {target}`, kind CLIENT, with the semconv
/// MCP attributes and the same agent identity attributes as the LLM spans.
fn mcp_span(t: &super::trace::Tracer, c: &McpCall) {
    let a = &c.agent;
    let target = c.tool.as_deref().or(c.target.as_deref());
    let name = match target {
        Some(t) => format!("{} {t}", c.method),
        None => c.method.clone(),
    };
    let mut attrs = vec![
        KeyValue::new("mcp.method.name", c.method.clone()),
        KeyValue::new("tollgate.mcp.verdict", c.verdict.as_str()),
        KeyValue::new(attr::CAPTURE, c.capture.as_str()),
        KeyValue::new("network.protocol.name", "http"),
        KeyValue::new(attr::AGENT_NAME, a.name.to_string()),
        KeyValue::new(attr::STATUS_CODE, i64::from(c.status)),
        KeyValue::new(attr::ROUTE, c.route.to_string()),
    ];
    let opt = [
        ("mcp.session.id", c.session_id.as_ref()),
        ("mcp.protocol.version", c.protocol_version.as_ref()),
        ("jsonrpc.request.id", c.request_id.as_ref()),
        ("gen_ai.tool.name", c.tool.as_ref()),
    ];
    attrs.extend(opt.into_iter().filter_map(|(k, v)| v.map(|v| KeyValue::new(k, v.clone()))));
    if c.method == "tools/call" {
        attrs.push(KeyValue::new(attr::OPERATION, "execute_tool"));
    }
    if let Some(rule) = c.verdict.rule() {
        attrs.push(KeyValue::new("tollgate.rule", rule.to_string()));
    }
    if let Some((host, port)) = &c.server_address {
        attrs.push(KeyValue::new(attr::SERVER_ADDRESS, host.clone()));
        attrs.push(KeyValue::new(attr::SERVER_PORT, i64::from(*port)));
    }
    if let Some(code) = c.error_code {
        attrs.push(KeyValue::new("rpc.response.status_code", code.to_string()));
    }
    caller_attributes(a, &mut attrs);
    let error = c.error_type();
    if let Some(e) = &error {
        attrs.push(KeyValue::new(attr::ERROR_TYPE, e.clone()));
    }
    let mut span = t.client_span(name, c.span_ids.as_ref(), c.traceparent.as_deref(), c.start, attrs);
    if let Some(e) = error {
        let msg = c.error.clone().unwrap_or(e);
        span.set_status(Status::error(msg));
    }
    span.end_with_timestamp(c.start + c.duration);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str) -> McpCall {
        McpCall::new(Arc::new(Agent::unknown("a")), Arc::from("r"), "POST", "/mcp", method.into())
    }

    #[test]
    fn metrics_count_tool_calls_by_verdict_and_bound_labels() {
        let reg = Registry::new();
        let m = McpMetrics::register(&reg, 2).expect("register");
        let mut c = call("tools/call");
        c.tool = Some("get_weather".into());
        c.verdict = McpVerdict::Allowed;
        m.record("a", &c);
        c.tool = Some("delete_file".into());
        c.verdict = McpVerdict::Denied("no-delete".into());
        m.record("a", &c);
        c.tool = Some("third".into());
        m.record("a", &c);
        c.tool = Some("get_weather".into());
        c.verdict = McpVerdict::RateLimited("budget".into());
        m.record("a", &c);
        let text = prometheus::TextEncoder::new().encode_to_string(&reg.gather()).expect("encode");
        assert!(text.contains(
            r#"tollgate_mcp_tool_calls_total{agent="a",capture="intercept",tool="get_weather",verdict="allowed"} 1"#
        ));
        assert!(
            text.contains(r#"tollgate_mcp_tool_calls_total{agent="a",capture="intercept",tool="get_weather",verdict="rate_limited"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"method="tools/call",outcome="rate_limited",route="r"} 1"#), "{text}");
        assert!(text.contains(
            r#"tollgate_mcp_tool_calls_total{agent="a",capture="intercept",tool="delete_file",verdict="denied"} 1"#
        ));
        assert!(text.contains(r#"tool="other",verdict="denied"} 1"#), "{text}");
        assert!(
            text.contains(r#"tollgate_mcp_requests_total{agent="a",capture="intercept",method="tools/call",outcome="denied",route="r"} 2"#),
            "{text}"
        );
        assert!(text.contains("mcp_client_operation_duration_seconds_bucket"));
    }

    #[test]
    fn outcomes_and_error_types() {
        let mut c = call("tools/list");
        c.status = 200;
        assert_eq!((c.outcome(), c.error_type()), ("ok", None));
        c.error_code = Some(-32601);
        assert_eq!((c.outcome(), c.error_type().as_deref()), ("error", Some("-32601")));
        let mut c = call("ping");
        c.status = 502;
        assert_eq!(c.outcome(), "http_error");
    }
}
