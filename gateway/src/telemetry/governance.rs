//! Metrics of the governance policies (access, token limits, guardrails), kept apart from the
//! call metrics so the request path touches them only when a policy acts. Limit headroom
//! (`tollgate_ratelimit_remaining_ratio`) is likewise set only when a limited call arrives, so it
//! is the headroom seen by the agent's last call, not a live reading of the counters. The limiter's
//! backend state and Redis error count are read at scrape time from the current generation's
//! limiter ([`LimiterSource`]), because they change without any call passing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Reads the current limiter: `(backend state 0 redis / 1 local_fallback / 2 down, Redis
/// errors of that limiter so far, limiter id)`; `None` when no limiter is configured. The id
/// changes when a reload builds a new limiter, so its error count restarts without the
/// exported counter going backwards.
pub type LimiterSource = Box<dyn Fn() -> Option<(i64, u64, u64)> + Send + Sync>;

/// The governance families (see the README's metrics table).
pub struct GovernanceMetrics {
    denials: IntCounterVec,
    rejections: IntCounterVec,
    verdicts: IntCounterVec,
    remaining: GaugeVec,
    limiter: Arc<LimiterCollector>,
}

impl GovernanceMetrics {
    /// Register every family on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let denials = IntCounterVec::new(
            Opts::new("tollgate_policy_denials_total", "Calls refused by a policy, by agent, policy and rule"),
            &["agent", "policy", "rule"],
        )?;
        let rejections = IntCounterVec::new(
            Opts::new(
                "tollgate_ratelimit_rejections_total",
                "Calls refused by a token limit, by agent, limit policy and what it counts",
            ),
            &["agent", "policy", "count"],
        )?;
        let verdicts = IntCounterVec::new(
            Opts::new(
                "tollgate_guardrail_verdicts_total",
                "Guardrail verdicts by agent, guard, action (block, redact, mask, log) and kind",
            ),
            &["agent", "guard", "action", "kind"],
        )?;
        let remaining = GaugeVec::new(
            Opts::new(
                "tollgate_ratelimit_remaining_ratio",
                "Remaining share (0..1) of the tightest token limit per agent, limit policy and what it \
                 counts, after the agent's last limited call (its estimate reserved when admitted); \
                 updated only when a call arrives, so it is stale while the agent is idle",
            ),
            &["agent", "policy", "count"],
        )?;
        let limiter = Arc::new(LimiterCollector::new()?);
        registry.register(Box::new(denials.clone()))?;
        registry.register(Box::new(rejections.clone()))?;
        registry.register(Box::new(verdicts.clone()))?;
        registry.register(Box::new(remaining.clone()))?;
        registry.register(Box::new(SharedLimiter(limiter.clone())))?;
        Ok(GovernanceMetrics { denials, rejections, verdicts, remaining, limiter })
    }

    /// A policy refused a call.
    pub fn denial(&self, agent: &str, policy: &str, rule: &str) {
        self.denials.with_label_values(&[agent, policy, rule]).inc();
    }

    /// A token limit refused a call.
    pub fn rate_rejection(&self, agent: &str, policy: &str, count: &str) {
        self.rejections.with_label_values(&[agent, policy, count]).inc();
    }

    /// Headroom of one limit policy's `count` limits for `agent` as the last call saw it:
    /// `ratio` is remaining / limit of the tightest of them, clamped to 0..1 (NaN counts as 0,
    /// so a panel never shows a non-finite value). Dashboards and `tollgate top` read it to
    /// warn before calls are refused.
    pub fn remaining(&self, agent: &str, policy: &str, count: &str, ratio: f64) {
        let ratio = if ratio.is_nan() { 0.0 } else { ratio.clamp(0.0, 1.0) };
        self.remaining.with_label_values(&[agent, policy, count]).set(ratio);
    }

    /// A guard reported `n` findings.
    pub fn verdict(&self, agent: &str, guard: &str, action: &str, kind: &str, n: u64) {
        self.verdicts.with_label_values(&[agent, guard, action, kind]).inc_by(n);
    }

    /// Read the limiter's state through `source` at every scrape from now on.
    pub fn set_limiter_source(&self, source: LimiterSource) {
        *self.limiter.source.lock() = Some(source);
    }
}

struct LimiterCollector {
    state: IntGauge,
    errors: IntCounter,
    /// `(limiter id, errors already exported)` of the limiter last read.
    seen: parking_lot::Mutex<(u64, u64)>,
    source: parking_lot::Mutex<Option<LimiterSource>>,
    descs: Vec<Desc>,
}

impl LimiterCollector {
    fn new() -> Result<Self, prometheus::Error> {
        let state = IntGauge::new(
            "tollgate_ratelimit_backend_state",
            "Token-limit counter store: 0 redis (or local backend), 1 local fallback, 2 down (fail_closed)",
        )?;
        let errors =
            IntCounter::new("tollgate_ratelimit_redis_errors_total", "Redis calls of the limiter that failed")?;
        let descs = state.desc().into_iter().chain(errors.desc()).cloned().collect();
        Ok(LimiterCollector {
            state,
            errors,
            seen: parking_lot::Mutex::new((u64::MAX, 0)),
            source: parking_lot::Mutex::new(None),
            descs,
        })
    }
}

struct SharedLimiter(Arc<LimiterCollector>);

impl Collector for SharedLimiter {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let c = &self.0;
        let read = c.source.lock().as_ref().and_then(|s| s());
        let Some((state, errors, id)) = read else { return Vec::new() };
        c.state.set(state);
        let mut seen = c.seen.lock();
        let base = if seen.0 == id { seen.1 } else { 0 };
        c.errors.inc_by(errors.saturating_sub(base));
        *seen = (id, errors.max(base));
        let mut out = c.state.collect();
        out.extend(c.errors.collect());
        out
    }
}

/// Process-unique ids for limiters (see [`LimiterSource`]).
pub fn next_limiter_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
