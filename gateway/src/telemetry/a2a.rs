//! Telemetry of agent-to-agent (A2A) hops: one [`A2aHop`] per JSON-RPC request an agent sent
//! to another agent, turned into `tollgate_a2a_hops_total{source,target,method,outcome}` (the
//! edges of the A2A node graph), a duration histogram, an `invoke_agent {callee}` span
//! (OpenTelemetry GenAI agent conventions) and an access-log line. Kept apart from the LLM
//! telemetry so the LLM hot path is untouched.

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

/// Hop duration buckets (seconds): agent tasks run from milliseconds to minutes.
const HOP_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// One finished A2A hop (a JSON-RPC request to another agent, its response or stream included),
/// reported once.
#[derive(Debug, Clone)]
pub struct A2aHop {
    /// The calling agent, from the kernel.
    pub agent: Arc<Agent>,
    /// Route name.
    pub route: Arc<str>,
    /// Callee: the destination's agent-card name, else the route name.
    pub target: Arc<str>,
    /// JSON-RPC method as a bounded label (spec name, `other` or `invalid`).
    pub method: &'static str,
    /// JSON-RPC id as JSON text.
    pub request_id: Option<String>,
    /// Skill the message named.
    pub skill: Option<String>,
    /// Task id (from the request or the responses).
    pub task_id: Option<String>,
    /// Context id the responses named.
    pub context_id: Option<String>,
    /// Bounded outcome: a task state, `message`, `ok`, `error`, `denied`, `http_error`,
    /// `upstream_error`, `incomplete` (stream ended before any result).
    pub outcome: &'static str,
    /// The rule that denied the hop.
    pub denied_by: Option<String>,
    /// JSON-RPC error code of the answer, if any.
    pub error_code: Option<i64>,
    /// Error description (JSON-RPC message, transport failure, denial reason).
    pub error: Option<String>,
    /// HTTP status the caller got.
    pub status: u16,
    /// The response was an SSE stream.
    pub stream: bool,
    /// SSE events relayed.
    pub events: u64,
    /// When the request arrived.
    pub start: SystemTime,
    /// Arrival to the end of the response (stream included).
    pub duration: Duration,
    /// Incoming W3C `traceparent`.
    pub traceparent: Option<String>,
    /// This hop's span ids (set when spans are exported), propagated to the callee.
    pub span_ids: Option<SpanIds>,
    /// Callee host and port.
    pub server_address: Option<(String, u16)>,
    /// How the hop was seen (intercepted or observed through uprobes).
    pub capture: Capture,
}

impl A2aHop {
    /// A hop that has just arrived: nothing read of it yet, `incomplete` until its answer is.
    /// One constructor for the intercepting proxy and the uprobe observer, which differ only in
    /// where the facts come from. The span ids are made here when spans are exported, from the
    /// incoming `traceparent`.
    pub fn arrived(
        telemetry: &Telemetry,
        agent: Arc<Agent>,
        route: Arc<str>,
        target: Arc<str>,
        traceparent: Option<String>,
        server_address: (String, u16),
        capture: Capture,
    ) -> Self {
        let span_ids = telemetry.tracing().then(|| SpanIds::new(traceparent.as_deref()));
        A2aHop {
            agent,
            route,
            target,
            method: "invalid",
            request_id: None,
            skill: None,
            task_id: None,
            context_id: None,
            outcome: "incomplete",
            denied_by: None,
            error_code: None,
            error: None,
            status: 0,
            stream: false,
            events: 0,
            start: SystemTime::now(),
            duration: Duration::ZERO,
            traceparent,
            span_ids,
            server_address: Some(server_address),
            capture,
        }
    }
}

/// The A2A metric families (see the README's metrics table).
pub struct A2aMetrics {
    hops: IntCounterVec,
    duration: HistogramVec,
    targets: LabelLimiter,
}

