//! Webhook guardrails on the request path: an external checker (NeMo Guardrails, a moderation
//! endpoint, a team's own classifier) is asked over HTTP before the prompt is sent (input
//! phase) and before a non-streamed response is handed to the agent (output phase). Rendering
//! and judging are pure ([`crate::policy::guards::WebhookGuard`]); this module makes the call
//! with its deadline, applies the fail mode, and reports every outcome as a verdict metric
//! (`tollgate_guardrail_verdicts_total{kind="webhook_input"|"webhook_output"}`) and a span
//! event.
//!
//! Calls go through tollgate's own marked upstream client, so a webhook on a captured address
//! is never intercepted by tollgate itself. Streamed responses are not held for an output
//! check (the agent would lose streaming); they are counted as `action="unchecked"`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use parking_lot::Mutex;
use serde_json::Value;

use super::{CallHook, CheckFuture, Deny, HookFuture, Policy, PolicyCtx, ResponseCheck};
use crate::config::guards::{GuardConfig, WebhookFailMode, WebhookStreams};
use crate::config::Config;
use crate::policy::guards::{GuardError, Guardrails, Judgement, WebhookGuard, WebhookSubject};
use crate::protocol::errors::ErrorClass;
use crate::protocol::llm::api::Api;
use crate::telemetry::{LlmCall, PolicyEvent, Telemetry};
use crate::upstream::{error_chain, Upstream, UpstreamError};

/// Largest webhook answer read; a verdict is a few bytes, so more is a misconfigured endpoint.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why the webhook policy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WebhookPolicyError {
    /// A guard's config (already checked at load, so only on a race with a reload).
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// The HTTP client (TLS roots).
    #[error("webhook client: {0}")]
    Client(#[from] UpstreamError),
}

/// The webhook guards of one generation and the client that asks them.
pub struct WebhookPolicy {
    input: Vec<Arc<WebhookGuard>>,
    output: Vec<Arc<WebhookGuard>>,
    client: Arc<Upstream>,
    telemetry: Arc<Telemetry>,
}

impl WebhookPolicy {
    /// The policy for the `kind: webhook` guards of `config`, or `None` when there are none.
    pub fn new(config: &Config, telemetry: Arc<Telemetry>) -> Result<Option<Self>, WebhookPolicyError> {
        if !config.guardrails.iter().any(|g| matches!(g, GuardConfig::Webhook(_))) {
            return Ok(None);
        }
        let all = Guardrails::webhooks(&config.guardrails)?;
        let input = all.iter().filter(|g| g.phase.input()).cloned().collect();
        let output = all.iter().filter(|g| g.phase.output()).cloned().collect();
        let client = Arc::new(Upstream::new(config)?);
        Ok(Some(WebhookPolicy { input, output, client, telemetry }))
    }

    async fn check(&self, ctx: &mut PolicyCtx<'_>) -> Result<(), Deny> {
        let subject = Subject {
            agent: ctx.agent.name.to_string(),
            namespace: ctx.namespace().map(str::to_string),
            route: ctx.route.to_string(),
            model: ctx.model.map(str::to_string),
        };
        let label = self.telemetry.metrics.agent_label(&ctx.agent.name);
        if produces_text(ctx.api) {
            let refusing = self.output.iter().find(|g| g.streams == WebhookStreams::Refuse);
            if let Some(g) = refusing.filter(|_| is_streaming(ctx.api, &ctx.body)) {
                let why = "a streamed response cannot be held for the output check";
                ctx.events.push(event(&self.telemetry, &label, &g.name, "block", "output", Some(why.into())));
                return Err(Deny {
                    policy: "guardrail",
                    rule: g.name.to_string(),
                    status: StatusCode::BAD_REQUEST,
                    class: ErrorClass::InvalidRequest,
                    code: "guardrail_blocked",
                    message: format!(
                        "guardrail {:?} checks responses and {why}: ask for a non-streamed response",
                        &*g.name
                    ),
                    headers: Vec::new(),
                });
            }
        }
        if !self.input.is_empty() {
            // A body that is not JSON is forwarded: the provider answers it with its own 400.
            if let Ok(body) = serde_json::from_slice::<Value>(&ctx.body) {
                for g in &self.input {
                    let payload = g.render_request(&subject.view(), ctx.api, &body);
                    let answer = ask(&self.client, g, payload).await;
                    let (event, verdict) = outcome(&self.telemetry, &label, g, "input", answer);
                    ctx.events.push(event);
                    verdict?;
                }
            }
        }
        if !self.output.is_empty() && produces_text(ctx.api) {
            let sink = Arc::new(Mutex::new(Vec::new()));
            let check = OutputCheck {
                guards: self.output.clone(),
                client: self.client.clone(),
                telemetry: self.telemetry.clone(),
                label,
                subject,
                api: ctx.api,
                sink: sink.clone(),
            };
            ctx.attach(Box::new(OutputHook { check: Some(check), sink }));
        }
        Ok(())
    }
}

