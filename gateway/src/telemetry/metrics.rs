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
use std::time::SystemTime;

use parking_lot::RwLock;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, CounterVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

use super::cost::{Price, PriceTable};
use super::labels::LabelLimiter;
use super::{Capture, ConnKind, L4Conn, LlmCall};
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
/// TPOT buckets from the GenAI semconv advice for `gen_ai.server.time_per_output_token`.
const TPOT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5];

/// Most cached label combinations of LLM calls. Label values are bounded, but raw model strings
/// folded into `other` are not, so past this calls take the uncached path.
const MAX_CACHED_SERIES: usize = 1024;
/// `sink` values of `tollgate_telemetry_dropped_total`.
const DROP_SINKS: [&str; 3] = ["access_log", "otlp_spans", "otlp_metrics"];
/// `tollgate_llm_tokens_total` token types, in [`CallSeries::tokens`] order.
const TOKEN_TYPES: [&str; 5] = ["input", "output", "total", "cached_input", "reasoning"];

/// Reads the kernel's capture counters at scrape time (absolute values, so they are exported
/// as-is rather than incremented).
pub type CaptureSource = Box<dyn Fn() -> Option<Vec<(&'static str, u64)>> + Send + Sync>;

/// Reads how many cgroups the kernel scope map holds, by entry kind (`include`, `exclude`), at
/// scrape time: it is the capture scope actually in force (config plus pod entries), which is
/// what an operator (or a test) waits on after a pod's capture decision changed.
pub type ScopeSource = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// Reads every gateway target's circuit state at scrape time: `(route, target, state)` with
/// state 0 closed, 1 half-open, 2 open. States change with time alone (an open circuit
/// half-opens when its timeout passes), so they are read rather than pushed.
pub type CircuitSource = Box<dyn Fn() -> Vec<(String, String, i64)> + Send + Sync>;

/// Takes consistent snapshots of every family, for `/metrics` and the OTLP push alike: the
/// registry plus the families that are read at gather time rather than pushed.
#[derive(Clone)]
pub struct Gatherer {
    registry: Registry,
    circuit_state: IntGaugeVec,
    circuit_source: Arc<parking_lot::Mutex<Option<CircuitSource>>>,
    /// Tasks alive on the Tokio runtime, read at gather time: a task leak (a connection or
    /// stream that never ends) shows here long before it shows in memory.
    runtime_tasks: IntGauge,
    start: SystemTime,
}

impl Gatherer {
    /// Every family with current values.
    pub fn gather(&self) -> Vec<MetricFamily> {
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks.set(h.metrics().num_alive_tasks() as i64);
        }
        if let Some(src) = self.circuit_source.lock().as_ref() {
            for (route, target, state) in src() {
                self.circuit_state.with_label_values(&[&route, &target]).set(state);
            }
        }
        self.registry.gather()
    }

    /// When the cumulative counters started (the start time of OTLP cumulative points).
    pub fn start_time(&self) -> SystemTime {
        self.start
    }
}

/// All metric families.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    gatherer: Gatherer,
    llm_requests: IntCounterVec,
    llm_tokens: IntCounterVec,
    token_usage: HistogramVec,
    op_duration: HistogramVec,
    ttft: HistogramVec,
    tpot: HistogramVec,
    cost: CounterVec,
    prices: PriceTable,
    connections: IntCounterVec,
    l4_bytes: IntCounterVec,
    l4_duration: HistogramVec,
    /// Dropped telemetry records (full queues), by sink.
    pub dropped: IntCounterVec,
    capture: Arc<CaptureCollector>,
    uprobe: Arc<super::uprobe_metrics::UprobeCollector>,
    /// Upstream attempts of gateway routes by outcome.
    attempts: IntCounterVec,
    /// Tokens of calls whose usage tollgate estimated.
    estimated_tokens: IntCounterVec,
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
    capture: Capture,
    /// Labels `agent, route, provider, model, capture` (`tollgate_llm_*`).
    base: [Arc<str>; 5],
    /// Label `gen_ai_request_model` (semconv families).
    req_model: Arc<str>,
    requests: IntCounter,
    duration: Histogram,
    tokens: [OnceLock<IntCounter>; 5],
    /// `gen_ai_client_token_usage` for input, output.
    usage: [OnceLock<Histogram>; 2],
    ttft: OnceLock<Histogram>,
    tpot: OnceLock<Histogram>,
    /// Price of this model, resolved once per series; `None`: unpriced, no cost series.
    price: Option<Price>,
    cost: OnceLock<Counter>,
}

