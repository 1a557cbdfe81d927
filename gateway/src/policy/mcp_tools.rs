//! Tool governance (`mcp.tools` rules): which tools an agent may call and see. Rules are
//! compiled with the config generation's policies ([`crate::policy::chain::Policies`]) and
//! shared by its connections.

use glob::Pattern;

use crate::capture::Agent;
use crate::config::mcp::McpConfig;
use crate::policy::subjects::{globs, GlobError, Subjects};

/// Why tool rules could not be compiled (validation reports the same with a line).
#[derive(Debug, thiserror::Error)]
pub enum ToolRuleError {
    /// A glob does not compile.
    #[error(transparent)]
    Glob(#[from] GlobError),
}

struct Rule {
    name: String,
    subjects: Subjects,
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
}

impl Rule {
    fn covers(&self, agent: &Agent, groups: &[String]) -> bool {
        self.subjects.covers(agent, groups)
    }

    /// Deny entries first, then a non-empty allow list.
    fn refuses(&self, tool: &str) -> bool {
        self.deny.iter().any(|p| p.matches(tool))
            || (!self.allow.is_empty() && !self.allow.iter().any(|p| p.matches(tool)))
    }
}

/// Compiled `mcp.tools` rules of one config generation.
#[derive(Default)]
pub struct ToolRules {
    rules: Vec<Rule>,
}

impl ToolRules {
    /// Compile `mcp.tools`.
    pub fn new(cfg: &McpConfig) -> Result<Self, ToolRuleError> {
        let mut rules = Vec::with_capacity(cfg.tools.len());
        for (i, r) in cfg.tools.iter().enumerate() {
            let at = format!("mcp.tools[{i}]");
            rules.push(Rule {
                name: r.name.clone(),
                subjects: Subjects::compile(&at, &r.subjects)?,
                allow: globs(&format!("{at}.allow"), &r.allow)?,
                deny: globs(&format!("{at}.deny"), &r.deny)?,
            });
        }
        Ok(ToolRules { rules })
    }

    /// Whether any rule covers the agent (else nothing is checked or filtered).
    pub fn covers(&self, agent: &Agent, groups: &[String]) -> bool {
        self.rules.iter().any(|r| r.covers(agent, groups))
    }

    /// The first covering rule that refuses `tool`, by name.
    pub fn refusal(&self, agent: &Agent, groups: &[String], tool: &str) -> Option<&str> {
        self.rules.iter().find(|r| r.covers(agent, groups) && r.refuses(tool)).map(|r| r.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> ToolRules {
        ToolRules::new(&serde_yaml_ng::from_str(yaml).expect("yaml")).expect("compile")
    }

    #[test]
    fn deny_wins_and_allow_lists_refuse_the_rest() {
        let r = rules(
            "tools:
  - {name: ops-no-delete, match: {agent: 'ops-*'}, deny: ['delete_*']}
  - {name: support-read, match: {group: support}, allow: ['get_*', 'add'], deny: ['get_secret']}",
        );
        let ops = Agent::unknown("ops-bot");
        let sup = Agent::unknown("helpdesk");
        let other = Agent::unknown("nobody");
        let none: [String; 0] = [];
        let support = ["support".to_string()];
        assert_eq!(r.refusal(&ops, &none, "delete_file"), Some("ops-no-delete"));
        assert_eq!(r.refusal(&ops, &none, "get_weather"), None);
        assert_eq!(r.refusal(&sup, &support, "get_weather"), None);
        assert_eq!(r.refusal(&sup, &support, "get_secret"), Some("support-read"));
        assert_eq!(r.refusal(&sup, &support, "delete_file"), Some("support-read"));
        assert!(r.covers(&sup, &support) && r.covers(&ops, &none));
        assert!(!r.covers(&other, &none));
        assert_eq!(r.refusal(&other, &none, "delete_file"), None);
    }
}
