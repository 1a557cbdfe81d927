//! Hop authorization (`a2a.rules`, config [`crate::config::a2a`]): which calling agent may
//! reach which callee and skill. Rules are compiled with the config generation's policies
//! ([`crate::policy::chain::Policies`]) and shared by its connections; decisions need no I/O.

use glob::Pattern;

use crate::capture::Agent;
use crate::config::a2a::{A2aLists, A2aRuleConfig};
use crate::policy::subjects::{globs, GlobError, Subjects};

/// Why rules could not be compiled (load-time validation reports the same with a line).
#[derive(Debug, thiserror::Error)]
pub enum A2aPolicyError {
    /// A glob does not compile.
    #[error(transparent)]
    Glob(#[from] GlobError),
}

struct Lists {
    targets: Vec<Pattern>,
    skills: Vec<Pattern>,
}

impl Lists {
    fn new(at: &str, l: &A2aLists) -> Result<Self, A2aPolicyError> {
        Ok(Lists {
            targets: globs(&format!("{at}.targets"), &l.targets)?,
            skills: globs(&format!("{at}.skills"), &l.skills)?,
        })
    }
}

struct Rule {
    name: String,
    subjects: Subjects,
    allow: Lists,
    deny: Lists,
}

/// One hop as the rules see it.
pub struct Hop<'a> {
    /// The calling agent (kernel identity).
    pub agent: &'a Agent,
    /// The agent's groups.
    pub groups: &'a [String],
    /// Callee name (card name or route).
    pub target: &'a str,
    /// The skill a message names; `None` for other methods or when it names none.
    pub skill: Option<&'a str>,
    /// Whether the hop sends a message (skill lists apply only then).
    pub is_message: bool,
}

/// A refusal: the rule and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The rule that refused.
    pub rule: String,
    /// Why, naming the rule.
    pub message: String,
}

impl Rule {
    fn covers(&self, h: &Hop<'_>) -> bool {
        self.subjects.covers(h.agent, h.groups)
    }

    fn refusal(&self, h: &Hop<'_>) -> Option<String> {
        let skill = if h.is_message { Some(h.skill.unwrap_or("")) } else { None };
        let dims = |l: &'_ Lists| [("target", l.targets.len(), Some(h.target)), ("skill", l.skills.len(), skill)];
        for ((dim, _, value), pats) in dims(&self.deny).into_iter().zip([&self.deny.targets, &self.deny.skills]) {
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                if let Some(p) = pats.iter().find(|p| p.matches(v)) {
                    return Some(format!("{dim} {v:?} is denied by a2a rule {:?} ({})", self.name, p.as_str()));
                }
            }
        }
        for ((dim, n, value), pats) in dims(&self.allow).into_iter().zip([&self.allow.targets, &self.allow.skills]) {
            let Some(v) = value else { continue };
            if n > 0 && !pats.iter().any(|p| p.matches(v)) {
                return Some(format!("{dim} {v:?} is not allowed by a2a rule {:?}", self.name));
            }
        }
        None
    }
}

/// The compiled `a2a.rules`: every covering rule must let the hop through.
#[derive(Default)]
pub struct A2aPolicy {
    rules: Vec<Rule>,
}

impl A2aPolicy {
    /// Compile the rules.
    pub fn new(cfg: &[A2aRuleConfig]) -> Result<Self, A2aPolicyError> {
        let mut rules = Vec::with_capacity(cfg.len());
        for (i, r) in cfg.iter().enumerate() {
            let at = format!("a2a.rules[{i}]");
            rules.push(Rule {
                name: r.name.clone(),
                subjects: Subjects::compile(&at, &r.subjects)?,
                allow: Lists::new(&format!("{at}.allow"), &r.allow)?,
                deny: Lists::new(&format!("{at}.deny"), &r.deny)?,
            });
        }
        Ok(A2aPolicy { rules })
    }

    /// Whether no rule is configured (then hops are only observed).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first refusal of any covering rule.
    pub fn check(&self, h: &Hop<'_>) -> Result<(), Denial> {
        for r in self.rules.iter().filter(|r| r.covers(h)) {
            if let Some(message) = r.refusal(h) {
                return Err(Denial { rule: r.name.clone(), message });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> A2aPolicy {
        let c: crate::config::a2a::A2aConfig = serde_yaml_ng::from_str(yaml).expect("yaml");
        A2aPolicy::new(&c.rules).expect("compile")
    }

    fn hop<'a>(agent: &'a Agent, target: &'a str, skill: Option<&'a str>) -> Hop<'a> {
        Hop { agent, groups: &[], target, skill, is_message: true }
    }

    #[test]
    fn deny_wins_and_allow_lists_narrow() {
        let p = policy(
            "rules:\n- {name: orch, match: {agent: 'orch*'}, allow: {targets: ['booking-*']}, deny: {skills: [refund]}}\n",
        );
        let orch = Agent::unknown("orchestrator");
        let other = Agent::unknown("billing");
        assert!(p.check(&hop(&orch, "booking-agent", Some("book-flight"))).is_ok());
        assert!(p.check(&hop(&orch, "booking-agent", None)).is_ok());
        let d = p.check(&hop(&orch, "booking-agent", Some("refund"))).unwrap_err();
        assert_eq!(d.rule, "orch");
        assert!(d.message.contains("skill \"refund\" is denied"), "{}", d.message);
        let d = p.check(&hop(&orch, "payments", Some("x"))).unwrap_err();
        assert!(d.message.contains("target \"payments\" is not allowed"), "{}", d.message);
        assert!(p.check(&hop(&other, "payments", Some("refund"))).is_ok(), "rule does not cover billing");
        // Skill lists do not apply to task queries.
        let q = Hop { is_message: false, ..hop(&orch, "booking-agent", None) };
        assert!(p.check(&q).is_ok());
    }

    #[test]
    fn skill_allow_list_needs_a_named_skill() {
        let p = policy("rules:\n- {name: s, allow: {skills: ['book-*']}}\n");
        let a = Agent::unknown("a");
        assert!(p.check(&hop(&a, "t", Some("book-flight"))).is_ok());
        assert!(p.check(&hop(&a, "t", None)).is_err());
    }
}
