//! Token limits on the request path: before forwarding, the call's prompt tokens (counted
//! locally) plus its completion cap are reserved in every matching limit
//! ([`Limiter::check_and_reserve`]); a refusal is a 429 with `Retry-After`. An admitted call
//! carries `x-ratelimit-*` headers and settles its reservation with the exact usage when the
//! response ends; a call that fails without usage releases it. Either way the headroom of
//! every matching limit is exported per agent ([`headroom`]), so dashboards and `tollgate top`
//! show how close an agent is to being refused.

use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use super::{insert_headers, CallHook, Deny, HookFuture, Policy, PolicyCtx};
use crate::config::Config;
use crate::policy::limits::{
    rate_limit_headers, Decision, Estimate, LimitError, LimitStatus, LimitSubject, Limiter, RejectReason, Rejection,
    Reservation, Usage,
};
use crate::protocol::errors::ErrorClass;
use crate::protocol::llm::api::Api;
use crate::protocol::llm::estimate;
use crate::telemetry::cost::{CostError, PriceTable};
use crate::telemetry::{LlmCall, Telemetry};

/// Completion tokens reserved when neither the request nor the config names a cap.
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Why the token-limit policy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// The limiter (rules, Redis URL).
    #[error("rate_limits: {0}")]
    Limiter(#[from] LimitError),
    /// The price table cost limits use.
    #[error(transparent)]
    Pricing(#[from] CostError),
}

/// The token-limit policy of one generation.
pub struct RateLimitPolicy {
    limiter: Limiter,
    prices: Arc<PriceTable>,
    default_max_tokens: u64,
    telemetry: Arc<Telemetry>,
}

impl RateLimitPolicy {
    /// A limiter for `config.rate_limits`, costs priced by `config.pricing`.
    pub async fn new(config: &Config, telemetry: Arc<Telemetry>) -> Result<Self, RateLimitError> {
        Self::with_limiter(config, Limiter::new(&config.rate_limits).await?, telemetry)
    }

    /// The policy on an engine built for `config.rate_limits` by the caller, which shares it
    /// with MCP tool-call limits (one backend, one Redis connection).
    pub fn with_limiter(config: &Config, limiter: Limiter, telemetry: Arc<Telemetry>) -> Result<Self, RateLimitError> {
        Ok(RateLimitPolicy {
            limiter,
            prices: Arc::new(PriceTable::new(&config.pricing)?),
            default_max_tokens: config.rate_limits.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            telemetry,
        })
    }

    /// The engine (its state is exported as metrics).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// `prompt` as counted off the async workers ([`estimate::prompt_tokens_off_runtime`]).
    fn estimate(&self, ctx: &PolicyCtx<'_>, prompt: Option<u64>) -> Estimate {
        let body = &ctx.body;
        let prompt = prompt.unwrap_or(body.len() as u64 / 4);
        let completion = completion_cap(ctx.api, body).unwrap_or(self.default_max_tokens);
        let cost = self.prices.price(None, ctx.model).map_or(0.0, |p| {
            let u = crate::telemetry::Usage { input: prompt, output: completion, ..Default::default() };
            p.cost_usd(&u)
        });
        Estimate { prompt_tokens: prompt, max_completion_tokens: completion, cost_usd: cost }
    }

    fn refuse(&self, ctx: &PolicyCtx<'_>, r: Rejection) -> Deny {
        let count = r.status.iter().find(|s| s.rule == r.rule).map_or("unknown", |s| s.count.as_str());
        let policy = r.rule.split('/').next().unwrap_or(&r.rule);
        let agent = self.telemetry.metrics.agent_label(&ctx.agent.name);
        self.telemetry.governance.rate_rejection(&agent, policy, count);
        // A request too large for a limit is refused before the counters are read: its status
        // shows whole limits, not headroom.
        if r.reason == RejectReason::LimitExceeded {
            self.report_headroom(&agent, &r.status);
        }
        let (status, class, code, message) = match r.reason {
            RejectReason::LimitExceeded => (
                StatusCode::TOO_MANY_REQUESTS,
                ErrorClass::RateLimit,
                "rate_limit_exceeded",
                format!("token limit {} reached; retry after {} ms", r.rule, r.retry_after.as_millis()),
            ),
            RejectReason::TooLarge => (
                StatusCode::BAD_REQUEST,
                ErrorClass::InvalidRequest,
                "request_exceeds_limit",
                format!("the request alone exceeds token limit {} (lower max_tokens or the prompt)", r.rule),
            ),
            RejectReason::BackendDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorClass::Unavailable,
                "rate_limit_unavailable",
                "token limits cannot be checked (Redis unreachable, on_redis_error: fail_closed)".to_string(),
            ),
        };
        let headers = if r.reason == RejectReason::TooLarge { rate_limit_headers(&r.status) } else { r.headers() };
        Deny { policy: "rate_limit", rule: r.rule.to_string(), status, class, code, message, headers }
    }

    /// Export the headroom the decision saw, per limit policy and count kind.
    fn report_headroom(&self, agent: &str, status: &[LimitStatus]) {
        for (policy, count, ratio) in headroom(status) {
            self.telemetry.governance.remaining(agent, policy, count, ratio);
        }
    }
}