impl CallSeries {
    fn matches(&self, c: &LlmCall) -> bool {
        self.status == c.status
            && self.error == c.error.is_some()
            && self.provider == c.provider
            && self.operation == c.operation
            && self.capture == c.capture
            && *self.agent == *c.agent.name
            && *self.route == *c.route
            && self.request_model.as_deref() == c.request_model.as_deref()
            && self.response_model.as_deref() == c.response_model.as_deref()
    }

    fn base_labels(&self) -> [&str; 5] {
        [&self.base[0], &self.base[1], &self.base[2], &self.base[3], &self.base[4]]
    }

    fn sem(&self) -> [&str; 5] {
        [&self.base[0], self.operation, self.provider.semconv_name(), &self.req_model, &self.base[4]]
    }
}

impl Metrics {
    /// Register every family; `max_label_values` bounds each free-form label. No prices: the
    /// cost family stays empty.
    pub fn new(max_label_values: usize) -> Result<Self, prometheus::Error> {
        Self::with_pricing(max_label_values, PriceTable::default())
    }

    /// [`Metrics::new`] with a price table for `tollgate_llm_cost_usd_total`.
    pub fn with_pricing(max_label_values: usize, prices: PriceTable) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let llm = ["agent", "route", "provider", "model", "capture"];
        let llm_requests = IntCounterVec::new(
            Opts::new("tollgate_llm_requests_total", "LLM calls by agent, route, provider, model and HTTP status"),
            &[&llm[..4], &["status", "capture"]].concat(),
        )?;
        let llm_tokens = IntCounterVec::new(
            Opts::new(
                "tollgate_llm_tokens_total",
                "LLM tokens by agent and token type (input, output, total, cached_input, reasoning)",
            ),
            &[&llm[..], &["token_type"]].concat(),
        )?;
        let semconv = ["agent", "gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "capture"];
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
        let tpot = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_server_time_per_output_token_seconds",
                "Time per output token after the first of successful streamed LLM calls with more than one output token (GenAI semconv gen_ai.server.time_per_output_token)",
            )
            .buckets(TPOT_BUCKETS.to_vec()),
            &semconv,
        )?;
        let cost = CounterVec::new(
            Opts::new(
                "tollgate_llm_cost_usd_total",
                "Cost of LLM calls in USD from the configured pricing (cached input at the cached rate; estimated usage included)",
            ),
            &llm,
        )?;
        let connections = IntCounterVec::new(
            Opts::new("tollgate_connections_total", "Captured connections by agent and handling"),
            &["agent", "kind"],
        )?;
        let l4_bytes = IntCounterVec::new(
            Opts::new("tollgate_l4_bytes_total", "Bytes of spliced connections by agent, SNI and direction (up, down)"),
            &["agent", "sni", "direction", "capture"],
        )?;
        let l4_duration = HistogramVec::new(
            HistogramOpts::new("tollgate_l4_connection_duration_seconds", "Lifetime of spliced connections")
                .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]),
            &["agent", "sni", "capture"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "tollgate_telemetry_dropped_total",
                "Telemetry records dropped by sink: access-log lines and spans on full queues or failed exports, failed OTLP metric pushes",
            ),
            &["sink"],
        )?;
        // Present at 0 from the start, so `increase()` and alerts see the first drop.
        for sink in DROP_SINKS {
            dropped.with_label_values(&[sink]);
        }
        let attempts = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_attempts_total",
                "Gateway attempts by calling agent, route, target provider and outcome (ok, connect, timeout, rate_limited, server_error)",
            ),
            &["agent", "route", "target", "outcome"],
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
        let uprobe = Arc::new(super::uprobe_metrics::UprobeCollector::new()?);
        registry.register(Box::new(SharedUprobe(uprobe.clone())))?;
        registry.register(Box::new(llm_requests.clone()))?;
        registry.register(Box::new(llm_tokens.clone()))?;
        registry.register(Box::new(token_usage.clone()))?;
        registry.register(Box::new(op_duration.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(tpot.clone()))?;
        registry.register(Box::new(cost.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(l4_bytes.clone()))?;
        registry.register(Box::new(l4_duration.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(SharedCollector(capture.clone())))?;
        let build = IntGaugeVec::new(Opts::new("tollgate_build_info", "tollgate version"), &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        let runtime_tasks = IntGauge::new("tollgate_runtime_tasks", "Tasks alive on tollgate's async runtime")?;
        registry.register(Box::new(runtime_tasks.clone()))?;
        let gatherer = Gatherer {
            registry: registry.clone(),
            circuit_state,
            circuit_source: Arc::new(parking_lot::Mutex::new(None)),
            runtime_tasks,
            start: SystemTime::now(),
        };
        Ok(Metrics {
            registry,
            gatherer,
            llm_requests,
            llm_tokens,
            token_usage,
            op_duration,
            ttft,
            tpot,
            cost,
            prices,
            connections,
            l4_bytes,
            l4_duration,
            dropped,
            capture,
            uprobe,
            attempts,
            estimated_tokens,
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
        *self.gatherer.circuit_source.lock() = Some(source);
    }

    /// Export the scope map's entry counts through `source` from now on.
    pub fn set_scope_source(&self, source: ScopeSource) {
        *self.capture.scope.lock() = Some(source);
    }

    /// A snapshot source that outlives borrows of `self` (the OTLP push task holds one).
    pub fn gatherer(&self) -> Gatherer {
        self.gatherer.clone()
    }

    /// One gateway attempt of `agent` (its bounded label, see [`Metrics::agent_label`]) ended
    /// with `outcome`. Route and target names come from config, so their cardinality is bounded
    /// by it.
    pub fn upstream_attempt(&self, agent: &str, route: &str, target: &str, outcome: &str) {
        self.attempts.with_label_values(&[agent, route, target, outcome]).inc();
    }

    /// Export the kernel counters through `source` from now on.
    pub fn set_capture_source(&self, source: CaptureSource) {
        *self.capture.source.lock() = Some(source);
    }

    /// Export the TLS uprobe counters through `source` from now on.
    pub fn set_uprobe_source(&self, source: super::uprobe_metrics::UprobeSource) {
        self.uprobe.set_source(source);
    }

    /// The bounded `agent` label value of `name` (policy metrics share the call metrics' limit).
    pub fn agent_label(&self, name: &str) -> Arc<str> {
        self.agents.get(name)
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
        let capture = Capture::Splice.as_str();
        self.l4_bytes.with_label_values(&[&*agent, &*sni, "up", capture]).inc_by(c.bytes_up);
        self.l4_bytes.with_label_values(&[&*agent, &*sni, "down", capture]).inc_by(c.bytes_down);
        self.l4_duration.with_label_values(&[&*agent, &*sni, capture]).observe(c.duration.as_secs_f64());
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
            if let Some(p) = &s.price {
                let usd = p.cost_usd(u);
                // Prices are validated finite and non-negative; the guard keeps a bad table
                // from panicking the counter.
                if usd.is_finite() && usd >= 0.0 {
                    s.cost.get_or_init(|| self.cost.with_label_values(&s.base_labels())).inc_by(usd);
                }
            }
        }
        s.duration.observe(c.duration.as_secs_f64());
        if c.stream {
            if let Some(t) = c.ttft {
                s.ttft.get_or_init(|| self.ttft.with_label_values(&s.sem())).observe(t.as_secs_f64());
            }
        }
        if let Some(v) = time_per_output_token(c) {
            s.tpot.get_or_init(|| self.tpot.with_label_values(&s.sem())).observe(v);
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
            Some(c.capture.as_str()),
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
        let capture = c.capture.as_str();
        let base: [Arc<str>; 5] = [agent, c.route.clone(), Arc::from(provider), model, Arc::from(capture)];
        let base_ref = [&*base[0], &*base[1], &*base[2], &*base[3], &*base[4]];
        let status = c.status.to_string();
        let requests = self.llm_requests.with_label_values(&[&base_ref[..4], &[status.as_str(), capture]].concat());
        // An HTTP error status names the class even when a message was read from its body;
        // "transport" is for failures without one (broken stream, client gone).
        let error_type = match (&c.error, c.status) {
            (_, s) if s >= 400 => status_class(s),
            (Some(_), _) => "transport",
            _ => "",
        };
        let sem = [base_ref[0], c.operation, provider, &*req_model, capture];
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
            capture: c.capture,
            base,
            req_model,
            requests,
            duration,
            tokens: Default::default(),
            usage: Default::default(),
            ttft: OnceLock::new(),
            tpot: OnceLock::new(),
            price: self.prices.price(c.response_model.as_deref(), c.request_model.as_deref()),
            cost: OnceLock::new(),
        }
    }

    /// Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut buf = String::new();
        // Encoding into a String only fails on invalid UTF-8 label values, which Rust strings
        // cannot hold; an empty exposition is the safe fallback.
        if prometheus::TextEncoder::new().encode_utf8(&self.gatherer.gather(), &mut buf).is_err() {
            buf.clear();
        }
        buf
    }
}

/// `gen_ai.server.time_per_output_token` of a call, in seconds: the time after the first
/// token spread over the remaining tokens. Only successful streams with more than one output
/// token have it; a non-streamed body arrives at once, so its first byte says nothing about
/// generation speed.
fn time_per_output_token(c: &LlmCall) -> Option<f64> {
    if !c.stream || c.error.is_some() || c.status >= 400 {
        return None;
    }
    let (ttft, output) = (c.ttft?, c.usage?.output);
    if output <= 1 {
        return None;
    }
    Some(c.duration.saturating_sub(ttft).as_secs_f64() / (output - 1) as f64)
}

fn status_class(s: u16) -> &'static str {
    match s {
        429 => "429",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Exposes the kernel's absolute counters as `tollgate_capture_total{event}` and the scope map's
/// entries as `tollgate_capture_scope_cgroups{entry}`.
struct CaptureCollector {
    desc: Desc,
    scope_desc: Desc,
    source: parking_lot::Mutex<Option<CaptureSource>>,
    scope: parking_lot::Mutex<Option<ScopeSource>>,
}

const SCOPE_CGROUPS: &str = "tollgate_capture_scope_cgroups";

impl CaptureCollector {
    fn new() -> Result<Self, prometheus::Error> {
        let desc = Desc::new(
            "tollgate_capture_total".into(),
            "Kernel capture decisions on connect() (per-CPU counters summed)".into(),
            vec!["event".into()],
            Default::default(),
        )?;
        let scope_desc = Desc::new(
            SCOPE_CGROUPS.into(),
            "Cgroups in the kernel capture scope map by entry (include, exclude): config and pod entries in force"
                .into(),
            vec!["entry".into()],
            Default::default(),
        )?;
        Ok(CaptureCollector {
            desc,
            scope_desc,
            source: parking_lot::Mutex::new(None),
            scope: parking_lot::Mutex::new(None),
        })
    }
}

struct SharedCollector(Arc<CaptureCollector>);

impl Collector for SharedCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc, &self.0.scope_desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let values = self.0.source.lock().as_ref().and_then(|s| s());
        let counters = IntCounterVec::new(Opts::new("tollgate_capture_total", self.0.desc.help.clone()), &["event"]);
        if let (Some(values), Ok(vec)) = (values, counters) {
            for (event, v) in values {
                vec.with_label_values(&[event]).inc_by(v);
            }
            out.extend(vec.collect());
        }
        let entries = self.0.scope.lock().as_ref().map(|s| s());
        let gauges = IntGaugeVec::new(Opts::new(SCOPE_CGROUPS, self.0.scope_desc.help.clone()), &["entry"]);
        if let (Some(entries), Ok(vec)) = (entries, gauges) {
            for (entry, v) in entries {
                vec.with_label_values(&[entry]).set(i64::try_from(v).unwrap_or(i64::MAX));
            }
            out.extend(vec.collect());
        }
        out
    }
}

/// Registers the shared uprobe collector (the registry takes ownership of a box).
struct SharedUprobe(Arc<super::uprobe_metrics::UprobeCollector>);

impl Collector for SharedUprobe {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
pub(crate) mod tests;
