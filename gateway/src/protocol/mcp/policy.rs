//! Tool governance (`mcp.tools` rules): which tools an agent may call and see. Rules are
//! compiled once per config generation and cached by the config's identity, so a request
//! costs one pointer comparison before matching.

use std::sync::{Arc, OnceLock};

use glob::Pattern;
use parking_lot::Mutex;

use crate::capture::Agent;
use crate::config::mcp::McpConfig;
use crate::config::Config;

/// Why tool rules could not be compiled (validation reports the same with a line).
#[derive(Debug, thiserror::Error)]
pub enum ToolRuleError {
    /// A glob does not compile.
    #[error("mcp.tools[{rule}]: bad glob {pattern:?}: {message}")]
    Glob {
        /// Rule index.
        rule: usize,
        /// The pattern.
        pattern: String,
        /// Parser message.
        message: String,
    },
}

struct Rule {
    name: String,
    agent: Option<Pattern>,
    group: Option<Pattern>,
    namespace: Option<Pattern>,
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
}

impl Rule {
    fn covers(&self, agent: &Agent, groups: &[String]) -> bool {
        let ns = agent.k8s.as_ref().and_then(|k| k.pod.as_ref()).map(|p| p.namespace.as_str());
        self.agent.as_ref().is_none_or(|p| p.matches(&agent.name))
            && self.group.as_ref().is_none_or(|p| groups.iter().any(|g| p.matches(g)))
            && self.namespace.as_ref().is_none_or(|p| ns.is_some_and(|n| p.matches(n)))
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
            let compile = |p: &str| {
                Pattern::new(p).map_err(|e| ToolRuleError::Glob { rule: i, pattern: p.into(), message: e.to_string() })
            };
            let opt = |v: &Option<String>| v.as_deref().map(compile).transpose();
            rules.push(Rule {
                name: r.name.clone(),
                agent: opt(&r.subjects.agent)?,
                group: opt(&r.subjects.group)?,
                namespace: opt(&r.subjects.namespace)?,
                allow: r.allow.iter().map(|p| compile(p)).collect::<Result<_, _>>()?,
                deny: r.deny.iter().map(|p| compile(p)).collect::<Result<_, _>>()?,
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

/// The compiled rules of `config` (compiled on first use per generation).
pub fn rules_for(config: &Arc<Config>) -> Arc<ToolRules> {
    static EMPTY: OnceLock<Arc<ToolRules>> = OnceLock::new();
    static CACHE: Mutex<Option<(Arc<Config>, Arc<ToolRules>)>> = Mutex::new(None);
    if config.mcp.tools.is_empty() {
        return EMPTY.get_or_init(Default::default).clone();
    }
    let mut cache = CACHE.lock();
    if let Some((c, r)) = cache.as_ref() {
        if Arc::ptr_eq(c, config) {
            return r.clone();
        }
    }
    let rules = match ToolRules::new(&config.mcp) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            // Validated at load; should this ever fail, refuse every tool rather than none.
            tracing::error!(error = %e, "mcp tool rules do not compile: every tool refused");
            let deny_all = McpConfig {
                tools: vec![crate::config::mcp::McpToolRule {
                    name: "invalid-config".into(),
                    subjects: Default::default(),
                    allow: Vec::new(),
                    deny: vec!["*".into()],
                }],
            };
            Arc::new(ToolRules::new(&deny_all).unwrap_or_default())
        }
    };
    *cache = Some((config.clone(), rules.clone()));
    rules
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
