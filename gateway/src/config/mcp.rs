//! MCP configuration (`mcp:`): how tollgate governs Model Context Protocol traffic on routes
//! with `protocol: mcp`. Kept in its own module so the MCP feature owns its settings.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Root of the `mcp` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {}
