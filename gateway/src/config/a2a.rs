//! A2A configuration (`a2a:`): how tollgate traces and authorizes agent-to-agent calls on
//! routes with `protocol: a2a`. Kept in its own module so the A2A feature owns its settings.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Root of the `a2a` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct A2aConfig {}
