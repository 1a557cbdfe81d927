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
//!   tool_limits:
//!     - name: search-budget
//!       match: { group: support }
//!       tools: ["search_*"]
//!       key: agent
//!       per_tool: true
//!       limit: 10
//!       window: 1m
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::governance::{check_globs, check_match, check_rule_name, AccessMatch};
use super::limits::{CountKind, LimitAlgorithm, LimitKeyBy, LimitRuleConfig, LimitWindow};

/// Default of [`McpConfig::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: usize = 4096;
/// Default of [`McpConfig::max_batch_len`].
pub const DEFAULT_MAX_BATCH_LEN: usize = 64;
/// Default of [`McpConfig::legacy_queue_len`].
pub const DEFAULT_LEGACY_QUEUE_LEN: usize = 64;

/// Root of the `mcp` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// Tool rules: which MCP tools an agent, group or namespace may list and call. Every rule
    /// covering an agent applies; a deny entry wins over any allow.
    pub tools: Vec<McpToolRule>,
    /// Call-rate limits on `tools/call`, counted by the token-limit engine (`rate_limits`
    /// backend: this node, or Redis shared by the fleet). Every limit covering a call must have
    /// room for it.
    pub tool_limits: Vec<McpToolLimit>,
    /// Streamable HTTP sessions whose client/server implementations are remembered (for the
    /// log lines of their later requests); past it an arbitrary one is forgotten, so sessions
    /// never ended with a DELETE cannot grow memory. Applied at start and on every reload.
    pub max_sessions: usize,
    /// Federation endpoints: one MCP server offering the tools of several upstream servers.
    pub federations: Vec<super::federation::FederationConfig>,
    /// Most messages in one JSON-RPC batch (a POST whose body is an array), on captured MCP
    /// routes and federation endpoints alike. A longer batch is answered HTTP 400 with the
    /// JSON-RPC error -32600 naming this limit and is never forwarded: each message may cost a
    /// policy check, a counter update and an upstream call, so one request must not carry an
    /// unbounded number of them. Parsing stops at the first message past the limit.
    pub max_batch_len: usize,
    /// Events tollgate may have queued for one legacy HTTP+SSE stream (its own answers to
    /// refused calls, written into the agent's GET stream) that the agent has not read yet.
    /// When the queue is full the refused POST's answers are not queued: the POST itself is
    /// answered 503 with `retry-after` and the answers in its body, and
    /// `tollgate_bound_refusals_total{bound="mcp.legacy_queue_len"}` counts it. An agent that
    /// stops reading its stream therefore cannot make tollgate hold unbounded memory.
    pub legacy_queue_len: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            tools: Vec::new(),
            tool_limits: Vec::new(),
            max_sessions: DEFAULT_MAX_SESSIONS,
            federations: Vec::new(),
            max_batch_len: DEFAULT_MAX_BATCH_LEN,
            legacy_queue_len: DEFAULT_LEGACY_QUEUE_LEN,
        }
    }
}

/// One call-rate limit: whose `tools/call` requests it counts, for which tools, and how many
/// it lets through per window.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpToolLimit {
    /// Unique name; named in the JSON-RPC error, the audit log, the metrics and the counter key
    /// (renaming it resets its counts).
    pub name: String,
    /// Whom the limit covers (agent, group, namespace globs; all must hold; empty: every agent),
    /// like `mcp.tools[].match`.
    #[serde(default, rename = "match")]
    pub subjects: AccessMatch,
    /// Tool name globs the limit counts; empty: every tool.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Whose counter a call draws on: `agent`, `group` (the first of the agent's groups that
    /// `match.group` accepts; agents without one are not limited), `namespace` or `global`.
    #[serde(default)]
    pub key: LimitKeyBy,
    /// A separate counter per tool name; otherwise the matching tools share one counter.
    #[serde(default)]
    pub per_tool: bool,
    /// Most calls per window.
    pub limit: u64,
    /// Window length (`30s`, `1m`, `1h`), or `day` / `month` (UTC calendar, fixed algorithm).
    pub window: LimitWindow,
    /// `sliding` (default for durations) or `fixed` (default for `day` / `month`).
    #[serde(default)]
    pub algorithm: Option<LimitAlgorithm>,
}

