//! Prometheus metrics on an explicit registry (no global statics, so tests and reloads can build
//! as many as they like). GenAI metrics follow the OpenTelemetry GenAI semantic conventions as
//! they appear after the OTel → Prometheus name translation (dots → underscores, unit suffix);
//! tollgate's own metrics carry the `tollgate_` prefix. Every free-form label value passes a
//! [`LabelLimiter`] so series counts stay bounded.
//!
//! LLM calls repeat the same label combination almost always, so the series handles of each
//! combination are cached ([`CallSeries`]): a call then costs one hash of its raw fields instead
//! of a limiter lookup per label and a label-hash per series.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::labels::LabelLimiter;
use super::{ConnKind, L4Conn, LlmCall};
use crate::capture::Agent;
use crate::config::ProviderKind;

/// Token-count buckets from the GenAI semconv advice for `gen_ai.client.token.usage`.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
/// Duration buckets from the GenAI semconv advice for `gen_ai.client.operation.duration`.
const DURATION_BUCKETS: &[f64] =
    &[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];
/// TTFT buckets from the GenAI semconv advice for `gen_ai.server.time_to_first_token`.
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// Most cached label combinations of LLM calls. Label values are bounded, but raw model strings
/// folded into `other` are not, so past this calls take the uncached path.
const MAX_CACHED_SERIES: usize = 1024;
/// `tollgate_llm_tokens_total` token types, in [`CallSeries::tokens`] order.
const TOKEN_TYPES: [&str; 5] = ["input", "output", "total", "cached_input", "reasoning"];

/// Reads the kernel's capture counters at scrape time (absolute values, so they are exported
/// as-is rather than incremented).
pub type CaptureSource = Box<dyn Fn() -> Option<Vec<(&'static str, u64)>> + Send + Sync>;

/// Reads every gateway target's circuit state at scrape time: `(route, target, state)` with
/// state 0 closed, 1 half-open, 2 open. States change with time alone (an open circuit
/// half-opens when its timeout passes), so they are read rather than pushed.
pub type CircuitSource = Box<dyn Fn() -> Vec<(String, String, i64)> + Send + Sync>;

/// All metric families.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    llm_requests: IntCounterVec,
    llm_tokens: IntCounterVec,
    token_usage: HistogramVec,
    op_duration: HistogramVec,
    ttft: HistogramVec,
    connections: IntCounterVec,
    l4_bytes: IntCounterVec,
    l4_duration: HistogramVec,
    /// Dropped telemetry records (full queues), by sink.
    pub dropped: IntCounterVec,
    capture: Arc<CaptureCollector>,
    /// Upstream attempts of gateway routes by outcome.
    attempts: IntCounterVec,
    /// Tokens of calls whose usage tollgate estimated.
    estimated_tokens: IntCounterVec,
    circuit_state: IntGaugeVec,
    circuit_source: parking_lot::Mutex<Option<CircuitSource>>,
    models: LabelLimiter,
    snis: LabelLimiter,
    agents: LabelLimiter,
    /// Series handles by hash of the call's raw label fields (collisions share the bucket).
    calls: RwLock<HashMap<u64, Vec<Arc<CallSeries>>, BuildHasherDefault<KeyHasher>>>,
    calls_len: std::sync::atomic::AtomicUsize,
    hasher: RandomState,
}

/// Hasher of the series cache, whose keys are already (seeded) hashes: passes them through.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// The series one kind of LLM call updates: keyed by the call's raw label fields, holding the
/// resolved label values and the handles. Handles of series that only some calls touch are
/// created on first use, so the exposition shows exactly the series the uncached path would.
struct CallSeries {
    agent: Arc<str>,
    route: Arc<str>,
    provider: ProviderKind,
    operation: &'static str,
    request_model: Option<Box<str>>,
    response_model: Option<Box<str>>,
    status: u16,
    error: bool,
    /// Labels `agent, route, provider, model` (`tollgate_llm_*`).
    base: [Arc<str>; 4],
    /// Label `gen_ai_request_model` (semconv families).
    req_model: Arc<str>,
    requests: IntCounter,
    duration: Histogram,
    tokens: [OnceLock<IntCounter>; 5],
    /// `gen_ai_client_token_usage` for input, output.
    usage: [OnceLock<Histogram>; 2],
    ttft: OnceLock<Histogram>,
}

