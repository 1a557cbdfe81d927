//! Telemetry-related config types that are new enough to live apart from the root: model
//! prices (cost metric) and periodic OTLP metric push.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Price of the models one glob matches, in USD per million tokens. Prices change and differ
/// by contract, so tollgate ships none: operators list what they pay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Glob on the response model (falling back to the request model), case-insensitive,
    /// e.g. `gpt-4o-mini*`. The first entry that matches wins.
    pub model: String,
    /// USD per million input tokens not served from the prompt cache.
    pub input_per_mtok: f64,
    /// USD per million output tokens (reasoning included).
    pub output_per_mtok: f64,
    /// USD per million input tokens served from the prompt cache; absent: the input price.
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
}

/// Periodic push of the Prometheus metrics to the OTLP collector, for sites that collect
/// everything over OTLP and do not scrape nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpMetricsConfig {
    /// Push metrics (off by default: `/metrics` is always served).
    pub enabled: bool,
    /// Time between pushes.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub interval: Duration,
    /// Longest one push may take before it is abandoned and counted as dropped.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

impl Default for OtlpMetricsConfig {
    fn default() -> Self {
        Self { enabled: false, interval: Duration::from_secs(15), timeout: Duration::from_secs(10) }
    }
}
