//! Guardrails engine: checks and rewrites of LLM requests and responses, driven by the
//! `guardrails` config ([`crate::config::guards`]). This module is pure: it judges and
//! rewrites `serde_json::Value` bodies and text deltas, and the proxy decides what to do with
//! the [`Verdict`]s (refuse with an error, cut a stream, count a metric, add a span event).
//!
//! Guards, in the order configured:
//! - [`RegexGuard`] (`kind: regex`): deny / allow regex lists over selected messages.
//! - [`PiiScanner`] (`kind: pii`): PII and secrets with a per-entity action (block, redact,
//!   mask, log), over request text, response bodies and response streams ([`StreamRedactor`]).
//! - [`Decorator`] (`kind: decorate`): messages prepended / appended to the prompt.
//! - [`SizeLimits`] (`kind: limits`): request bytes and prompt tokens.
//! - [`WebhookGuard`] (`kind: webhook`): an external checker asked over HTTP. Only its
//!   rendering and judging are here (pure); the call runs in [`crate::policy::chain`], after
//!   the guards above, so it sees the prompt already redacted.
//!
//! Everything is compiled once per config load ([`Guardrails::compile`]); errors name the
//! config field (`guardrails[2].deny[0]: regex parse error ...`). On the request path a clean
//! prompt costs one regex pass per guard and allocates nothing: bodies are walked in place
//! ([`walk`]) and only fields that must change are rewritten.

mod decorate;
mod pii;
mod prompt;
mod size;
mod stream;
mod walk;
mod webhook;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod pii_tests;
#[cfg(test)]
mod shape_tests;
#[cfg(test)]
mod stream_tests;

pub use decorate::{DecorateError, Decorator};
pub use pii::{iban_valid, luhn_valid, mask_into, ssn_valid, Finding, PiiError, PiiScanner, MIN_HOLDBACK};
pub use prompt::{PromptError, RegexGuard};
pub use size::{SizeError, SizeLimits};
pub use stream::{ResponseStream, StreamRedactor};
pub use walk::Location;
pub use webhook::{Judgement, WebhookError, WebhookGuard, WebhookSubject};

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::config::guards::{GuardAction, GuardConfig, PiiEntity};
use crate::protocol::llm::api::Api;
use crate::protocol::llm::estimate;

/// Why the guardrails config was refused: the field path and what is wrong with it, ready for
/// `ConfigError::Invalid`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct GuardError {
    /// Field path (`guardrails[2].deny[0]`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// What a check found, one per guard, kind and action (with a count), so the caller can emit
/// one metric increment and one span event per verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Name of the guard (config `name`).
    pub guard: Arc<str>,
    /// What the guard did or asks the caller to do.
    pub action: GuardAction,
    /// What was found.
    pub kind: VerdictKind,
    /// How many times (values, messages, texts).
    pub count: u32,
    /// Human-readable reason, for blocks (`matched deny[0]`, `request body of ... bytes`).
    pub detail: Option<String>,
}

impl Verdict {
    /// Whether the request (or stream) must be refused.
    pub fn is_block(&self) -> bool {
        self.action == GuardAction::Block
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guard {}: {} {} (x{})", self.guard, self.action.as_str(), self.kind.as_str(), self.count)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

/// What a [`Verdict`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VerdictKind {
    /// A PII entity.
    Pii(PiiEntity),
    /// A deny pattern matched (index in the guard's `deny` list).
    RegexDeny {
        /// Index of the first matching pattern.
        index: usize,
    },
    /// Messages matched no allow pattern.
    RegexAllow,
    /// `max_request_bytes` exceeded.
    RequestBytes,
    /// `max_prompt_tokens` exceeded.
    PromptTokens,
}

impl VerdictKind {
    /// Label value for metrics (`email`, `regex_deny`, `prompt_tokens`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            VerdictKind::Pii(e) => e.as_str(),
            VerdictKind::RegexDeny { .. } => "regex_deny",
            VerdictKind::RegexAllow => "regex_allow",
            VerdictKind::RequestBytes => "request_bytes",
            VerdictKind::PromptTokens => "prompt_tokens",
        }
    }
}

/// Count one more `kind`/`action` for `guard`, merging into an existing verdict.
pub(crate) fn tally(
    verdicts: &mut Vec<Verdict>,
    guard: &Arc<str>,
    kind: VerdictKind,
    action: GuardAction,
    detail: Option<String>,
) {
    match verdicts.iter_mut().find(|v| v.kind == kind && v.action == action && v.guard == *guard) {
        Some(v) => v.count = v.count.saturating_add(1),
        None => verdicts.push(Verdict { guard: guard.clone(), action, kind, count: 1, detail }),
    }
}

/// A PII value found in a body: which guard, which text field, which bytes of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedFinding {
    /// The PII guard.
    pub guard: Arc<str>,
    /// The text field (`messages[1].content`).
    pub location: Location,
    /// The value; its span is in bytes of that field's original text.
    pub finding: Finding,
}

