//! Governance policies on the LLM request path, composed one way: each policy implements
//! [`Policy`] (a request hook that may refuse the call, rewrite its body, or attach a
//! per-call [`CallHook`] for the response phases), and [`Policies`] runs them in order. A
//! config generation builds one chain; a connection keeps its generation's chain, so a reload
//! never changes policy under an in-flight call.
//!
//! Phases (pingora-style):
//! 1. [`Policy::on_request`] before anything is sent upstream: access rules, guardrails on the
//!    prompt, token reservation. The first [`Deny`] ends the call with an error in the
//!    caller's API shape.
//! 2. [`CallHook::on_response_headers`] on the response that goes back to the agent
//!    (`x-ratelimit-*`).
//! 3. [`CallHook::response_filter`]: rewrites the response body or stream (PII redaction);
//!    [`CallHook::response_check`]: an asynchronous verdict on a whole non-streamed response
//!    before the agent sees it (webhook guardrails); a refusal replaces the response.
//! 4. [`CallHook::on_finish`] with the finished call (exact usage): settle the reservation.
//!    A hook dropped without finishing (call failed before a response) cleans up in `Drop`.
//!
//! Adding a policy is one module implementing [`Policy`] plus one line in [`Policies::build`].
//! An empty chain costs one branch per call: no body parse, no allocation.

mod access;
mod guard;
mod guard_stream;
mod rate;
mod webhook;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::capture::Agent;
use crate::config::Config;
use crate::policy::a2a_hops::A2aPolicy;
use crate::policy::mcp_limits::ToolLimits;
use crate::policy::mcp_tools::ToolRules;
use crate::protocol::errors::ErrorClass;
use crate::protocol::llm::api::Api;
use crate::protocol::llm::translate::StreamTranslator;
use crate::telemetry::{LlmCall, PolicyEvent, Telemetry};

pub use access::{AccessError, AccessPolicy, Groups};
pub use guard::GuardPolicy;
pub use rate::{RateLimitError, RateLimitPolicy};
pub use webhook::{WebhookPolicy, WebhookPolicyError};

/// Boxed future of a request hook (policies are trait objects, so hooks cannot be `async fn`).
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Deny>> + Send + 'a>>;

/// Boxed future of a [`ResponseCheck`].
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Deny>> + Send + 'a>>;

