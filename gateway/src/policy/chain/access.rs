//! Access control: agent groups, and allow/deny lists of providers, models and routes per
//! agent, group or namespace (config [`crate::config::governance`]). A denied call gets a 403
//! naming the rule. Decisions need no body and no I/O, so the hook completes at once.

use std::sync::Arc;

use glob::Pattern;
use http::StatusCode;

use super::{Deny, HookFuture, Policy, PolicyCtx};
use crate::config::governance::{AccessLists, AccessRuleConfig, AgentGroupConfig};
use crate::policy::subjects::{globs, GlobError, Subjects};
use crate::protocol::errors::ErrorClass;

/// Why access rules or groups could not be compiled (validation reports the same with a line).
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// A glob does not compile.
    #[error(transparent)]
    Glob(#[from] GlobError),
}

/// Agent groups compiled: which groups an agent name belongs to.
#[derive(Debug, Default)]
pub struct Groups {
    groups: Vec<(String, Vec<Pattern>)>,
    /// Shared answer for agents in no group, so connections without groups allocate nothing.
    none: Arc<[String]>,
}

impl Groups {
    /// Compile `agent_groups`.
    pub fn new(cfg: &[AgentGroupConfig]) -> Result<Self, AccessError> {
        let groups = cfg
            .iter()
            .enumerate()
            .map(|(i, g)| Ok((g.name.clone(), globs(&format!("agent_groups[{i}].members"), &g.members)?)))
            .collect::<Result<_, AccessError>>()?;
        Ok(Groups { groups, none: Arc::from(Vec::new()) })
    }

    /// Names of the groups `agent` is a member of, in config order.
    pub fn of(&self, agent: &str) -> Arc<[String]> {
        if !self.groups.iter().any(|(_, m)| m.iter().any(|p| p.matches(agent))) {
            return self.none.clone();
        }
        self.groups.iter().filter(|(_, m)| m.iter().any(|p| p.matches(agent))).map(|(n, _)| n.clone()).collect()
    }
}

struct Lists {
    providers: Vec<Pattern>,
    models: Vec<Pattern>,
    routes: Vec<Pattern>,
}

impl Lists {
    fn new(at: &str, l: &AccessLists) -> Result<Self, AccessError> {
        Ok(Lists {
            providers: globs(&format!("{at}.providers"), &l.providers)?,
            models: globs(&format!("{at}.models"), &l.models)?,
            routes: globs(&format!("{at}.routes"), &l.routes)?,
        })
    }

    /// `(dimension, value)` pairs of a call, checked against the lists.
    fn dims<'a>(&'a self, ctx: &'a PolicyCtx<'_>) -> [(&'static str, &'a [Pattern], Option<&'a str>); 3] {
        [
            ("provider", &self.providers, Some(ctx.provider)),
            ("model", &self.models, ctx.model),
            ("route", &self.routes, Some(ctx.route)),
        ]
    }
}

struct Rule {
    name: String,
    subjects: Subjects,
    allow: Lists,
    deny: Lists,
}

impl Rule {
    fn covers(&self, ctx: &PolicyCtx<'_>) -> bool {
        self.subjects.covers(ctx.agent, ctx.groups)
    }

    /// Why this rule refuses the call, if it does: deny entries first, then allow lists.
    fn refusal(&self, ctx: &PolicyCtx<'_>) -> Option<String> {
        for (dim, pats, value) in self.deny.dims(ctx) {
            if let (Some(v), Some(p)) = (value, pats.iter().find(|p| value.is_some_and(|v| p.matches(v)))) {
                return Some(format!("{dim} {v:?} is denied by access rule {:?} ({})", self.name, p.as_str()));
            }
        }
        for (dim, pats, value) in self.allow.dims(ctx) {
            if pats.is_empty() {
                continue;
            }
            let v = value.unwrap_or("");
            if !pats.iter().any(|p| p.matches(v)) {
                return Some(format!("{dim} {v:?} is not allowed by access rule {:?}", self.name));
            }
        }
        None
    }
}

/// The access policy: every covering rule must let the call through.
pub struct AccessPolicy {
    rules: Vec<Rule>,
}

impl AccessPolicy {
    /// Compile `access` rules.
    pub fn new(cfg: &[AccessRuleConfig]) -> Result<Self, AccessError> {
        let mut rules = Vec::with_capacity(cfg.len());
        for (i, r) in cfg.iter().enumerate() {
            let at = format!("access[{i}]");
            rules.push(Rule {
                name: r.name.clone(),
                subjects: Subjects::compile(&at, &r.subjects)?,
                allow: Lists::new(&format!("{at}.allow"), &r.allow)?,
                deny: Lists::new(&format!("{at}.deny"), &r.deny)?,
            });
        }
        Ok(AccessPolicy { rules })
    }

    /// The first refusal of any covering rule.
    fn check(&self, ctx: &PolicyCtx<'_>) -> Result<(), Deny> {
        for r in self.rules.iter().filter(|r| r.covers(ctx)) {
            if let Some(message) = r.refusal(ctx) {
                return Err(Deny {
                    policy: "access",
                    rule: r.name.clone(),
                    status: StatusCode::FORBIDDEN,
                    class: ErrorClass::Permission,
                    code: "access_denied",
                    message,
                    headers: Vec::new(),
                });
            }
        }
        Ok(())
    }
}

impl Policy for AccessPolicy {
    fn name(&self) -> &'static str {
        "access"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut PolicyCtx<'_>) -> HookFuture<'a> {
        let r = self.check(ctx);
        Box::pin(std::future::ready(r))
    }
}