/// `(policy, count, remaining / limit)` per limit policy and count kind of `status`, the
/// tightest limit winning when a policy has several windows for one kind: that is the one that
/// will refuse first. A zero limit has no headroom.
pub(crate) fn headroom(status: &[LimitStatus]) -> Vec<(&str, &'static str, f64)> {
    let mut out: Vec<(&str, &'static str, f64)> = Vec::new();
    for s in status {
        let policy = s.rule.split('/').next().unwrap_or(&s.rule);
        let ratio = if s.limit == 0 { 0.0 } else { (s.remaining as f64 / s.limit as f64).clamp(0.0, 1.0) };
        let count = s.count.as_str();
        match out.iter_mut().find(|(p, c, _)| *p == policy && *c == count) {
            Some(entry) => entry.2 = entry.2.min(ratio),
            None => out.push((policy, count, ratio)),
        }
    }
    out
}

/// Who and what a call is, as the limit rules match it.
fn subject<'a>(ctx: &'a PolicyCtx<'_>) -> LimitSubject<'a> {
    LimitSubject {
        agent: &ctx.agent.name,
        groups: ctx.groups,
        namespace: ctx.namespace(),
        provider: ctx.provider,
        model: ctx.model.unwrap_or(""),
        route: ctx.route,
    }
}

impl Policy for RateLimitPolicy {
    fn name(&self) -> &'static str {
        "rate_limit"
    }

    fn covers(&self, ctx: &PolicyCtx<'_>) -> bool {
        self.limiter.applies_to_any_model(&subject(ctx))
    }

    fn on_request<'a>(&'a self, ctx: &'a mut PolicyCtx<'_>) -> HookFuture<'a> {
        Box::pin(async move {
            let subject = subject(ctx);
            if !self.limiter.applies(&subject) {
                return Ok(());
            }
            let prompt = estimate::prompt_tokens_off_runtime(ctx.api, ctx.body.clone()).await;
            let est = self.estimate(ctx, prompt);
            match self.limiter.check_and_reserve(&subject, est).await {
                Decision::Admit(a) => {
                    if !a.status.is_empty() {
                        let agent = self.telemetry.metrics.agent_label(&ctx.agent.name);
                        self.report_headroom(&agent, &a.status);
                    }
                    if !a.reservation.is_empty() {
                        ctx.attach(Box::new(LimitHook {
                            limiter: self.limiter.clone(),
                            reservation: Some(a.reservation),
                            headers: rate_limit_headers(&a.status),
                            prices: self.prices.clone(),
                            estimate: est,
                        }));
                    }
                    Ok(())
                }
                Decision::Reject(r) => Err(self.refuse(ctx, r)),
            }
        })
    }
}

/// One admitted call's reservation, settled when the call ends (released if dropped first).
struct LimitHook {
    limiter: Limiter,
    reservation: Option<Reservation>,
    headers: Vec<(String, String)>,
    prices: Arc<PriceTable>,
    estimate: Estimate,
}

impl CallHook for LimitHook {
    fn on_response_headers(&mut self, _status: StatusCode, headers: &mut HeaderMap) {
        insert_headers(headers, &self.headers);
    }

    fn on_finish(mut self: Box<Self>, call: &mut LlmCall) {
        let Some(res) = self.reservation.take() else { return };
        let usage = match (&call.usage, call.status) {
            (Some(u), _) => {
                let price = self.prices.price(call.response_model.as_deref(), call.request_model.as_deref());
                Usage {
                    prompt_tokens: u.input,
                    completion_tokens: u.output,
                    cost_usd: price.map_or(0.0, |p| p.cost_usd(u)),
                }
            }
            // A successful call whose usage could not even be estimated (stream cut, client
            // gone): keep what was reserved, so closing early never gives tokens back.
            (None, 200..=299) => Usage {
                prompt_tokens: self.estimate.prompt_tokens,
                completion_tokens: self.estimate.max_completion_tokens,
                cost_usd: self.estimate.cost_usd,
            },
            // Failed without usage: nothing was consumed; dropping the reservation releases it.
            (None, _) => return drop(res),
        };
        let limiter = self.limiter.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { limiter.settle(res, usage).await });
            }
            Err(_) => drop(res),
        }
    }
}

