//! Placeholder replaced by the OAuth work (merged from its branch).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// OAuth settings of a federation endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpAuthConfig {
    /// RFC 8693 exchange.
    #[serde(default)]
    pub token_exchange: Option<serde_json::Value>,
}

impl McpAuthConfig {
    /// Checks.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}
