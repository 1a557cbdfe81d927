//! A2A configuration (`a2a:`): how tollgate traces and authorizes agent-to-agent calls on
//! routes with `protocol: a2a`. Kept in its own module so the A2A feature owns its settings.
//!
//! ```yaml
//! a2a:
//!   rules:
//!     - name: orchestrator-booking-only
//!       match: { agent: "orchestrator*" }
//!       allow: { targets: ["booking-*"] }
//!       deny: { skills: ["refund"] }
//! ```
//!
//! A rule covers the calling agent (kernel identity: agent name glob, group, namespace glob);
//! `targets` are matched against the callee's name (its agent card `name`, else the route
//! name), `skills` against the skill a message names in its metadata (`skill` or `skillId`).
//! Every covering rule applies; a deny entry wins over any allow.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::governance::{check_globs, check_match, check_rule_name, AccessMatch};

/// Default of [`A2aConfig::max_cards`].
pub const DEFAULT_MAX_CARDS: usize = 4096;

/// Root of the `a2a` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct A2aConfig {
    /// Hop authorization rules (empty: every hop is allowed and only observed).
    pub rules: Vec<A2aRuleConfig>,
    /// Destinations whose agent card (callee name, skills) is remembered; past it an arbitrary
    /// one is forgotten (rules also match route names, so no decision changes), so a caller
    /// fetching cards from many addresses cannot grow memory. Applied at start and on reload.
    pub max_cards: usize,
}

impl Default for A2aConfig {
    fn default() -> Self {
        A2aConfig { rules: Vec::new(), max_cards: DEFAULT_MAX_CARDS }
    }
}

/// One hop rule: which callers it covers and which callees / skills they may (allow) or may not
/// (deny) reach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A2aRuleConfig {
    /// Unique name; named in the JSON-RPC error, the audit line and the denial metric.
    pub name: String,
    /// Whom the rule covers (all conditions must hold; empty: every agent).
    #[serde(default, rename = "match")]
    pub subjects: AccessMatch,
    /// When a list is non-empty, hops outside it are denied.
    #[serde(default)]
    pub allow: A2aLists,
    /// Hops matching any entry are denied.
    #[serde(default)]
    pub deny: A2aLists,
}

/// Glob lists over what a hop reaches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct A2aLists {
    /// Callee name globs (agent card `name`, else the route name).
    pub targets: Vec<String>,
    /// Skill id globs (a message's `metadata.skill` / `metadata.skillId`). An allow list of
    /// skills refuses messages that name no skill.
    pub skills: Vec<String>,
}

/// Checks serde cannot express: unique rule names and globs that compile. Errors are
/// `(field path, message)` so the loader can point at the line.
pub fn validate(c: &A2aConfig) -> Result<(), (String, String)> {
    if c.max_cards == 0 {
        return Err(("a2a.max_cards".into(), "must be at least 1".into()));
    }
    for (i, r) in c.rules.iter().enumerate() {
        let at = format!("a2a.rules[{i}]");
        check_rule_name(&at, &r.name, c.rules[..i].iter().map(|o| o.name.as_str()))?;
        check_match(&at, &r.subjects)?;
        for (list, l) in [("allow", &r.allow), ("deny", &r.deny)] {
            for (f, items) in [("targets", &l.targets), ("skills", &l.skills)] {
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
    fn rules_parse_and_bad_ones_name_their_field() {
        let c: A2aConfig = serde_yaml_ng::from_str(
            "rules: [{name: r, match: {agent: 'orch*'}, allow: {targets: ['booking-*']}, deny: {skills: [refund]}}]",
        )
        .expect("parse");
        assert!(validate(&c).is_ok());
        assert_eq!(c.rules[0].allow.targets, vec!["booking-*".to_string()]);
        let c: A2aConfig = serde_yaml_ng::from_str("rules: [{name: r}, {name: r}]").expect("parse");
        assert_eq!(validate(&c).unwrap_err().0, "a2a.rules[1].name");
        let c: A2aConfig = serde_yaml_ng::from_str("rules: [{name: r, deny: {targets: ['[x']}}]").expect("parse");
        assert_eq!(validate(&c).unwrap_err().0, "a2a.rules[0].deny.targets[0]");
        assert!(serde_yaml_ng::from_str::<A2aConfig>("rules: [{name: r, allow: {agents: [x]}}]").is_err());
    }

    #[test]
    fn check_points_at_the_bad_rule() {
        let text = "a2a:\n  rules:\n  - name: r\n    deny: {skills: [\"[x\"]}\n";
        let err = crate::config::load::from_str("a.yaml", text).unwrap_err().to_string();
        assert!(err.starts_with("a.yaml:4:21: a2a.rules[0].deny.skills[0]: bad glob"), "{err}");
    }
}
