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
    /// Callee name (card name, else the route name).
    pub target: &'a str,
    /// The route's name (rules match it too: the card may not have been seen).
    pub route: &'a str,
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
        // The callee answers to its card name and to the route's name: a deny on either
        // refuses and an allow on either admits, so a rule holds whether or not this node has
        // seen the card.
        let names = [h.target, h.route];
        let skill = h.is_message.then(|| h.skill.unwrap_or(""));
        for n in names {
            if let Some(p) = self.deny.targets.iter().find(|p| p.matches(n)) {
                return Some(format!("target {n:?} is denied by a2a rule {:?} ({})", self.name, p.as_str()));
            }
        }
        if let Some(s) = skill.filter(|s| !s.is_empty()) {
            if let Some(p) = self.deny.skills.iter().find(|p| p.matches(s)) {
                return Some(format!("skill {s:?} is denied by a2a rule {:?} ({})", self.name, p.as_str()));
            }
        }
        let allowed = |pats: &[Pattern], v: &str| pats.iter().any(|p| p.matches(v));
        if !self.allow.targets.is_empty() && !names.iter().any(|n| allowed(&self.allow.targets, n)) {
            return Some(format!("target {:?} is not allowed by a2a rule {:?}", h.target, self.name));
        }
        match skill {
            Some(s) if !self.allow.skills.is_empty() && !allowed(&self.allow.skills, s) => {
                Some(format!("skill {s:?} is not allowed by a2a rule {:?}", self.name))
            }
            _ => None,
        }
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
        Hop { agent, groups: &[], target, route: "r", skill, is_message: true }
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
    fn rules_match_the_card_name_or_the_route() {
        let p = policy("rules:\n- {name: no-pay, deny: {targets: [payments-agent, payments]}}\n- {name: only-book, allow: {targets: [booking]}}\n");
        let a = Agent::unknown("a");
        // Card not seen on this node: the callee is the route name, still allowed and denied.
        let cold = Hop { route: "booking", ..hop(&a, "booking", None) };
        assert!(p.check(&cold).is_ok());
        let warm = Hop { route: "booking", ..hop(&a, "booking-agent", None) };
        assert!(p.check(&warm).is_ok(), "allowed by its route name");
        let pay = Hop { route: "payments", ..hop(&a, "payments", None) };
        assert_eq!(p.check(&pay).unwrap_err().rule, "no-pay");
        let pay_card = Hop { route: "booking", ..hop(&a, "payments-agent", None) };
        assert_eq!(p.check(&pay_card).unwrap_err().rule, "no-pay", "a denied card name refuses on any route");
    }

    #[test]
    fn skill_allow_list_needs_a_named_skill() {
        let p = policy("rules:\n- {name: s, allow: {skills: ['book-*']}}\n");
        let a = Agent::unknown("a");
        assert!(p.check(&hop(&a, "t", Some("book-flight"))).is_ok());
        assert!(p.check(&hop(&a, "t", None)).is_err());
    }
}
