//! OTLP traces (placeholder; being written).
use super::*;
/// Tracer.
pub struct Tracer;
impl Tracer {
    /// Build.
    pub fn new(_c: &crate::config::OtlpConfig) -> Result<Self, TelemetryError> { Ok(Tracer) }
    /// Span.
    pub fn llm_call(&self, _c: &LlmCall) {}
    /// Flush.
    pub async fn shutdown(&self) {}
}
