//! Guardrails on the request path ([`crate::policy::guards`] does the judging): the prompt is
//! checked before anything is sent (a block is a 400 naming the guard and never reaches the
//! provider; redaction and decoration forward the rewritten body), and when a guard scans
//! responses, the agent's response is rewritten too: whole JSON bodies at their end, streams
//! chunk-safely as they pass ([`super::guard_stream`]). Every verdict is counted in
//! `tollgate_guardrail_verdicts_total` and becomes a span event.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use parking_lot::Mutex;
use serde_json::Value;

use super::guard_stream::GuardStream;
use super::{CallHook, Deny, HookFuture, Policy, PolicyCtx, ResponseFilter};
use crate::config::guards::GuardConfig;
use crate::policy::guards::{GuardError, Guardrails, Verdict};
use crate::protocol::errors::ErrorClass;
use crate::protocol::llm::api::Api;
use crate::protocol::llm::translate::StreamTranslator;
use crate::telemetry::{LlmCall, PolicyEvent, Telemetry};

/// The guardrails policy of one generation.
pub struct GuardPolicy {
    guards: Arc<Guardrails>,
    telemetry: Arc<Telemetry>,
}

impl GuardPolicy {
    /// Compile the global `guardrails` list.
    pub fn new(cfg: &[GuardConfig], telemetry: Arc<Telemetry>) -> Result<Self, GuardError> {
        Ok(GuardPolicy { guards: Arc::new(Guardrails::compile(cfg)?), telemetry })
    }

    /// No local guard (only webhooks, or nothing): the chain leaves this policy out.
    pub fn is_empty(&self) -> bool {
        self.guards.is_empty()
    }

    /// `tokens`: the prompt's token count, counted beforehand off the async workers when a
    /// guard limits tokens.
    fn check(&self, ctx: &mut PolicyCtx<'_>, tokens: Option<u64>) -> Result<(), Deny> {
        // The chain refuses a body it cannot read before any guard runs (`Policy::covers`):
        // one that still fails here is refused too, never forwarded unchecked.
        let mut body = match serde_json::from_slice::<Value>(&ctx.body) {
            Ok(b) => b,
            Err(e) => return Err(super::unreadable_body(e.to_string())),
        };
        let out = self.guards.check_request_with(ctx.api, ctx.body.len() as u64, &mut body, &mut || tokens);
        let agent = self.telemetry.metrics.agent_label(&ctx.agent.name);
        for v in &out.verdicts {
            ctx.events.push(record(&self.telemetry, &agent, v, "request"));
        }
        for (guard, e) in &out.decorate_errors {
            tracing::debug!(guard = %guard, error = %e, "decorate guard skipped");
        }
        if let Some(b) = out.blocked {
            let detail = b.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
            return Err(Deny {
                policy: "guardrail",
                rule: b.guard.to_string(),
                status: StatusCode::BAD_REQUEST,
                class: ErrorClass::InvalidRequest,
                code: "guardrail_blocked",
                message: format!("request blocked by guardrail {:?} ({}{detail})", &*b.guard, b.kind.as_str()),
                headers: Vec::new(),
            });
        }
        if out.modified {
            match serde_json::to_vec(&body) {
                Ok(b) => ctx.body = Bytes::from(b),
                Err(e) => tracing::warn!(error = %e, "guardrails: rewritten body not serialisable; sending original"),
            }
        }
        if self.guards.scans_responses() {
            let sink = Arc::new(Mutex::new(Vec::new()));
            let filter = GuardFilter {
                guards: self.guards.clone(),
                api: ctx.api,
                telemetry: self.telemetry.clone(),
                agent: agent.clone(),
                sink: sink.clone(),
            };
            ctx.attach(Box::new(GuardHook { filter: Some(filter), sink }));
        }
        Ok(())
    }
}

impl Policy for GuardPolicy {
    fn name(&self) -> &'static str {
        "guardrail"
    }

    fn covers(&self, _ctx: &PolicyCtx<'_>) -> bool {
        true
    }

    fn on_request<'a>(&'a self, ctx: &'a mut PolicyCtx<'_>) -> HookFuture<'a> {
        Box::pin(async move {
            let tokens = match self.guards.needs_tokens() {
                true => crate::protocol::llm::estimate::prompt_tokens_off_runtime(ctx.api, ctx.body.clone()).await,
                false => None,
            };
            self.check(ctx, tokens)
        })
    }
}

/// Count one verdict and describe it as a span event.
pub(super) fn record(t: &Telemetry, agent: &str, v: &Verdict, phase: &'static str) -> PolicyEvent {
    let (action, kind) = (v.action.as_str(), v.kind.as_str());
    t.governance.verdict(agent, &v.guard, action, kind, u64::from(v.count));
    let mut attributes = vec![
        ("tollgate.guard", v.guard.to_string()),
        ("tollgate.guard.action", action.to_string()),
        ("tollgate.guard.kind", kind.to_string()),
        ("tollgate.guard.count", v.count.to_string()),
        ("tollgate.guard.phase", phase.to_string()),
    ];
    if let Some(d) = &v.detail {
        attributes.push(("tollgate.guard.detail", d.clone()));
    }
    PolicyEvent { name: "tollgate.guardrail", attributes }
}

/// Response-side guard state of one call.
struct GuardHook {
    filter: Option<GuardFilter>,
    sink: Arc<Mutex<Vec<PolicyEvent>>>,
}

impl CallHook for GuardHook {
    fn response_filter(&mut self) -> Option<Box<dyn ResponseFilter>> {
        self.filter.take().map(|f| Box::new(f) as Box<dyn ResponseFilter>)
    }

    fn on_finish(self: Box<Self>, call: &mut LlmCall) {
        call.policy_events.append(&mut self.sink.lock());
    }
}

/// Rewrites one response with the PII guards that scan responses.
pub(super) struct GuardFilter {
    pub(super) guards: Arc<Guardrails>,
    pub(super) api: Api,
    pub(super) telemetry: Arc<Telemetry>,
    pub(super) agent: Arc<str>,
    /// Span events for the call (collected by [`GuardHook::on_finish`]).
    pub(super) sink: Arc<Mutex<Vec<PolicyEvent>>>,
}

impl GuardFilter {
    /// Count and keep the verdicts of the response phase.
    pub(super) fn report<'v>(&self, verdicts: impl Iterator<Item = &'v Verdict>) {
        let mut sink = self.sink.lock();
        for v in verdicts {
            sink.push(record(&self.telemetry, &self.agent, v, "response"));
        }
    }
}

impl ResponseFilter for GuardFilter {
    fn body(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        let mut v: Value = serde_json::from_slice(body).ok()?;
        let out = self.guards.scan_response(self.api, &mut v);
        self.report(out.verdicts.iter());
        if let Some(b) = &out.blocked {
            // The whole body is still held: replace it with an error in the agent's shape.
            let msg = format!("response blocked by guardrail {:?} ({})", &*b.guard, b.kind.as_str());
            return Some(crate::protocol::errors::error_body(
                self.api.shape(),
                StatusCode::OK,
                ErrorClass::Permission,
                "guardrail_blocked",
                &msg,
            ));
        }
        out.modified.then(|| serde_json::to_vec(&v).ok()).flatten()
    }

    fn into_stream(
        self: Box<Self>,
        inner: Option<Box<dyn StreamTranslator>>,
        drop_usage: bool,
    ) -> Box<dyn StreamTranslator> {
        Box::new(GuardStream::new(*self, inner, drop_usage))
    }
}
