//! Access log (placeholder; being written).
use super::*;
/// Access log sink.
pub struct AccessLog;
impl AccessLog {
    /// Open.
    pub fn new(_t: &str) -> Result<Self, TelemetryError> { Ok(AccessLog) }
    /// L4 line.
    pub fn l4(&self, _c: &L4Conn) {}
    /// LLM line.
    pub fn llm(&self, _c: &LlmCall) {}
    /// Flush.
    pub async fn flush(&self) {}
}
