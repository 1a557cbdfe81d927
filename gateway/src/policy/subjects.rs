//! Who a governance rule covers. Access rules, MCP tool rules and A2A hop rules name their
//! subjects the same way (`match: {agent, group, namespace}` globs, all of which must hold), so
//! they share one compiled form, one meaning of "covers", and one way of naming a bad glob's
//! field.

use glob::Pattern;

use crate::capture::Agent;
use crate::config::governance::AccessMatch;

/// A glob of a rule that does not compile, with the config field that holds it (validation
/// reports the same with a line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: bad glob {pattern:?}: {message}")]
pub struct GlobError {
    /// Field path (`access[2].match.agent`, `mcp.tools[0].deny[1]`).
    pub field: String,
    /// The pattern.
    pub pattern: String,
    /// Parser message.
    pub message: String,
}

/// Compile one glob found at `field` (built only on error).
pub fn glob(field: impl FnOnce() -> String, p: &str) -> Result<Pattern, GlobError> {
    Pattern::new(p).map_err(|e| GlobError { field: field(), pattern: p.to_string(), message: e.to_string() })
}

/// Compile a list of globs found at `field` (`field[i]` in errors).
pub fn globs(field: &str, list: &[String]) -> Result<Vec<Pattern>, GlobError> {
    list.iter().enumerate().map(|(i, p)| glob(|| format!("{field}[{i}]"), p)).collect()
}

/// The compiled `match` of one rule; an empty one covers every agent.
#[derive(Debug, Default)]
pub struct Subjects {
    agent: Option<Pattern>,
    group: Option<Pattern>,
    namespace: Option<Pattern>,
}

impl Subjects {
    /// Compile the `match` of the rule at config path `at` (errors name `{at}.match.agent`, ...).
    pub fn compile(at: &str, m: &AccessMatch) -> Result<Self, GlobError> {
        let opt = |f: &str, v: &Option<String>| v.as_deref().map(|p| glob(|| format!("{at}.match.{f}"), p)).transpose();
        Ok(Subjects {
            agent: opt("agent", &m.agent)?,
            group: opt("group", &m.group)?,
            namespace: opt("namespace", &m.namespace)?,
        })
    }

    /// Whether the rule applies to `agent`, member of `groups`: every pattern given must match
    /// (the agent name; one of its groups; its Kubernetes namespace, so agents outside
    /// Kubernetes never match a namespace pattern).
    pub fn covers(&self, agent: &Agent, groups: &[String]) -> bool {
        self.agent.as_ref().is_none_or(|p| p.matches(&agent.name))
            && self.group.as_ref().is_none_or(|p| groups.iter().any(|g| p.matches(g)))
            && self.namespace.as_ref().is_none_or(|p| namespace(agent).is_some_and(|n| p.matches(n)))
    }

    /// The first of `groups` the rule's group pattern accepts (the first group when it has
    /// none): the counter a limit keyed by group draws on, chosen like the token limits do.
    pub fn group_of<'g>(&self, groups: &'g [String]) -> Option<&'g str> {
        groups.iter().find(|g| self.group.as_ref().is_none_or(|p| p.matches(g))).map(String::as_str)
    }
}

/// The agent's Kubernetes namespace, when it runs in a pod tollgate knows.
pub fn namespace(agent: &Agent) -> Option<&str> {
    agent.k8s.as_ref().and_then(|k| k.pod.as_ref()).map(|p| p.namespace.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_covers_all_and_patterns_must_all_hold() {
        let a = Agent::unknown("support-bot");
        assert!(Subjects::default().covers(&a, &[]));
        let m: AccessMatch = serde_yaml_ng::from_str("{agent: 'support-*', group: team}").expect("yaml");
        let s = Subjects::compile("r", &m).expect("compile");
        assert!(s.covers(&a, &["team".to_string()]));
        assert!(!s.covers(&a, &[]), "group must hold too");
        let m: AccessMatch = serde_yaml_ng::from_str("{namespace: 'prod'}").expect("yaml");
        assert!(!Subjects::compile("r", &m).expect("compile").covers(&a, &[]), "no pod, no namespace");
        let m: AccessMatch = serde_yaml_ng::from_str("{agent: '[x'}").expect("yaml");
        assert_eq!(Subjects::compile("access[3]", &m).unwrap_err().field, "access[3].match.agent");
    }
}
