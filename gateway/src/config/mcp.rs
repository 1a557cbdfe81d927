//! MCP configuration (`mcp:`): how tollgate governs Model Context Protocol traffic on routes
//! with `protocol: mcp`. Kept in its own module so the MCP feature owns its settings.
//!
//! ```yaml
//! mcp:
//!   tools:
//!     - name: support-read-only
//!       match: { group: support }
//!       allow: ["get_*", "search_*"]
//!       deny: ["delete_*"]
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::governance::{check_globs, check_match, check_rule_name, AccessMatch};

/// Root of the `mcp` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// Tool rules: which MCP tools an agent, group or namespace may list and call. Every rule
    /// covering an agent applies; a deny entry wins over any allow.
    pub tools: Vec<McpToolRule>,
    /// Federation endpoints: one MCP server offering the tools of several upstream servers.
    pub federations: Vec<super::federation::FederationConfig>,
}

/// One tool rule: whom it covers and which tool names (globs) they may or may not use.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpToolRule {
    /// Unique name; named in the JSON-RPC error, the audit log and the denial metric.
    pub name: String,
    /// Whom the rule covers (agent glob, group glob, namespace glob; all must hold; empty:
    /// every agent), like `access[].match`.
    #[serde(default, rename = "match")]
    pub subjects: AccessMatch,
    /// Tool name globs; when non-empty, tools outside it are refused and hidden from
    /// `tools/list`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Tool name globs refused (and hidden from `tools/list`) even when allowed.
    #[serde(default)]
    pub deny: Vec<String>,
}

impl McpConfig {
    /// Checks serde cannot express: unique non-empty rule names and globs that compile.
    /// Errors are `(field path below mcp, message)` so the loader can point at the line.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, r) in self.tools.iter().enumerate() {
            let at = format!("tools[{i}]");
            check_rule_name(&at, &r.name, self.tools[..i].iter().map(|o| o.name.as_str()))?;
            check_match(&at, &r.subjects)?;
            check_globs(&format!("{at}.allow"), &r.allow)?;
            check_globs(&format!("{at}.deny"), &r.deny)?;
        }
        super::federation::validate(&self.federations)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_globs_and_duplicates_name_their_field() {
        let c: McpConfig = serde_yaml_ng::from_str("tools: [{name: a, deny: ['delete_*']}, {name: a}]").expect("parse");
        assert_eq!(c.validate().unwrap_err().0, "tools[1].name");
        let c: McpConfig = serde_yaml_ng::from_str("tools: [{name: a, allow: ['ok', '[']}]").expect("parse");
        assert_eq!(c.validate().unwrap_err().0, "tools[0].allow[1]");
        let c: McpConfig = serde_yaml_ng::from_str("tools: [{name: a, match: {group: '[x'}}]").expect("parse");
        assert_eq!(c.validate().unwrap_err().0, "tools[0].match.group");
        assert!(serde_yaml_ng::from_str::<McpConfig>("tools: [{name: a, typo: 1}]").is_err());
    }

    /// `tollgate check` points at the offending glob with `file:line:col`.
    #[test]
    fn check_reports_line_and_column() {
        let text = "mcp:\n  tools:\n  - name: r\n    match: {agent: bot}\n    deny: [ok, \"[x\"]\n";
        let err = crate::config::load::from_str("m.yaml", text).unwrap_err().to_string();
        assert!(err.starts_with("m.yaml:5:16: mcp.tools[0].deny[1]: bad glob"), "{err}");
        let ok = "mcp: {tools: [{name: r, match: {group: g}, allow: [\"get_*\"]}]}\n";
        let c = crate::config::load::from_str("m.yaml", ok).expect("valid");
        assert_eq!(c.mcp.tools[0].allow, vec!["get_*".to_string()]);
    }
}