/// Why the chain could not be built from a (validated) config.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Access rules or agent groups.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// Token limits.
    #[error(transparent)]
    RateLimit(#[from] RateLimitError),
    /// Guardrails.
    #[error(transparent)]
    Guard(#[from] crate::policy::guards::GuardError),
    /// Webhook guardrails.
    #[error(transparent)]
    Webhook(#[from] WebhookPolicyError),
    /// MCP tool rules.
    #[error(transparent)]
    McpTools(#[from] crate::policy::mcp_tools::ToolRuleError),
    /// MCP tool-call limits.
    #[error(transparent)]
    McpToolLimits(#[from] crate::policy::mcp_limits::ToolLimitError),
    /// The limit engine shared by token and tool-call limits (backend, Redis URL).
    #[error("rate_limits: {0}")]
    Limiter(#[from] crate::policy::limits::LimitError),
    /// A2A hop rules.
    #[error(transparent)]
    A2aHops(#[from] crate::policy::a2a_hops::A2aPolicyError),
}

/// A refusal: what the agent gets (status, error class and code in its API shape, extra
/// headers) and what operators see (policy and rule in the audit log and metrics).
#[derive(Debug, Clone)]
pub struct Deny {
    /// Policy kind (`access`, `rate_limit`, `guardrail`): the `policy` metric label.
    pub policy: &'static str,
    /// The rule, limit or guard that refused.
    pub rule: String,
    /// HTTP status.
    pub status: StatusCode,
    /// Error class of the shaped body.
    pub class: ErrorClass,
    /// OpenAI `error.code`.
    pub code: &'static str,
    /// Message (prefixed `tollgate:` in the body).
    pub message: String,
    /// Headers of the refusal (`retry-after`, `x-ratelimit-*`).
    pub headers: Vec<(String, String)>,
}

/// The call as policies see it before it is sent.
pub struct PolicyCtx<'a> {
    /// Who is calling.
    pub agent: &'a Agent,
    /// The agent's groups (resolved once per connection).
    pub groups: &'a [String],
    /// Route name.
    pub route: &'a str,
    /// Provider name the rules match (the route's API kind).
    pub provider: &'a str,
    /// The recognised operation.
    pub api: Api,
    /// Requested model.
    pub model: Option<&'a str>,
    /// The request body to send; a policy may replace it.
    pub body: Bytes,
    /// Span events of what policies did.
    pub events: Vec<PolicyEvent>,
    /// The chain's telemetry (metrics).
    pub telemetry: &'a Telemetry,
    /// Response-phase hooks attached so far (see [`PolicyCtx::attach`]).
    pub(crate) hooks: Vec<Box<dyn CallHook>>,
}

impl PolicyCtx<'_> {
    /// Keep `hook` for the response phases of this call.
    pub fn attach(&mut self, hook: Box<dyn CallHook>) {
        self.hooks.push(hook);
    }

    /// The agent's Kubernetes namespace, when known.
    pub fn namespace(&self) -> Option<&str> {
        crate::policy::subjects::namespace(self.agent)
    }
}

/// One policy of the chain.
pub trait Policy: Send + Sync {
    /// Kind name (`access`, `rate_limit`, `guardrail`), for logs and metrics.
    fn name(&self) -> &'static str;

    /// Runs before the call is sent: refuse it, rewrite `ctx.body`, or attach a [`CallHook`].
    fn on_request<'a>(&'a self, ctx: &'a mut PolicyCtx<'_>) -> HookFuture<'a>;

    /// This policy judges the call by its body (guardrails read the prompt, token limits count
    /// it and read its model). When any policy covers a call, a body tollgate cannot read is
    /// refused instead of forwarded unchecked (a lenient provider might accept it).
    fn covers(&self, _ctx: &PolicyCtx<'_>) -> bool {
        false
    }
}

/// Policy label of the refusal of a body tollgate cannot read (see [`Policy::covers`]).
pub const UNREADABLE_POLICY: &str = "request_body";

/// Rule label of that refusal.
pub const UNREADABLE_RULE: &str = "unreadable_json";

/// The refusal of a body tollgate cannot read: a 400 in the caller's API shape, with the
/// parser's reason.
pub(crate) fn unreadable_body(reason: String) -> Deny {
    Deny {
        policy: UNREADABLE_POLICY,
        rule: UNREADABLE_RULE.to_string(),
        status: StatusCode::BAD_REQUEST,
        class: ErrorClass::InvalidRequest,
        code: "invalid_request_body",
        message: format!(
            "the request body is not JSON tollgate can read ({reason}); guardrails or token limits apply \
             to this call, so it is not forwarded"
        ),
        headers: Vec::new(),
    }
}

/// Per-call state a policy keeps for the response phases.
pub trait CallHook: Send {
    /// Headers of the response returned to the agent (any status).
    fn on_response_headers(&mut self, _status: StatusCode, _headers: &mut HeaderMap) {}

    /// A rewriter of the (successful) response body; taken at most once.
    fn response_filter(&mut self) -> Option<Box<dyn ResponseFilter>> {
        None
    }

    /// An asynchronous check of the complete, successful, non-streamed response; taken at
    /// most once. The response path holds such a response (bounded) until every check passed.
    fn response_check(&mut self) -> Option<Box<dyn ResponseCheck>> {
        None
    }

    /// The call ended (usage final, or failed); may add span events.
    fn on_finish(self: Box<Self>, _call: &mut LlmCall) {}
}

/// Rewrites what the agent receives (guardrails on responses).
pub trait ResponseFilter: Send {
    /// A whole non-streamed body in the agent's API: `Some(new bytes)` when changed.
    fn body(&mut self, body: &[u8]) -> Option<Vec<u8>>;

    /// The filter as a stream converter for the agent's events: `inner` translates provider
    /// events first (when the APIs differ); `drop_usage` removes the usage-only chunk
    /// tollgate asked for.
    fn into_stream(
        self: Box<Self>,
        inner: Option<Box<dyn StreamTranslator>>,
        drop_usage: bool,
    ) -> Box<dyn StreamTranslator>;
}

/// Judges a whole response before it is returned (external guardrails): a [`Deny`] replaces
/// the response with a refusal in the agent's API shape.
pub trait ResponseCheck: Send + Sync {
    /// Check `body`, the response as the agent would receive it (after translation and
    /// redaction).
    fn check<'a>(&'a self, body: &'a [u8]) -> CheckFuture<'a>;
}

/// The chain of one config generation.
#[derive(Default)]
pub struct Policies {
    chain: Vec<Box<dyn Policy>>,
    groups: Groups,
    limiter: Option<crate::policy::limits::Limiter>,
    /// `mcp.tools`, for the MCP handler (its calls are JSON-RPC, not LLM calls).
    mcp_tools: Arc<ToolRules>,
    /// `mcp.tool_limits`, counted by `limiter`, for the MCP handler and federation listener.
    mcp_tool_limits: Arc<ToolLimits>,
    /// `a2a.rules`, for the A2A handler.
    a2a_rules: A2aPolicy,
}

impl Policies {
    /// Build every configured policy, in order: access (cheap, no body), local guardrails (may
    /// block before anything is reserved), token limits, then webhook guardrails: they see the
    /// redacted prompt, and a call about to get a 429 costs no webhook round trip (a webhook
    /// refusal drops the reservation hook, which gives the tokens back). Needs a Tokio runtime
    /// when a Redis backend is configured.
    pub async fn build(config: &Config, telemetry: &Arc<Telemetry>) -> Result<Self, PolicyError> {
        Self::build_with_time(config, telemetry, crate::policy::limits::TimeSource::System).await
    }

    /// [`Policies::build`] on an explicit time source for the limits (tests move a manual
    /// clock to assert exact windows and `retry-after` values).
    pub(crate) async fn build_with_time(
        config: &Config,
        telemetry: &Arc<Telemetry>,
        time: crate::policy::limits::TimeSource,
    ) -> Result<Self, PolicyError> {
        let groups = Groups::new(&config.agent_groups)?;
        let mut chain: Vec<Box<dyn Policy>> = Vec::new();
        let mut limiter = None;
        if !config.access.is_empty() {
            chain.push(Box::new(AccessPolicy::new(&config.access)?));
        }
        let guards = GuardPolicy::new(&config.guardrails, telemetry.clone())?;
        if !guards.is_empty() {
            chain.push(Box::new(guards));
        }
        // One engine for token and tool-call limits: one Redis connection, one set of local
        // counters, one backend state.
        if !config.rate_limits.policies.is_empty() || !config.mcp.tool_limits.is_empty() {
            limiter = Some(crate::policy::limits::Limiter::with_time(&config.rate_limits, time).await?);
        }
        if let (false, Some(l)) = (config.rate_limits.policies.is_empty(), &limiter) {
            chain.push(Box::new(RateLimitPolicy::with_limiter(config, l.clone(), telemetry.clone())?));
        }
        if let Some(webhooks) = WebhookPolicy::new(config, telemetry.clone())? {
            chain.push(Box::new(webhooks));
        }
        let mcp_tools = Arc::new(ToolRules::new(&config.mcp)?);
        let mcp_tool_limits = Arc::new(match &limiter {
            Some(l) if !config.mcp.tool_limits.is_empty() => ToolLimits::new(&config.mcp, l.clone())?,
            _ => ToolLimits::default(),
        });
        let a2a_rules = A2aPolicy::new(&config.a2a.rules)?;
        Ok(Policies { chain, groups, limiter, mcp_tools, mcp_tool_limits, a2a_rules })
    }

    /// The generation's MCP tool-call limits: [`ToolLimits::admit`] before a `tools/call` is
    /// sent (the MCP handler and the federation listener share them, and their counters).
    pub fn mcp_tool_limits(&self) -> &Arc<ToolLimits> {
        &self.mcp_tool_limits
    }

    /// The generation's MCP tool rules (shared with the `tools/list` filters of its streams).
    pub fn mcp_tools(&self) -> &Arc<ToolRules> {
        &self.mcp_tools
    }

    /// The generation's A2A hop rules.
    pub fn a2a_rules(&self) -> &A2aPolicy {
        &self.a2a_rules
    }

    /// No policy configured: the request path skips the chain.
    pub fn is_empty(&self) -> bool {
        self.chain.is_empty()
    }

    /// Groups of the agent named `agent` (once per connection).
    pub fn groups_of(&self, agent: &str) -> Arc<[String]> {
        self.groups.of(agent)
    }

    /// The token limiter, when limits are configured (its state is exported as metrics).
    pub fn limiter(&self) -> Option<&crate::policy::limits::Limiter> {
        self.limiter.as_ref()
    }

    /// Run every request hook in order; the first refusal ends the call (and drops the hooks
    /// attached so far, which releases what they hold). Refusals are counted and audited here.
    pub async fn on_request(&self, mut ctx: PolicyCtx<'_>) -> Result<Admitted, (Deny, Vec<PolicyEvent>)> {
        if self.chain.iter().any(|p| p.covers(&ctx)) {
            if let Some(reason) = crate::protocol::llm::api::unreadable_request(ctx.api, &ctx.body) {
                let d = unreadable_body(reason);
                audit_denial(ctx.telemetry, &ctx.agent.name, ctx.route, ctx.model, &d);
                let mut events = ctx.events;
                events.push(denied_event(&d));
                return Err((d, events));
            }
        }
        for p in &self.chain {
            if let Err(d) = p.on_request(&mut ctx).await {
                audit_denial(ctx.telemetry, &ctx.agent.name, ctx.route, ctx.model, &d);
                let mut events = ctx.events;
                events.push(denied_event(&d));
                return Err((d, events));
            }
        }
        Ok(Admitted { body: ctx.body, events: ctx.events, hooks: CallHooks(ctx.hooks) })
    }
}

/// What the chain lets through: the body to send, events so far, the per-call hooks.
pub struct Admitted {
    /// Body to send upstream (rewritten by guards, or the original bytes).
    pub body: Bytes,
    /// Span events of the request phase.
    pub events: Vec<PolicyEvent>,
    /// Response-phase hooks.
    pub hooks: CallHooks,
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted").field("body_len", &self.body.len()).field("hooks", &self.hooks.0.len()).finish()
    }
}

/// The response-phase hooks of one call (empty when no policy attached any).
#[derive(Default)]
pub struct CallHooks(Vec<Box<dyn CallHook>>);

impl CallHooks {
    /// No hook: nothing to do on the response.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Add each hook's headers to the agent's response.
    pub fn response_headers(&mut self, status: StatusCode, headers: &mut HeaderMap) {
        for h in &mut self.0 {
            h.on_response_headers(status, headers);
        }
    }

    /// The first response filter any hook offers.
    pub fn response_filter(&mut self) -> Option<Box<dyn ResponseFilter>> {
        self.0.iter_mut().find_map(|h| h.response_filter())
    }

    /// Every response check the hooks offer (empty when none asks to see the response).
    pub fn response_checks(&mut self) -> Vec<Box<dyn ResponseCheck>> {
        self.0.iter_mut().filter_map(|h| h.response_check()).collect()
    }

    /// Run every hook's finish with the call.
    pub fn finish(self, call: &mut LlmCall) {
        for h in self.0 {
            h.on_finish(call);
        }
    }
}

/// Run `checks` in order over a complete response; the first refusal is counted, audited and
/// returned. Who/what is taken from the call record.
pub async fn check_response(
    checks: &[Box<dyn ResponseCheck>],
    telemetry: &Telemetry,
    call: &mut LlmCall,
    body: &[u8],
) -> Result<(), Deny> {
    for c in checks {
        if let Err(d) = c.check(body).await {
            audit_denial(telemetry, &call.agent.name, &call.route, call.request_model.as_deref(), &d);
            call.policy_events.push(denied_event(&d));
            return Err(d);
        }
    }
    Ok(())
}

/// The span event of a refusal.
fn denied_event(d: &Deny) -> PolicyEvent {
    PolicyEvent {
        name: "tollgate.policy.denied",
        attributes: vec![("tollgate.policy", d.policy.to_string()), ("tollgate.rule", d.rule.clone())],
    }
}

/// Count a refusal and write its audit line (target `audit`).
fn audit_denial(telemetry: &Telemetry, agent: &str, route: &str, model: Option<&str>, d: &Deny) {
    let label = telemetry.metrics.agent_label(agent);
    telemetry.governance.denial(&label, d.policy, &d.rule);
    tracing::info!(
        target: "audit",
        agent = %agent,
        route = route,
        model = model.unwrap_or(""),
        policy = d.policy,
        rule = %d.rule,
        status = d.status.as_u16(),
        "call denied: {}", d.message
    );
}

/// `(name, value)` header pairs into `headers` (invalid ones skipped: they come from our own
/// formatting, never from agents).
pub fn insert_headers(headers: &mut HeaderMap, pairs: &[(String, String)]) {
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            headers.insert(k, v);
        }
    }
}