impl CallSeries {
    fn matches(&self, c: &LlmCall) -> bool {
        self.status == c.status
            && self.error == c.error.is_some()
            && self.provider == c.provider
            && self.operation == c.operation
            && *self.agent == *c.agent.name
            && *self.route == *c.route
            && self.request_model.as_deref() == c.request_model.as_deref()
            && self.response_model.as_deref() == c.response_model.as_deref()
    }

    fn base_labels(&self) -> [&str; 4] {
        [&self.base[0], &self.base[1], &self.base[2], &self.base[3]]
    }

    fn sem(&self) -> [&str; 4] {
        [&self.base[0], self.operation, self.provider.semconv_name(), &self.req_model]
    }
}

impl Metrics {
    /// Register every family; `max_label_values` bounds each free-form label.
    pub fn new(max_label_values: usize) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let llm = ["agent", "route", "provider", "model"];
        let llm_requests = IntCounterVec::new(
            Opts::new("tollgate_llm_requests_total", "LLM calls by agent, route, provider, model and HTTP status"),
            &[&llm[..], &["status"]].concat(),
        )?;
        let llm_tokens = IntCounterVec::new(
            Opts::new(
                "tollgate_llm_tokens_total",
                "LLM tokens by agent and token type (input, output, total, cached_input, reasoning)",
            ),
            &[&llm[..], &["token_type"]].concat(),
        )?;
        let semconv = ["agent", "gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"];
        let token_usage = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_token_usage",
                "Tokens per LLM call (GenAI semconv gen_ai.client.token.usage)",
            )
            .buckets(TOKEN_BUCKETS.to_vec()),
            &[&semconv[..], &["gen_ai_token_type"]].concat(),
        )?;
        let op_duration = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_operation_duration_seconds",
                "LLM call duration as the agent saw it (GenAI semconv gen_ai.client.operation.duration)",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &[&semconv[..], &["error_type"]].concat(),
        )?;
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_server_time_to_first_token_seconds",
                "Time to first response byte of streamed LLM calls (GenAI semconv gen_ai.server.time_to_first_token)",
            )
            .buckets(TTFT_BUCKETS.to_vec()),
            &semconv,
        )?;
        let connections = IntCounterVec::new(
            Opts::new("tollgate_connections_total", "Captured connections by agent and handling"),
            &["agent", "kind"],
        )?;
        let l4_bytes = IntCounterVec::new(
            Opts::new("tollgate_l4_bytes_total", "Bytes of spliced connections by agent, SNI and direction (up, down)"),
            &["agent", "sni", "direction"],
        )?;
        let l4_duration = HistogramVec::new(
            HistogramOpts::new("tollgate_l4_connection_duration_seconds", "Lifetime of spliced connections")
                .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]),
            &["agent", "sni"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new("tollgate_telemetry_dropped_total", "Telemetry records dropped because a queue was full"),
            &["sink"],
        )?;
        let attempts = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_attempts_total",
                "Gateway attempts by route, target provider and outcome (ok, connect, timeout, rate_limited, server_error)",
            ),
            &["route", "target", "outcome"],
        )?;
        let estimated_tokens = IntCounterVec::new(
            Opts::new(
                "tollgate_llm_estimated_tokens_total",
                "Tokens counted by tollgate's tokenizer because the provider reported no usage (included in tollgate_llm_tokens_total)",
            ),
            &[&llm[..], &["token_type"]].concat(),
        )?;
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                "tollgate_upstream_circuit_state",
                "Circuit breaker state per gateway target: 0 closed, 1 half-open, 2 open",
            ),
            &["route", "target"],
        )?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(estimated_tokens.clone()))?;
        registry.register(Box::new(circuit_state.clone()))?;
        let capture = Arc::new(CaptureCollector::new()?);
        registry.register(Box::new(llm_requests.clone()))?;
        registry.register(Box::new(llm_tokens.clone()))?;
        registry.register(Box::new(token_usage.clone()))?;
        registry.register(Box::new(op_duration.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(l4_bytes.clone()))?;
        registry.register(Box::new(l4_duration.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(SharedCollector(capture.clone())))?;
        let build = IntGaugeVec::new(Opts::new("tollgate_build_info", "tollgate version"), &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        Ok(Metrics {
            registry,
            llm_requests,
            llm_tokens,
            token_usage,
            op_duration,
            ttft,
            connections,
            l4_bytes,
            l4_duration,
            dropped,
            capture,
            attempts,
            estimated_tokens,
            circuit_state,
            circuit_source: parking_lot::Mutex::new(None),
            models: LabelLimiter::new(max_label_values),
            snis: LabelLimiter::new(max_label_values),
            agents: LabelLimiter::new(max_label_values),
            calls: RwLock::new(HashMap::default()),
            calls_len: Default::default(),
            hasher: RandomState::new(),
        })
    }

    /// Export gateway circuit states through `source` from now on.
    pub fn set_circuit_source(&self, source: CircuitSource) {
        *self.circuit_source.lock() = Some(source);
    }

    /// One gateway attempt ended with `outcome`. Route and target names come from config, so
    /// their cardinality is bounded by it.
    pub fn upstream_attempt(&self, route: &str, target: &str, outcome: &str) {
        self.attempts.with_label_values(&[route, target, outcome]).inc();
    }

    /// Export the kernel counters through `source` from now on.
    pub fn set_capture_source(&self, source: CaptureSource) {
        *self.capture.source.lock() = Some(source);
    }

    fn agent(&self, a: Option<&Agent>) -> Arc<str> {
        a.map_or_else(|| Arc::from("unknown"), |a| self.agents.get(&a.name))
    }

    /// A captured connection was classified.
    pub fn connection(&self, agent: Option<&Agent>, kind: ConnKind) {
        self.connections.with_label_values(&[&*self.agent(agent), kind.as_str()]).inc();
    }

    /// A spliced connection ended.
    pub fn l4_done(&self, c: &L4Conn) {
        let agent = self.agent(Some(&c.agent));
        let sni = self.snis.get(c.sni.as_deref().unwrap_or("none"));
        self.l4_bytes.with_label_values(&[&*agent, &*sni, "up"]).inc_by(c.bytes_up);
        self.l4_bytes.with_label_values(&[&*agent, &*sni, "down"]).inc_by(c.bytes_down);
        self.l4_duration.with_label_values(&[&*agent, &*sni]).observe(c.duration.as_secs_f64());
    }

    /// An LLM call ended.
    pub fn llm_call(&self, c: &LlmCall) {
        let s = self.call_series(c);
        s.requests.inc();
        if let Some(u) = &c.usage {
            let values = [Some(u.input), Some(u.output), Some(u.total), u.cached_input, u.reasoning];
            for (i, v) in values.into_iter().enumerate() {
                if let Some(v) = v {
                    s.tokens[i]
                        .get_or_init(|| {
                            self.llm_tokens.with_label_values(&[&s.base_labels()[..], &[TOKEN_TYPES[i]]].concat())
                        })
                        .inc_by(v);
                }
            }
            if u.estimated {
                for (v, t) in [(u.input, "input"), (u.output, "output")] {
                    self.estimated_tokens.with_label_values(&[&s.base_labels()[..], &[t]].concat()).inc_by(v);
                }
            }
            for (i, (v, t)) in [(u.input, "input"), (u.output, "output")].into_iter().enumerate() {
                s.usage[i]
                    .get_or_init(|| self.token_usage.with_label_values(&[&s.sem()[..], &[t]].concat()))
                    .observe(v as f64);
            }
        }
        s.duration.observe(c.duration.as_secs_f64());
        if c.stream {
            if let Some(t) = c.ttft {
                s.ttft.get_or_init(|| self.ttft.with_label_values(&s.sem())).observe(t.as_secs_f64());
            }
        }
    }

    /// The cached series of `c`'s label combination, created (and cached while there is room)
    /// on first sight.
    fn call_series(&self, c: &LlmCall) -> Arc<CallSeries> {
        let key = self.call_key(c);
        if let Some(s) = self.calls.read().get(&key).and_then(|b| b.iter().find(|s| s.matches(c))) {
            return s.clone();
        }
        let s = Arc::new(self.new_call_series(c));
        let len = self.calls_len.load(std::sync::atomic::Ordering::Relaxed);
        if len < MAX_CACHED_SERIES {
            let mut w = self.calls.write();
            let bucket = w.entry(key).or_default();
            if let Some(existing) = bucket.iter().find(|e| e.matches(c)) {
                return existing.clone();
            }
            bucket.push(s.clone());
            self.calls_len.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        s
    }

    /// Hash of the raw label fields of `c`. They are laid out in one buffer (each string with
    /// its length) and hashed in one go, which costs a fraction of hashing field by field.
    fn call_key(&self, c: &LlmCall) -> u64 {
        let fields = [
            Some(&*c.agent.name),
            Some(&*c.route),
            Some(c.provider.semconv_name()),
            Some(c.operation),
            c.request_model.as_deref(),
            c.response_model.as_deref(),
        ];
        let mut buf = [0u8; 256];
        let mut n = 0;
        for f in fields {
            let bytes = f.map_or(&[][..], str::as_bytes);
            let end = n + 5 + bytes.len();
            if end + 3 > buf.len() {
                // Long values: field by field.
                return self.hasher.hash_one((fields, c.status, c.error.is_some()));
            }
            buf[n] = u8::from(f.is_some());
            buf[n + 1..n + 5].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            buf[n + 5..end].copy_from_slice(bytes);
            n = end;
        }
        buf[n..n + 2].copy_from_slice(&c.status.to_le_bytes());
        buf[n + 2] = u8::from(c.error.is_some());
        self.hasher.hash_one(&buf[..n + 3])
    }

    /// Resolve the labels of `c` (admitting new values to the limiters) and create the series
    /// every call updates.
    fn new_call_series(&self, c: &LlmCall) -> CallSeries {
        let agent = self.agent(Some(&c.agent));
        let model = self.models.get(c.response_model.as_deref().or(c.request_model.as_deref()).unwrap_or("unknown"));
        let req_model = self.models.get(c.request_model.as_deref().unwrap_or("unknown"));
        let provider = c.provider.semconv_name();
        let base: [Arc<str>; 4] = [agent, c.route.clone(), Arc::from(provider), model];
        let base_ref = [&*base[0], &*base[1], &*base[2], &*base[3]];
        let status = c.status.to_string();
        let requests = self.llm_requests.with_label_values(&[&base_ref[..], &[status.as_str()]].concat());
        let error_type = match (&c.error, c.status) {
            (Some(_), _) => "transport",
            (None, s) if s >= 400 => status_class(s),
            _ => "",
        };
        let sem = [base_ref[0], c.operation, provider, &*req_model];
        let duration = self.op_duration.with_label_values(&[&sem[..], &[error_type]].concat());
        CallSeries {
            agent: c.agent.name.clone(),
            route: c.route.clone(),
            provider: c.provider,
            operation: c.operation,
            request_model: c.request_model.as_deref().map(Box::from),
            response_model: c.response_model.as_deref().map(Box::from),
            status: c.status,
            error: c.error.is_some(),
            base,
            req_model,
            requests,
            duration,
            tokens: Default::default(),
            usage: Default::default(),
            ttft: OnceLock::new(),
        }
    }

    /// Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        if let Some(src) = self.circuit_source.lock().as_ref() {
            for (route, target, state) in src() {
                self.circuit_state.with_label_values(&[&route, &target]).set(state);
            }
        }
        let mut buf = String::new();
        // Encoding into a String only fails on invalid UTF-8 label values, which Rust strings
        // cannot hold; an empty exposition is the safe fallback.
        if prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut buf).is_err() {
            buf.clear();
        }
        buf
    }
}