/// Result of running the guards over one body.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every verdict, in guard order (the blocking one included).
    pub verdicts: Vec<Verdict>,
    /// PII values found.
    pub findings: Vec<LocatedFinding>,
    /// The verdict that refuses the body; later guards did not run.
    pub blocked: Option<Verdict>,
    /// The body was rewritten (redaction, masking, decoration): re-serialise it.
    pub modified: bool,
    /// Decorate guards that could not apply (body of an unexpected shape); the body is
    /// forwarded without their messages.
    pub decorate_errors: Vec<(Arc<str>, DecorateError)>,
}

/// One compiled guard.
#[derive(Debug)]
enum Guard {
    Regex(RegexGuard),
    Pii(Arc<PiiScanner>),
    Decorate(Decorator),
    Size(SizeLimits),
}

/// The compiled guards of one config generation; shared read-only by every request.
#[derive(Debug, Default)]
pub struct Guardrails {
    guards: Vec<Guard>,
}

impl Guardrails {
    /// Compile `cfgs`, naming fields `guardrails[i]...` in errors.
    pub fn compile(cfgs: &[GuardConfig]) -> Result<Self, GuardError> {
        Self::compile_at("guardrails", cfgs)
    }

    /// Compile `cfgs` found at config path `prefix` (e.g. `routes[0].guardrails`).
    pub fn compile_at(prefix: &str, cfgs: &[GuardConfig]) -> Result<Self, GuardError> {
        let mut guards = Vec::with_capacity(cfgs.len());
        for (i, c) in cfgs.iter().enumerate() {
            let bad = |field: &str, message: String| GuardError { field: format!("{prefix}[{i}].{field}"), message };
            if c.name().trim().is_empty() {
                return Err(bad("name", "must not be empty".into()));
            }
            if cfgs[..i].iter().any(|o| o.name() == c.name()) {
                return Err(bad("name", format!("duplicate guard name {:?}", c.name())));
            }
            let guard = match c {
                GuardConfig::Regex(r) => Guard::Regex(RegexGuard::new(r).map_err(|e| match e {
                    PromptError::Pattern { field, message } => bad(&field, message),
                    PromptError::Action(a) => {
                        bad("action", format!("{a} is not valid for a regex guard (use block or log)"))
                    }
                    PromptError::Empty => bad("deny", "a regex guard needs at least one deny or allow pattern".into()),
                })?),
                GuardConfig::Pii(p) => Guard::Pii(Arc::new(PiiScanner::new(p).map_err(|e| match e {
                    PiiError::Build(m) => bad("entities", m),
                    e @ PiiError::Holdback { .. } => bad("max_holdback_bytes", e.to_string()),
                })?)),
                GuardConfig::Decorate(d) => Guard::Decorate(
                    Decorator::new(d)
                        .map_err(|_| bad("prepend", "a decorate guard needs at least one message".into()))?,
                ),
                GuardConfig::Limits(l) => Guard::Size(SizeLimits::new(l).map_err(|e| match e {
                    SizeError::Empty => {
                        bad("max_request_bytes", "a limits guard needs max_request_bytes or max_prompt_tokens".into())
                    }
                    SizeError::Zero(f) => bad(f, "must be greater than 0".into()),
                })?),
                GuardConfig::Webhook(w) => {
                    // Checked here so `tollgate check` names the field; run by the chain.
                    WebhookGuard::new(w).map_err(|e| bad(&e.field, e.message))?;
                    continue;
                }
            };
            guards.push(guard);
        }
        Ok(Guardrails { guards })
    }

    /// The `kind: webhook` guards of `cfgs`, in order (the engine itself skips them: they are
    /// asynchronous and run as their own policy).
    pub fn webhooks(cfgs: &[GuardConfig]) -> Result<Vec<Arc<WebhookGuard>>, GuardError> {
        let mut out = Vec::new();
        for (i, c) in cfgs.iter().enumerate() {
            if let GuardConfig::Webhook(w) = c {
                let g = WebhookGuard::new(w)
                    .map_err(|e| GuardError { field: format!("guardrails[{i}].{}", e.field), message: e.message })?;
                out.push(Arc::new(g));
            }
        }
        Ok(out)
    }

    /// Whether some `limits` guard limits prompt tokens, so the caller counts them (off the
    /// async workers) before [`Guardrails::check_request_with`].
    pub fn needs_tokens(&self) -> bool {
        self.guards.iter().any(|g| matches!(g, Guard::Size(s) if s.needs_tokens()))
    }

    /// No guards: callers can skip parsing bodies altogether.
    pub fn is_empty(&self) -> bool {
        self.guards.is_empty()
    }

