//! Governance config besides limits and guardrails: named groups of agents (so policies can
//! name a team instead of listing its agents) and access rules (which providers, models and
//! routes an agent or group may use). Token limits live in [`super::limits`], guardrails in
//! [`super::guards`]; all of them are enforced by [`crate::policy::chain`].
//!
//! ```yaml
//! agent_groups:
//!   - { name: support, members: ["support/*", "helpdesk-bot"] }
//! access:
//!   - name: support-cheap-models
//!     match: { group: support }
//!     allow: { models: ["gpt-4o-mini*"] }
//!     deny: { routes: [admin] }
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A named set of agents, matched by agent name glob; an agent may be in several groups.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentGroupConfig {
    /// Group name, used by `access[].match.group` and `rate_limits.policies[].match.group`.
    pub name: String,
    /// Agent name globs (`*`, `?`, `[..]`); `support/*` covers a namespace's workloads.
    pub members: Vec<String>,
}

/// One access rule: whom it covers, and what they may (allow) or may not (deny) call. Every
/// rule matching a call applies; a deny entry wins over any allow.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessRuleConfig {
    /// Unique name; named in the 403 body, the audit log and `tollgate_policy_denials_total`.
    pub name: String,
    /// Whom the rule covers (all conditions must hold; empty: every agent).
    #[serde(default, rename = "match")]
    pub subjects: AccessMatch,
    /// When a list is non-empty, calls outside it are denied.
    #[serde(default)]
    pub allow: AccessLists,
    /// Calls matching any entry are denied.
    #[serde(default)]
    pub deny: AccessLists,
}

/// Who an access rule covers: agent name glob, group name, Kubernetes namespace glob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AccessMatch {
    /// Agent name glob.
    pub agent: Option<String>,
    /// Group name glob (any of the agent's groups).
    pub group: Option<String>,
    /// Namespace glob (agents outside Kubernetes never match).
    pub namespace: Option<String>,
}

/// Glob lists over what a call uses.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLists {
    /// Provider names: the route's API kind (`openai`, `anthropic`, `gemini`, ...).
    pub providers: Vec<String>,
    /// Requested model globs (case-sensitive).
    pub models: Vec<String>,
    /// Route names.
    pub routes: Vec<String>,
}

/// A glob at `field` that must compile; errors are `(field, message)` for the loader.
pub(crate) fn check_glob(field: String, p: &str) -> Result<(), (String, String)> {
    glob::Pattern::new(p).map(|_| ()).map_err(|e| (field, format!("bad glob {p:?}: {e}")))
}

/// A rule's name at `at` must be non-empty and unique among `earlier` rules' names.
pub(crate) fn check_rule_name<'a>(
    at: &str,
    name: &str,
    mut earlier: impl Iterator<Item = &'a str>,
) -> Result<(), (String, String)> {
    if name.trim().is_empty() || earlier.any(|o| o == name) {
        return Err((format!("{at}.name"), format!("{name:?} is empty or used twice")));
    }
    Ok(())
}

/// The globs of a rule's `match` at `at` (shared by access, MCP tool and A2A hop rules).
pub(crate) fn check_match(at: &str, m: &AccessMatch) -> Result<(), (String, String)> {
    for (f, v) in [("agent", &m.agent), ("group", &m.group), ("namespace", &m.namespace)] {
        if let Some(v) = v {
            check_glob(format!("{at}.match.{f}"), v)?;
        }
    }
    Ok(())
}

/// Every glob of the list at `field` (`field[j]` in errors).
pub(crate) fn check_globs(field: &str, items: &[String]) -> Result<(), (String, String)> {
    items.iter().enumerate().try_for_each(|(j, p)| check_glob(format!("{field}[{j}]"), p))
}

/// Checks serde cannot express: unique non-empty names and globs that compile. Errors are
/// `(field path, message)` so the loader can point at the line.
pub fn validate(groups: &[AgentGroupConfig], access: &[AccessRuleConfig]) -> Result<(), (String, String)> {
    for (i, g) in groups.iter().enumerate() {
        check_rule_name(&format!("agent_groups[{i}]"), &g.name, groups[..i].iter().map(|o| o.name.as_str()))?;
        if g.members.is_empty() {
            return Err((format!("agent_groups[{i}].members"), "needs at least one agent name or glob".into()));
        }
        check_globs(&format!("agent_groups[{i}].members"), &g.members)?;
    }
    for (i, r) in access.iter().enumerate() {
        let at = format!("access[{i}]");
        check_rule_name(&at, &r.name, access[..i].iter().map(|o| o.name.as_str()))?;
        check_match(&at, &r.subjects)?;
        for (list, l) in [("allow", &r.allow), ("deny", &r.deny)] {
            for (f, items) in [("providers", &l.providers), ("models", &l.models), ("routes", &l.routes)] {
                check_globs(&format!("{at}.{list}.{f}"), items)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_globs_and_duplicates_name_their_field() {
        let g = vec![AgentGroupConfig { name: "a".into(), members: vec!["[x".into()] }];
        assert_eq!(validate(&g, &[]).unwrap_err().0, "agent_groups[0].members[0]");
        let r: Vec<AccessRuleConfig> =
            serde_yaml_ng::from_str("[{name: r, deny: {models: ['gpt-4*']}}, {name: r}]").expect("parse");
        assert_eq!(validate(&[], &r).unwrap_err().0, "access[1].name");
        let r: Vec<AccessRuleConfig> = serde_yaml_ng::from_str("[{name: r, allow: {routes: ['[']}}]").expect("parse");
        assert_eq!(validate(&[], &r).unwrap_err().0, "access[0].allow.routes[0]");
    }
}