fn status_class(s: u16) -> &'static str {
    match s {
        429 => "429",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Exposes the kernel's absolute counters as `tollgate_capture_total{event}`.
struct CaptureCollector {
    desc: Desc,
    source: parking_lot::Mutex<Option<CaptureSource>>,
}

impl CaptureCollector {
    fn new() -> Result<Self, prometheus::Error> {
        let desc = Desc::new(
            "tollgate_capture_total".into(),
            "Kernel capture decisions on connect() (per-CPU counters summed)".into(),
            vec!["event".into()],
            Default::default(),
        )?;
        Ok(CaptureCollector { desc, source: parking_lot::Mutex::new(None) })
    }
}

struct SharedCollector(Arc<CaptureCollector>);

impl Collector for SharedCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let guard = self.0.source.lock();
        let Some(values) = guard.as_ref().and_then(|s| s()) else { return Vec::new() };
        let vec = match IntCounterVec::new(Opts::new("tollgate_capture_total", self.0.desc.help.clone()), &["event"]) {
            Ok(v) => v,
            Err(_) => return Vec::new(),
        };
        for (event, v) in values {
            vec.with_label_values(&[event]).inc_by(v);
        }
        vec.collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::ProviderKind;
    use crate::telemetry::Usage;
    use std::time::{Duration, SystemTime};

    pub(crate) fn call(agent: &str, model: &str) -> LlmCall {
        LlmCall {
            agent: Arc::new(Agent::unknown(agent)),
            route: Arc::from("openai"),
            provider: ProviderKind::Openai,
            operation: "chat",
            request_model: Some(model.into()),
            response_model: Some(format!("{model}-2024")),
            response_id: Some("chatcmpl-1".into()),
            stream: true,
            status: 200,
            usage: Some(Usage {
                input: 12,
                output: 5,
                total: 17,
                cached_input: Some(2),
                reasoning: None,
                estimated: false,
            }),
            finish_reasons: vec!["stop".into()],
            server_address: Some("api.openai.com".into()),
            server_port: Some(443),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            start: SystemTime::now(),
            ttft: Some(Duration::from_millis(30)),
            duration: Duration::from_millis(120),
            error: None,
            traceparent: None,
            target: None,
            attempts: 1,
        }
    }

    #[test]
    fn llm_call_counts_tokens_per_agent() {
        let m = Metrics::new(8).unwrap();
        m.llm_call(&call("billing", "gpt-4o"));
        m.llm_call(&call("billing", "gpt-4o"));
        let text = m.encode();
        assert!(text.contains(r#"tollgate_llm_tokens_total{agent="billing",model="gpt-4o-2024",provider="openai",route="openai",token_type="input"} 24"#), "{text}");
        assert!(text.contains(r#"token_type="cached_input"} 4"#));
        assert!(text.contains(r#"tollgate_llm_requests_total{agent="billing",model="gpt-4o-2024",provider="openai",route="openai",status="200"} 2"#));
        assert!(text.contains(r#"gen_ai_client_token_usage_sum{agent="billing",gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o",gen_ai_token_type="output"} 10"#));
        assert!(text.contains("gen_ai_server_time_to_first_token_seconds_count"));
    }

    #[test]
    fn model_labels_are_bounded() {
        let m = Metrics::new(2).unwrap();
        for i in 0..5 {
            m.llm_call(&call("a", &format!("m{i}")));
        }
        let text = m.encode();
        assert!(text.contains(r#"model="other""#));
        assert_eq!(text.matches("tollgate_llm_requests_total{").count(), 2, "{text}");
    }

    #[test]
    fn cached_series_appear_as_calls_need_them() {
        let m = Metrics::new(4096).unwrap();
        let mut c = call("a", "m");
        c.usage = Some(Usage { input: 1, output: 2, total: 3, cached_input: None, reasoning: None, estimated: false });
        m.llm_call(&c);
        let text = m.encode();
        assert!(
            !text.contains(r#"token_type="cached_input""#) && !text.contains(r#"token_type="reasoning""#),
            "{text}"
        );
        c.usage = c.usage.map(|u| Usage { reasoning: Some(5), ..u });
        m.llm_call(&c);
        assert!(m.encode().contains(r#"route="openai",token_type="reasoning"} 5"#));
        c.status = 429;
        c.usage = None;
        m.llm_call(&c);
        c.error = Some("boom".into());
        m.llm_call(&c);
        let text = m.encode();
        assert!(text.contains(r#"duration_seconds_count{agent="a",error_type="429","#), "{text}");
        assert!(text.contains(r#"duration_seconds_count{agent="a",error_type="transport","#), "{text}");
        assert!(text.contains(r#"status="429"} 2"#), "{text}");
        // Past the cache bound, calls are still counted.
        for i in 0..MAX_CACHED_SERIES + 10 {
            m.llm_call(&call("b", &format!("x{i}")));
        }
        let last = format!("x{}", MAX_CACHED_SERIES + 9);
        m.llm_call(&call("b", &last));
        let want = format!(
            r#"tollgate_llm_requests_total{{agent="b",model="{last}-2024",provider="openai",route="openai",status="200"}} 2"#
        );
        assert!(m.encode().contains(&want));
    }

    #[test]
    fn capture_counters_exported_from_source() {
        let m = Metrics::new(8).unwrap();
        assert!(!m.encode().contains("tollgate_capture_total"));
        m.set_capture_source(Box::new(|| Some(vec![("seen", 7), ("redirected", 3)])));
        let text = m.encode();
        assert!(text.contains(r#"tollgate_capture_total{event="redirected"} 3"#), "{text}");
    }

    /// Every metric a bundled dashboard queries must be one tollgate emits; a panel over a
    /// metric that does not exist is a broken product.
    #[test]
    fn dashboards_query_only_emitted_metrics() {
        let m = Metrics::new(8).unwrap();
        m.llm_call(&call("a", "m"));
        m.connection(None, ConnKind::Spliced);
        m.l4_done(&L4Conn {
            agent: Arc::new(Agent::unknown("a")),
            sni: Some("x".into()),
            dst: "127.0.0.1:1".parse().unwrap(),
            bytes_up: 1,
            bytes_down: 1,
            duration: Duration::from_millis(1),
            error: None,
        });
        m.set_capture_source(Box::new(|| Some(vec![("seen", 1)])));
        let exposed = m.encode();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for name in metric_names_in(&text) {
                assert!(
                    exposed.contains(&format!("\n{name}")),
                    "{}: queries {name}, which tollgate does not emit",
                    path.display()
                );
                checked += 1;
            }
        }
        assert!(checked >= 5, "no dashboard queries found in {}", dir.display());
    }

    /// Metric identifiers in PromQL expressions: `tollgate_*` and `gen_ai_*` names.
    fn metric_names_in(json: &str) -> Vec<String> {
        let mut out = Vec::new();
        for prefix in ["tollgate_", "gen_ai_"] {
            let mut rest = json;
            while let Some(i) = rest.find(prefix) {
                let tail = &rest[i..];
                let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                let name = &tail[..end];
                // A series name is followed by a selector or a range; label names (in `by (...)`
                // or matchers) are followed by `,`, `)` or `=`.
                if matches!(tail[end..].chars().next(), Some('{') | Some('[')) {
                    out.push(name.to_string());
                }
                rest = &tail[end..];
            }
        }
        out
    }
}