    /// Whether some guard scans responses (so the caller sets up [`Guardrails::response_stream`]
    /// or [`Guardrails::scan_response`]).
    pub fn scans_responses(&self) -> bool {
        self.guards.iter().any(|g| matches!(g, Guard::Pii(p) if p.responses && p.is_active()))
    }

    /// Run every guard over a request: `raw` is the body as received (its length and token
    /// estimate feed `limits` guards), `body` its parsed form, rewritten in place.
    pub fn check_request(&self, api: Api, raw: &[u8], body: &mut Value) -> Outcome {
        let mut memo = None;
        let mut tokens = || *memo.get_or_insert_with(|| estimate::prompt_tokens(api, raw));
        self.check_request_with(api, raw.len() as u64, body, &mut tokens)
    }

    /// [`Guardrails::check_request`] with the token count supplied by the caller (called at
    /// most once per `limits` guard, only when one has a token limit). Guards run in config
    /// order and stop at the first block; the token count describes the body as received.
    pub fn check_request_with(
        &self,
        api: Api,
        body_len: u64,
        body: &mut Value,
        tokens: &mut dyn FnMut() -> Option<u64>,
    ) -> Outcome {
        let mut out = Outcome::default();
        for g in &self.guards {
            match g {
                Guard::Size(s) => {
                    if let Some(v) = s.check(body_len, tokens) {
                        out.block(v);
                    }
                }
                Guard::Regex(r) => {
                    if let Some(v) = r.check(api, body) {
                        match v.is_block() {
                            true => out.block(v),
                            false => out.verdicts.push(v),
                        }
                    }
                }
                Guard::Pii(p) if p.requests => pii_body(p, body, &mut out, |b, f| walk::request(api, b, f), true),
                Guard::Pii(_) => {}
                Guard::Decorate(d) => match d.apply(api, body) {
                    Ok(changed) => out.modified |= changed,
                    Err(e) => out.decorate_errors.push((d.name.clone(), e)),
                },
            }
            if out.blocked.is_some() {
                break;
            }
        }
        out
    }

    /// Run the PII guards over a complete (non-streamed) response body, rewritten in place.
    pub fn scan_response(&self, api: Api, body: &mut Value) -> Outcome {
        let mut out = Outcome::default();
        for g in &self.guards {
            if let Guard::Pii(p) = g {
                if p.responses {
                    pii_body(p, body, &mut out, |b, f| walk::response(api, b, f), false);
                }
            }
            if out.blocked.is_some() {
                break;
            }
        }
        out
    }

    /// A redactor chain for one streamed response's text (see [`StreamRedactor`] for the
    /// contract); `None` when no guard scans responses.
    pub fn response_stream(&self) -> Option<ResponseStream> {
        let stages: Vec<StreamRedactor> = self
            .guards
            .iter()
            .filter_map(|g| match g {
                Guard::Pii(p) if p.responses && p.is_active() => Some(StreamRedactor::new(p.clone())),
                _ => None,
            })
            .collect();
        (!stages.is_empty()).then(|| ResponseStream::new(stages))
    }
}

impl Outcome {
    fn block(&mut self, v: Verdict) {
        self.verdicts.push(v.clone());
        self.blocked = Some(v);
    }
}

/// Scan the text fields `walk` visits with `p` (filtering by role on requests), then rewrite
/// the fields that need it through their JSON pointers.
fn pii_body(
    p: &Arc<PiiScanner>,
    body: &mut Value,
    out: &mut Outcome,
    walk: impl Fn(&Value, &mut walk::Visit<'_>),
    by_role: bool,
) {
    if !p.is_active() {
        return;
    }
    let mut edits: Vec<(Location, String)> = Vec::new();
    let mut verdicts = Vec::new();
    let mut block: Option<Finding> = None;
    walk(body, &mut |at, role, text| {
        if by_role && !p.roles.contains(&role) {
            return;
        }
        let found = p.scan(text);
        for f in &found {
            tally(&mut verdicts, &p.name, VerdictKind::Pii(f.entity), f.action, None);
            if f.action == GuardAction::Block && block.is_none() {
                block = Some(*f);
            }
            out.findings.push(LocatedFinding { guard: p.name.clone(), location: at, finding: *f });
        }
        if let Some(new) = p.apply(text, &found) {
            edits.push((at, new));
        }
    });
    if let Some(f) = block {
        let kind = VerdictKind::Pii(f.entity);
        let v = verdicts.iter().find(|v| v.kind == kind && v.is_block()).cloned();
        out.verdicts.append(&mut verdicts);
        out.blocked = Some(v.unwrap_or(Verdict {
            guard: p.name.clone(),
            action: GuardAction::Block,
            kind,
            count: 1,
            detail: None,
        }));
        return;
    }
    out.verdicts.append(&mut verdicts);
    for (at, new) in edits {
        if let Some(v) = body.pointer_mut(&at.pointer()) {
            *v = Value::String(new);
            out.modified = true;
        }
    }
}