/// The completion cap a request names, whatever its API calls it.
fn completion_cap(api: Api, body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct GenConfig {
        #[serde(rename = "maxOutputTokens")]
        max_output_tokens: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Caps {
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        max_output_tokens: Option<u64>,
        #[serde(rename = "generationConfig")]
        generation_config: Option<GenConfig>,
    }
    if matches!(api, Api::OpenAiEmbeddings | Api::AnthropicCountTokens | Api::GeminiCountTokens | Api::GeminiEmbed) {
        return Some(0);
    }
    let c: Caps = serde_json::from_slice(body).ok()?;
    c.max_completion_tokens
        .or(c.max_tokens)
        .or(c.max_output_tokens)
        .or(c.generation_config.and_then(|g| g.max_output_tokens))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::capture::Agent;
    use crate::config::limits::CountKind;
    use crate::config::{self, TelemetryConfig};

    fn status(rule: &str, count: CountKind, limit: u64, remaining: u64) -> LimitStatus {
        LimitStatus { rule: Arc::from(rule), count, limit, remaining, reset_after: std::time::Duration::from_secs(1) }
    }

    #[test]
    fn headroom_is_the_tightest_limit_per_policy_and_count() {
        let s = [
            status("p/total:1m", CountKind::Total, 1000, 900),
            status("p/total:1d", CountKind::Total, 10_000, 2_500),
            status("p/requests:1m", CountKind::Requests, 10, 10),
            status("q/total:1m", CountKind::Total, 0, 0),
        ];
        assert_eq!(headroom(&s), vec![("p", "total", 0.25), ("p", "requests", 1.0), ("q", "total", 0.0)]);
    }

    /// One call of `agent` with `max_tokens` through `policy`: its status on refusal, and the
    /// hooks (holding the reservation) on admission.
    async fn call(
        policy: &RateLimitPolicy,
        t: &Telemetry,
        max_tokens: u64,
    ) -> (Result<(), StatusCode>, Vec<Box<dyn CallHook>>) {
        let agent = Agent::unknown("a");
        let body = serde_json::json!({"model": "m", "max_tokens": max_tokens, "messages": []}).to_string();
        let mut ctx = PolicyCtx {
            agent: &agent,
            groups: &[],
            route: "chat",
            provider: "openai",
            api: Api::OpenAiChat,
            model: Some("m"),
            body: Bytes::from(body),
            events: Vec::new(),
            telemetry: t,
            hooks: Vec::new(),
        };
        let r = policy.on_request(&mut ctx).await.map_err(|d| d.status);
        (r, ctx.hooks)
    }

    #[tokio::test]
    async fn admitted_and_refused_calls_set_the_remaining_ratio() {
        let yaml = "rate_limits: {policies: [{name: p, limits: [{limit: 100, window: 1h, count: completion}]}]}";
        let cfg = config::from_str("t.yaml", yaml).expect("config");
        let t = Arc::new(Telemetry::new(&TelemetryConfig { access_log: "off".into(), ..Default::default() }).unwrap());
        let policy = RateLimitPolicy::new(&cfg, t.clone()).await.expect("policy");
        let gauge = r#"tollgate_ratelimit_remaining_ratio{agent="a",count="completion",policy="p"}"#;
        // The reservation stays held (hooks alive) while the later calls are checked.
        let (r, _held) = call(&policy, &t, 40).await;
        assert!(r.is_ok());
        let text = t.metrics.encode();
        assert!(text.contains(&format!("{gauge} 0.6\n")), "{text}");
        let (r, _) = call(&policy, &t, 70).await;
        assert_eq!(r.err(), Some(StatusCode::TOO_MANY_REQUESTS));
        assert!(t.metrics.encode().contains(&format!("{gauge} 0.6\n")), "a refusal reports the same headroom");
        let (r, _) = call(&policy, &t, 500).await;
        assert_eq!(r.err(), Some(StatusCode::BAD_REQUEST));
        assert!(t.metrics.encode().contains(&format!("{gauge} 0.6\n")), "too large: counters not read, gauge kept");
    }
}
