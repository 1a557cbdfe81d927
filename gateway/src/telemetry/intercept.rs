//! Metrics of `intercept: auto` (`connection::trust`): each TLS connection's intercept-or-splice
//! decision with its reason, and failed interception handshakes, so an operator sees which
//! agents trust tollgate's CA and which one failed once and is spliced since.

use prometheus::{IntCounterVec, Opts, Registry};

/// The two families (see the README's metrics table).
pub struct InterceptMetrics {
    decisions: IntCounterVec,
    failures: IntCounterVec,
}

impl InterceptMetrics {
    /// Register both families on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "tollgate_intercept_decisions_total",
                "TLS connections to intercepting routes, by agent, decision (intercept, splice) and reason",
            ),
            &["agent", "decision", "reason"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "tollgate_intercept_handshake_failures_total",
                "Interception handshakes that failed, by agent and reason (unknown_ca, bad_certificate, \
                 certificate_unknown, closed, timeout, other)",
            ),
            &["agent", "reason"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        Ok(InterceptMetrics { decisions, failures })
    }

    /// One connection's decision; `agent` is the bounded label value.
    pub fn decision(&self, agent: &str, intercept: bool, reason: &str) {
        let d = if intercept { "intercept" } else { "splice" };
        self.decisions.with_label_values(&[agent, d, reason]).inc();
    }

    /// One failed interception handshake.
    pub fn failure(&self, agent: &str, reason: &str) {
        self.failures.with_label_values(&[agent, reason]).inc();
    }
}