impl A2aMetrics {
    /// Register every family on `registry`; callee names are bounded by `max_label_values`.
    pub fn register(registry: &Registry, max_label_values: usize) -> Result<Self, prometheus::Error> {
        let hops = IntCounterVec::new(
            Opts::new(
                "tollgate_a2a_hops_total",
                "Agent-to-agent calls by calling agent (source), callee (target: card name or route), A2A \
                 JSON-RPC method and outcome (task state, message, error, denied, ...)",
            ),
            &["source", "target", "method", "outcome", "capture"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_a2a_hop_duration_seconds",
                "Agent-to-agent call duration (request to end of response or stream) by source, target and method",
            )
            .buckets(HOP_BUCKETS.to_vec()),
            &["source", "target", "method", "capture"],
        )?;
        registry.register(Box::new(hops.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(A2aMetrics { hops, duration, targets: LabelLimiter::new(max_label_values) })
    }

    pub(crate) fn record(&self, source: &str, h: &A2aHop) {
        let target = self.targets.get(&h.target);
        let capture = h.capture.as_str();
        self.hops.with_label_values(&[source, &target, h.method, h.outcome, capture]).inc();
        self.duration.with_label_values(&[source, &target, h.method, capture]).observe(h.duration.as_secs_f64());
    }
}

#[derive(Serialize)]
struct A2aLine<'a> {
    ts: f64,
    kind: &'static str,
    agent: AgentFields<'a>,
    route: &'a str,
    capture: &'static str,
    target: &'a str,
    method: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skill: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context_id: Option<&'a str>,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    stream: bool,
    #[serde(skip_serializing_if = "is_zero")]
    events: u64,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Telemetry {
    /// An A2A hop ended: metrics, span, access-log line, and an audit line when a rule refused
    /// it.
    pub fn a2a_hop(&self, h: &A2aHop) {
        let source = self.metrics.agent_label(&h.agent.name);
        self.a2a.record(&source, h);
        if let Some(rule) = &h.denied_by {
            self.governance.denial(&source, "a2a", rule);
            tracing::info!(
                target: "audit",
                agent = %h.agent.name,
                route = %h.route,
                callee = %h.target,
                method = h.method,
                skill = h.skill.as_deref().unwrap_or(""),
                policy = "a2a",
                rule = %rule,
                "a2a hop denied"
            );
        }
        if let Some(t) = &self.tracer {
            hop_span(t, h);
        }
        let line = A2aLine {
            ts: epoch_secs(h.start),
            kind: "a2a",
            agent: AgentFields::from(&*h.agent),
            route: &h.route,
            capture: h.capture.as_str(),
            target: &h.target,
            method: h.method,
            id: h.request_id.as_deref(),
            skill: h.skill.as_deref(),
            task_id: h.task_id.as_deref(),
            context_id: h.context_id.as_deref(),
            outcome: h.outcome,
            rule: h.denied_by.as_deref(),
            status: h.status,
            error_code: h.error_code,
            error: h.error.as_deref(),
            stream: h.stream,
            events: h.events,
            duration_ms: h.duration.as_secs_f64() * 1e3,
            trace_id: h.span_ids.map(|s| hex(&s.trace_id)),
        };
        self.access.push(|buf| serde_json::to_writer(buf, &line).is_ok());
    }
}

/// The span of one hop: `invoke_agent {callee}`, kind CLIENT, with the GenAI agent attributes,
/// the A2A method, task and outcome, and the caller's identity as on the LLM spans.
fn hop_span(t: &super::trace::Tracer, h: &A2aHop) {
    let a = &h.agent;
    let mut attrs = vec![
        KeyValue::new(attr::OPERATION, "invoke_agent"),
        KeyValue::new(attr::AGENT_NAME, h.target.to_string()),
        KeyValue::new("tollgate.a2a.caller", a.name.to_string()),
        KeyValue::new("tollgate.a2a.method", h.method),
        KeyValue::new("rpc.method", h.method),
        KeyValue::new("rpc.system", "jsonrpc"),
        KeyValue::new("tollgate.a2a.outcome", h.outcome),
        KeyValue::new("tollgate.stream", h.stream),
        KeyValue::new(attr::STATUS_CODE, i64::from(h.status)),
        KeyValue::new(attr::ROUTE, h.route.to_string()),
        KeyValue::new(attr::CAPTURE, h.capture.as_str()),
    ];
    let opt = [
        ("gen_ai.conversation.id", h.context_id.as_ref()),
        ("tollgate.a2a.task_id", h.task_id.as_ref()),
        ("tollgate.a2a.skill", h.skill.as_ref()),
        ("jsonrpc.request.id", h.request_id.as_ref()),
        ("tollgate.rule", h.denied_by.as_ref()),
    ];
    attrs.extend(opt.into_iter().filter_map(|(k, v)| v.map(|v| KeyValue::new(k, v.clone()))));
    if let Some((host, port)) = &h.server_address {
        attrs.push(KeyValue::new(attr::SERVER_ADDRESS, host.clone()));
        attrs.push(KeyValue::new(attr::SERVER_PORT, i64::from(*port)));
    }
    if let Some(code) = h.error_code {
        attrs.push(KeyValue::new("rpc.jsonrpc.error_code", code));
    }
    caller_attributes(a, &mut attrs);
    let failed = !matches!(
        h.outcome,
        "completed" | "message" | "ok" | "submitted" | "working" | "input_required" | "auth_required"
    );
    if failed {
        attrs.push(KeyValue::new(attr::ERROR_TYPE, h.outcome));
    }
    let mut span = t.client_span(
        format!("invoke_agent {}", h.target),
        h.span_ids.as_ref(),
        h.traceparent.as_deref(),
        h.start,
        attrs,
    );
    if failed {
        let msg = h.error.clone().unwrap_or_else(|| format!("a2a hop {}", h.outcome));
        span.set_status(Status::error(msg));
    }
    span.end_with_timestamp(h.start + h.duration);
}
