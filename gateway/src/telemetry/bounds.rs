//! Metrics of the bounds that keep one request from making tollgate do unbounded work: how
//! often each bound refused something (so an operator sees which config key to raise, or which
//! client misbehaves), and how many bytes of buffered bodies are held against the process-wide
//! budget right now.

use std::sync::LazyLock;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// A bound that refused a request, named by the config key that sets it (the label value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// A request body was not received within `limits.body_read_timeout` (408).
    BodyReadTimeout,
    /// The process-wide budget `limits.max_buffered_body_bytes` had no room for a body (503).
    BufferedBodyBytes,
    /// A JSON-RPC batch longer than `mcp.max_batch_len` (JSON-RPC -32600, HTTP 400).
    McpBatchLen,
    /// A legacy MCP stream's injection queue (`mcp.legacy_queue_len`) was full (503).
    McpLegacyQueue,
}

impl Bound {
    /// Every bound, so each series exists from the start (a rate over a missing series is empty).
    pub const ALL: [Bound; 4] =
        [Bound::BodyReadTimeout, Bound::BufferedBodyBytes, Bound::McpBatchLen, Bound::McpLegacyQueue];

    /// Label value: the config key.
    pub fn as_str(self) -> &'static str {
        match self {
            Bound::BodyReadTimeout => "limits.body_read_timeout",
            Bound::BufferedBodyBytes => "limits.max_buffered_body_bytes",
            Bound::McpBatchLen => "mcp.max_batch_len",
            Bound::McpLegacyQueue => "mcp.legacy_queue_len",
        }
    }
}

/// Bytes of buffered bodies held against `limits.max_buffered_body_bytes` right now. One per
/// process, like the budget it mirrors; every [`BoundMetrics`] registry exports this same gauge.
pub fn buffered_body_bytes() -> &'static IntGauge {
    static G: LazyLock<IntGauge> = LazyLock::new(|| {
        IntGauge::new(
            "tollgate_buffered_body_bytes",
            "Bytes of request and held response bodies buffered right now, counted against limits.max_buffered_body_bytes",
        )
        .unwrap_or_else(|_| unreachable!("static metric name and help are valid"))
    });
    &G
}

/// Refusals by bound, and the buffered-bytes gauge.
pub struct BoundMetrics {
    refusals: IntCounterVec,
}

impl BoundMetrics {
    /// Register the families in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let refusals = IntCounterVec::new(
            Opts::new(
                "tollgate_bound_refusals_total",
                "Requests refused by a bound on the work one request may cause, by the config key of the bound",
            ),
            &["bound"],
        )?;
        for b in Bound::ALL {
            refusals.with_label_values(&[b.as_str()]);
        }
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(buffered_body_bytes().clone()))?;
        Ok(BoundMetrics { refusals })
    }

    /// Count one refusal by `bound`.
    pub fn refused(&self, bound: Bound) {
        self.refusals.with_label_values(&[bound.as_str()]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_exported_by_config_key() {
        let r = Registry::new();
        let m = BoundMetrics::register(&r).unwrap();
        m.refused(Bound::McpBatchLen);
        m.refused(Bound::McpBatchLen);
        let text = prometheus::TextEncoder::new().encode_to_string(&r.gather()).unwrap();
        assert!(text.contains("tollgate_bound_refusals_total{bound=\"mcp.max_batch_len\"} 2"), "{text}");
        assert!(text.contains("tollgate_bound_refusals_total{bound=\"limits.body_read_timeout\"} 0"), "{text}");
        assert!(text.contains("# TYPE tollgate_buffered_body_bytes gauge"), "{text}");
    }
}
