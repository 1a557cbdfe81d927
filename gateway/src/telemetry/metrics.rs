//! Prometheus metrics (placeholder; being written).
use super::*;
/// Metric families.
pub struct Metrics { pub registry: prometheus::Registry }
impl Metrics {
    /// New registry.
    pub fn new(_max: usize) -> Result<Self, prometheus::Error> { Ok(Metrics { registry: prometheus::Registry::new() }) }
    /// Connection classified.
    pub fn connection(&self, _a: Option<&Agent>, _k: ConnKind) {}
    /// Splice ended.
    pub fn l4_done(&self, _c: &L4Conn) {}
    /// LLM call ended.
    pub fn llm_call(&self, _c: &LlmCall) {}
}