impl Policy for WebhookPolicy {
    fn name(&self) -> &'static str {
        "guardrail"
    }

    fn covers(&self, _ctx: &PolicyCtx<'_>) -> bool {
        !self.input.is_empty()
    }

    fn on_request<'a>(&'a self, ctx: &'a mut PolicyCtx<'_>) -> HookFuture<'a> {
        Box::pin(self.check(ctx))
    }
}

/// Whether the call asks for a streamed response (`stream: true`, or Gemini's streaming
/// operation); a body that does not parse is not (the provider refuses it anyway).
fn is_streaming(api: Api, body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Flag {
        #[serde(default)]
        stream: bool,
    }
    api == Api::GeminiStreamGenerate || serde_json::from_slice::<Flag>(body).is_ok_and(|f| f.stream)
}

/// Operations whose responses carry model text for an output check (embeddings and token
/// counts carry none: holding them would only cost time and memory).
fn produces_text(api: Api) -> bool {
    matches!(
        api,
        Api::OpenAiChat
            | Api::OpenAiCompletions
            | Api::OpenAiResponses
            | Api::AnthropicMessages
            | Api::GeminiGenerate
            | Api::GeminiStreamGenerate
    )
}

/// Owned copy of the template's subject (the output check outlives the request context).
struct Subject {
    agent: String,
    namespace: Option<String>,
    route: String,
    model: Option<String>,
}

impl Subject {
    fn view(&self) -> WebhookSubject<'_> {
        WebhookSubject {
            agent: &self.agent,
            namespace: self.namespace.as_deref(),
            route: &self.route,
            model: self.model.as_deref(),
        }
    }
}

/// POST `payload` to the guard's endpoint and read its verdict, all within its timeout.
async fn ask(client: &Upstream, g: &WebhookGuard, payload: Vec<u8>) -> Result<Judgement, String> {
    let mut req = Request::new(Either::Right(Full::new(Bytes::from(payload))));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = g.uri.clone();
    let headers = req.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in &g.headers {
        headers.insert(k.clone(), v.clone());
    }
    let call = async {
        let resp = client.send(req).await.map_err(|e| error_chain(&e))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("webhook answer unreadable: {e}"))?
            .to_bytes();
        g.judge(status, &body)
    };
    match tokio::time::timeout(g.timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(g.timeout))),
    }
}

