//! Regex prompt guard: deny and allow lists over the text of selected prompt messages, to stop
//! known jailbreak phrasings or keep a route on topic without a model in the loop.
//!
//! Deny: any scanned text matching any deny pattern fails the guard; the verdict names the
//! first pattern that matched (`deny[i]`) and counts the matching texts. Allow (when
//! configured): every scanned *message* must have a text part matching some allow pattern;
//! the verdict counts the messages that had none. Messages without text (images only) are not
//! judged. With `last_user_only`, only the last message whose role is `user` is scanned.

use std::sync::Arc;

use regex::RegexSet;
use serde_json::Value;

use super::walk::{self, Location};
use super::{Verdict, VerdictKind};
use crate::config::guards::{GuardAction, MessageRole, RegexGuardConfig};
use crate::protocol::llm::api::Api;

/// Why a regex guard could not be built; `field` is relative to the guard (`deny[0]`).
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// A pattern does not compile (or compiles too big).
    #[error("{field}: {message}")]
    Pattern {
        /// `deny[i]` or `allow[i]`.
        field: String,
        /// The regex crate's message.
        message: String,
    },
    /// `action` is not `block` or `log`.
    #[error("action: {0} is not valid for a regex guard (use block or log)")]
    Action(&'static str),
    /// Neither list has a pattern.
    #[error("deny: a regex guard needs at least one deny or allow pattern")]
    Empty,
}

/// A compiled regex guard.
#[derive(Debug)]
pub struct RegexGuard {
    pub(crate) name: Arc<str>,
    deny: Option<RegexSet>,
    allow: Option<RegexSet>,
    roles: Vec<MessageRole>,
    last_user_only: bool,
    action: GuardAction,
}

/// Compile each pattern alone first, so the error names the offending entry, then as one set.
fn compile(list: &[String], field: &str) -> Result<Option<RegexSet>, PromptError> {
    if list.is_empty() {
        return Ok(None);
    }
    for (i, p) in list.iter().enumerate() {
        regex::Regex::new(p)
            .map_err(|e| PromptError::Pattern { field: format!("{field}[{i}]"), message: e.to_string() })?;
    }
    RegexSet::new(list).map(Some).map_err(|e| PromptError::Pattern { field: field.to_string(), message: e.to_string() })
}

impl RegexGuard {
    /// Compile `cfg` (once per config load).
    pub fn new(cfg: &RegexGuardConfig) -> Result<Self, PromptError> {
        if !matches!(cfg.action, GuardAction::Block | GuardAction::Log) {
            return Err(PromptError::Action(cfg.action.as_str()));
        }
        if cfg.deny.is_empty() && cfg.allow.is_empty() {
            return Err(PromptError::Empty);
        }
        Ok(RegexGuard {
            name: Arc::from(cfg.name.as_str()),
            deny: compile(&cfg.deny, "deny")?,
            allow: compile(&cfg.allow, "allow")?,
            roles: cfg.roles.clone(),
            last_user_only: cfg.last_user_only,
            action: cfg.action,
        })
    }

    /// Judge a request body of `api`; `None` when it passes. Does not allocate unless it fails.
    pub fn check(&self, api: Api, body: &Value) -> Option<Verdict> {
        let only = if self.last_user_only {
            let mut last = None;
            walk::request(api, body, &mut |at: Location, role, _: &str| {
                if role == MessageRole::User && at.message.is_some() {
                    last = at.message;
                }
            });
            Some(last?)
        } else {
            None
        };
        let selected = |at: &Location, role: MessageRole| match only {
            Some(m) => at.message == Some(m),
            None => self.roles.contains(&role),
        };

        let mut denied = 0u32;
        let mut first_deny: Option<usize> = None;
        // Allow bookkeeping: the message being judged and whether one of its parts matched.
        let mut current: Option<(Option<usize>, bool)> = None;
        let mut unallowed = 0u32;
        walk::request(api, body, &mut |at: Location, role, text: &str| {
            if !selected(&at, role) {
                return;
            }
            if let Some(deny) = &self.deny {
                // `is_match` first: `matches` allocates, and most texts match nothing.
                if deny.is_match(text) {
                    denied += 1;
                    if first_deny.is_none() {
                        first_deny = deny.matches(text).iter().next();
                    }
                }
            }
            if let Some(allow) = &self.allow {
                let ok = allow.is_match(text);
                match &mut current {
                    // Another part of the same message (system parts are judged one by one).
                    Some((m, matched)) if m.is_some() && *m == at.message => *matched |= ok,
                    _ => {
                        if let Some((_, false)) = current {
                            unallowed += 1;
                        }
                        current = Some((at.message, ok));
                    }
                }
            }
        });
        if let Some((_, false)) = current {
            unallowed += 1;
        }

        if let Some(i) = first_deny {
            return Some(Verdict {
                guard: self.name.clone(),
                action: self.action,
                kind: VerdictKind::RegexDeny { index: i },
                count: denied,
                detail: Some(format!("matched deny[{i}]")),
            });
        }
        (unallowed > 0).then(|| Verdict {
            guard: self.name.clone(),
            action: self.action,
            kind: VerdictKind::RegexAllow,
            count: unallowed,
            detail: Some(format!("{unallowed} message(s) matched no allow pattern")),
        })
    }
}
