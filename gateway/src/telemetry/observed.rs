//! Metrics of the uprobe observation path's own bounds (`connection::observed`): connections
//! whose L7 state was dropped, by reason, and how many are tracked now. Observed calls
//! themselves go through the same LLM, MCP and A2A families as intercepted ones.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// `reason` values of `tollgate_uprobe_l7_dropped_total`, present at 0 from the start so
/// `increase()` and alerts see the first drop.
pub const DROP_REASONS: [&str; 9] =
    ["max_connections", "header_bytes", "body_bytes", "pipeline", "idle", "http2", "not_http", "upgrade", "shutdown"];

/// The observation path's families (see the README's metrics table).
pub struct ObservedMetrics {
    dropped: IntCounterVec,
    /// Connections with L7 state now.
    pub connections: IntGauge,
}

impl ObservedMetrics {
    /// Register both families on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let dropped = IntCounterVec::new(
            Opts::new(
                "tollgate_uprobe_l7_dropped_total",
                "Uprobe-observed connections whose L7 state was dropped, by reason (a bound, HTTP/2, not HTTP)",
            ),
            &["reason"],
        )?;
        for r in DROP_REASONS {
            dropped.with_label_values(&[r]);
        }
        let connections =
            IntGauge::new("tollgate_uprobe_l7_connections", "Uprobe-observed connections with L7 state now")?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        Ok(ObservedMetrics { dropped, connections })
    }

    /// One connection's L7 state was dropped for `reason` (one of [`DROP_REASONS`]).
    pub fn dropped(&self, reason: &'static str) {
        self.dropped.with_label_values(&[reason]).inc();
    }
}