impl McpToolLimit {
    /// The limit in the engine's terms (one request per call), so window validation and
    /// compilation are the engine's own.
    pub fn as_limit(&self) -> LimitRuleConfig {
        LimitRuleConfig {
            limit: self.limit as f64,
            window: self.window,
            count: CountKind::Requests,
            algorithm: self.algorithm,
        }
    }
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

/// Largest `mcp.max_batch_len` accepted: a bound is the point, and JSON-RPC clients send a
/// handful of messages per batch.
const MAX_BATCH_LEN_CAP: usize = 10_000;
/// Largest `mcp.legacy_queue_len` accepted.
const MAX_LEGACY_QUEUE_CAP: usize = 65_536;

impl McpConfig {
    /// Checks serde cannot express: unique non-empty rule names and globs that compile.
    /// Errors are `(field path below mcp, message)` so the loader can point at the line.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_sessions == 0 {
            return Err(("max_sessions".into(), "must be at least 1".into()));
        }
        if !(1..=MAX_BATCH_LEN_CAP).contains(&self.max_batch_len) {
            return Err(("max_batch_len".into(), format!("must be between 1 and {MAX_BATCH_LEN_CAP}")));
        }
        if !(1..=MAX_LEGACY_QUEUE_CAP).contains(&self.legacy_queue_len) {
            return Err(("legacy_queue_len".into(), format!("must be between 1 and {MAX_LEGACY_QUEUE_CAP}")));
        }
        for (i, r) in self.tools.iter().enumerate() {
            let at = format!("tools[{i}]");
            check_rule_name(&at, &r.name, self.tools[..i].iter().map(|o| o.name.as_str()))?;
            check_match(&at, &r.subjects)?;
            check_globs(&format!("{at}.allow"), &r.allow)?;
            check_globs(&format!("{at}.deny"), &r.deny)?;
        }
        for (i, l) in self.tool_limits.iter().enumerate() {
            let at = format!("tool_limits[{i}]");
            check_rule_name(&at, &l.name, self.tool_limits[..i].iter().map(|o| o.name.as_str()))?;
            check_match(&at, &l.subjects)?;
            check_globs(&format!("{at}.tools"), &l.tools)?;
            l.as_limit().validate().map_err(|(f, m)| (format!("{at}.{f}"), m))?;
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
        let c: McpConfig = serde_yaml_ng::from_str("max_sessions: 0").expect("parse");
        assert_eq!(c.validate().unwrap_err().0, "max_sessions");
        assert_eq!(serde_yaml_ng::from_str::<McpConfig>("tools: []").expect("parse").max_sessions, 4096);
    }

    #[test]
    fn tool_limits_parse_and_name_bad_fields() {
        let ok = "tool_limits:
  - name: search-budget
    match: {group: support}
    tools: ['search_*', get_weather]
    key: group
    per_tool: true
    limit: 10
    window: 1m
    algorithm: fixed
  - {name: daily, limit: 500, window: day}";
        let c: McpConfig = serde_yaml_ng::from_str(ok).expect("parse");
        c.validate().expect("valid");
        let l = &c.tool_limits[0];
        assert_eq!((l.key, l.per_tool, l.limit), (LimitKeyBy::Group, true, 10));
        assert_eq!(l.as_limit().effective_algorithm(), LimitAlgorithm::Fixed);
        assert_eq!(c.tool_limits[1].key, LimitKeyBy::Agent, "default key");
        assert_eq!(c.tool_limits[1].as_limit().effective_algorithm(), LimitAlgorithm::Fixed, "calendar default");
        let bad = |yaml: &str| {
            let c: McpConfig = serde_yaml_ng::from_str(yaml).expect("parse");
            c.validate().expect_err("invalid").0
        };
        assert_eq!(
            bad("tool_limits: [{name: a, limit: 1, window: 1m}, {name: a, limit: 1, window: 1m}]"),
            "tool_limits[1].name"
        );
        assert_eq!(bad("tool_limits: [{name: a, tools: [x, '['], limit: 1, window: 1m}]"), "tool_limits[0].tools[1]");
        assert_eq!(
            bad("tool_limits: [{name: a, match: {agent: '[x'}, limit: 1, window: 1m}]"),
            "tool_limits[0].match.agent"
        );
        assert_eq!(bad("tool_limits: [{name: a, limit: 0, window: 1m}]"), "tool_limits[0].limit");
        assert_eq!(bad("tool_limits: [{name: a, limit: 1, window: 10ms}]"), "tool_limits[0].window");
        assert_eq!(
            bad("tool_limits: [{name: a, limit: 1, window: month, algorithm: sliding}]"),
            "tool_limits[0].algorithm"
        );
        assert!(
            serde_yaml_ng::from_str::<McpConfig>("tool_limits: [{name: a, limit: 1, window: 1m, typo: 1}]").is_err()
        );
        assert!(serde_yaml_ng::from_str::<McpConfig>("tool_limits: [{name: a, limit: 1.5, window: 1m}]").is_err());
        assert!(serde_yaml_ng::from_str::<McpConfig>("tool_limits: [{name: a, limit: 1}]").is_err(), "window required");
    }

    /// `tollgate check` points at a bad tool limit with `file:line:col`.
    #[test]
    fn check_reports_tool_limit_line_and_column() {
        let text = "mcp:\n  tool_limits:\n  - name: r\n    tools: [ok, \"[x\"]\n    limit: 1\n    window: 1m\n";
        let err = crate::config::load::from_str("m.yaml", text).unwrap_err().to_string();
        assert!(err.starts_with("m.yaml:4:17: mcp.tool_limits[0].tools[1]: bad glob"), "{err}");
        let text = "mcp:\n  tool_limits:\n  - name: r\n    limit: 0\n    window: 1m\n";
        let err = crate::config::load::from_str("m.yaml", text).unwrap_err().to_string();
        assert!(err.starts_with("m.yaml:4:12: mcp.tool_limits[0].limit:"), "{err}");
        let ok = "mcp: {tool_limits: [{name: r, match: {agent: bot}, tools: [\"get_*\"], limit: 2, window: 1m}]}\n";
        let c = crate::config::load::from_str("m.yaml", ok).expect("valid");
        assert_eq!(c.mcp.tool_limits[0].limit, 2);
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