/// Count the outcome, describe it as a span event, and turn it into the policy's decision.
fn outcome(
    t: &Telemetry,
    agent: &str,
    g: &WebhookGuard,
    phase: &'static str,
    answer: Result<Judgement, String>,
) -> (PolicyEvent, Result<(), Deny>) {
    let what = if phase == "input" { "request" } else { "response" };
    let (action, detail, decision) = match answer {
        Ok(Judgement::Allow) => ("allow", None, Ok(())),
        Ok(Judgement::Block(reason)) => {
            let why = reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            let deny = Deny {
                policy: "guardrail",
                rule: g.name.to_string(),
                status: StatusCode::BAD_REQUEST,
                class: ErrorClass::InvalidRequest,
                code: "guardrail_blocked",
                message: format!("{what} blocked by guardrail {:?} (webhook{why})", &*g.name),
                headers: Vec::new(),
            };
            ("block", reason, Err(deny))
        }
        Err(e) if g.on_error == WebhookFailMode::FailOpen => {
            tracing::warn!(guard = %g.name, error = %e, "guardrail webhook failed; call let through (fail_open)");
            ("fail_open", Some(e), Ok(()))
        }
        Err(e) => {
            tracing::warn!(guard = %g.name, error = %e, "guardrail webhook failed; call refused (fail_closed)");
            let deny = Deny {
                policy: "guardrail",
                rule: g.name.to_string(),
                status: StatusCode::SERVICE_UNAVAILABLE,
                class: ErrorClass::Unavailable,
                code: "guardrail_unavailable",
                // The cause (addresses, TLS details) stays in the log and the span event.
                message: format!("guardrail {:?} is unavailable and could not check the {what}", &*g.name),
                headers: Vec::new(),
            };
            ("fail_closed", Some(e), Err(deny))
        }
    };
    (event(t, agent, &g.name, action, phase, detail), decision)
}

/// One verdict: the metric increment and its span event.
fn event(
    t: &Telemetry,
    agent: &str,
    guard: &str,
    action: &'static str,
    phase: &'static str,
    detail: Option<String>,
) -> PolicyEvent {
    let kind = if phase == "input" { "webhook_input" } else { "webhook_output" };
    t.governance.verdict(agent, guard, action, kind, 1);
    let mut attributes = vec![
        ("tollgate.guard", guard.to_string()),
        ("tollgate.guard.action", action.to_string()),
        ("tollgate.guard.kind", kind.to_string()),
        ("tollgate.guard.count", "1".to_string()),
        ("tollgate.guard.phase", if phase == "input" { "request" } else { "response" }.to_string()),
    ];
    if let Some(d) = detail {
        attributes.push(("tollgate.guard.detail", d));
    }
    PolicyEvent { name: "tollgate.guardrail", attributes }
}

/// Output-phase state of one call: the check (taken by the response path for a complete,
/// successful, non-streamed response) and the span events it produced.
struct OutputHook {
    check: Option<OutputCheck>,
    sink: Arc<Mutex<Vec<PolicyEvent>>>,
}

impl CallHook for OutputHook {
    fn response_check(&mut self) -> Option<Box<dyn ResponseCheck>> {
        self.check.take().map(|c| Box::new(c) as Box<dyn ResponseCheck>)
    }

    fn on_finish(self: Box<Self>, call: &mut LlmCall) {
        let mut events = std::mem::take(&mut *self.sink.lock());
        if let Some(c) = self.check {
            // Not taken: a streamed (or failed) response, which is passed through unheld.
            if (200..300).contains(&call.status) {
                for g in &c.guards {
                    events.push(event(&c.telemetry, &c.label, &g.name, "unchecked", "output", None));
                }
            }
        }
        call.policy_events.append(&mut events);
    }
}

/// Asks the output-phase webhooks about one complete response.
struct OutputCheck {
    guards: Vec<Arc<WebhookGuard>>,
    client: Arc<Upstream>,
    telemetry: Arc<Telemetry>,
    label: Arc<str>,
    subject: Subject,
    api: Api,
    sink: Arc<Mutex<Vec<PolicyEvent>>>,
}

impl ResponseCheck for OutputCheck {
    fn check<'a>(&'a self, body: &'a [u8]) -> CheckFuture<'a> {
        Box::pin(async move {
            // Not JSON (an odd provider): nothing the webhook could read; passed as is.
            let Ok(v) = serde_json::from_slice::<Value>(body) else { return Ok(()) };
            if !WebhookGuard::response_has_text(self.api, &v) {
                return Ok(());
            }
            for g in &self.guards {
                let payload = g.render_response(&self.subject.view(), self.api, &v);
                let answer = ask(&self.client, g, payload).await;
                let (ev, decision) = outcome(&self.telemetry, &self.label, g, "output", answer);
                self.sink.lock().push(ev);
                decision?;
            }
            Ok(())
        })
    }
}
