//! Token-limit engine: per-agent (group, namespace, global) limits on tokens, requests and
//! USD cost over sliding or fixed windows, with counters on this node ([`LocalBackend`]) or in
//! a Redis shared by all nodes ([`RedisBackend`]). Modelled on Kong's
//! ai-rate-limiting-advanced; config in [`crate::config::limits`].
//!
//! The request path uses it in two steps, because token usage is only known after the call:
//!
//! 1. Before forwarding, [`Limiter::check_and_reserve`] with the call's identity
//!    ([`LimitSubject`]) and an [`Estimate`] (prompt tokens, `max_tokens`, cost estimate).
//!    Every matching limit must have room for the estimate; then the estimate is reserved in
//!    all of them at once ([`Decision::Admit`]), else nothing is ([`Decision::Reject`], with
//!    `retry_after` and the rule that refused).
//! 2. After the response, [`Limiter::settle`] replaces the reserved estimate with the exact
//!    [`Usage`] (more or less than reserved). A call that never completes (client gone) calls
//!    [`Limiter::release`]; a [`Reservation`] dropped without either releases itself (for the
//!    Redis backend on a spawned task, so drop it inside the Tokio runtime).
//!
//! [`rate_limit_headers`] and [`Rejection::headers`] render the OpenAI-style
//! `x-ratelimit-*` and `retry-after` headers. [`Limiter::backend_state`] and
//! [`Limiter::stats`] are what the caller exports as metrics. See `rules` for the sliding
//! window's accuracy.

mod local;
mod redis_backend;
mod rules;
#[cfg(test)]
mod tests;

pub use local::LocalBackend;
pub use redis_backend::RedisBackend;
pub use rules::TimeSource;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::config::limits::{CountKind, LimitBackend, LimitRuleConfig, OnRedisError, TokenLimitsConfig};
use rules::{actual_amount, fits, retry_after_ms, status, Counts, Rules, Slot};

/// Why the engine could not be built or a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The config is unusable (field path and reason).
    #[error("{field}: {message}")]
    Config {
        /// Field path, e.g. `policies[0].limits[1].window`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Redis refused, the connection failed, or the reply was not what the script returns.
    #[error("redis: {0}")]
    Redis(String),
    /// Redis did not answer within the configured timeout.
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
}

/// Who is calling what: the fields policies match on and count by.
#[derive(Debug, Clone, Copy)]
pub struct LimitSubject<'a> {
    /// Agent name (the default counter key).
    pub agent: &'a str,
    /// The agent's groups.
    pub groups: &'a [String],
    /// Kubernetes namespace of the agent, if any.
    pub namespace: Option<&'a str>,
    /// Provider the call goes to.
    pub provider: &'a str,
    /// Requested model.
    pub model: &'a str,
    /// Route name.
    pub route: &'a str,
}

/// What a call may use, known before forwarding; reserved until the call settles.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimate {
    /// Prompt tokens (counted locally from the request body).
    pub prompt_tokens: u64,
    /// The request's max completion tokens (or the route's default cap).
    pub max_completion_tokens: u64,
    /// Worst-case cost in USD.
    pub cost_usd: f64,
}

/// What a call used, from the provider's response.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cost in USD.
    pub cost_usd: f64,
}

/// Headroom of one limit after a decision, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    /// Rule name, `policy/count:window`.
    pub rule: Arc<str>,
    /// What the limit counts.
    pub count: CountKind,
    /// The limit, in tokens, requests or micro-dollars.
    pub limit: u64,
    /// What is left of it now, same unit.
    pub remaining: u64,
    /// Time until all usage counted now has left the window.
    pub reset_after: Duration,
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// A limit has no room for the estimate now; retrying after `retry_after` may succeed.
    LimitExceeded,
    /// The estimate alone exceeds a limit: retrying cannot succeed (map to 400/413, or lower
    /// `max_tokens`).
    TooLarge,
    /// `on_redis_error: fail_closed` and Redis is unreachable (map to 503).
    BackendDown,
}

/// A refused call.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// The rule that refused (the one freeing last), or `redis` for [`RejectReason::BackendDown`].
    pub rule: Arc<str>,
    /// Why.
    pub reason: RejectReason,
    /// When enough room will be free if nobody else uses it (whole window for `TooLarge`).
    pub retry_after: Duration,
    /// Headroom of every matching limit (empty for `BackendDown`).
    pub status: Vec<LimitStatus>,
}

impl Rejection {
    /// `Retry-After` in whole seconds, rounded up and at least 1: the OpenAI and Anthropic
    /// SDKs parse an integer and treat 0 as "retry now".
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_millis().div_ceil(1000).max(1) as u64
    }

    /// `retry-after`, `retry-after-ms` and the `x-ratelimit-*` headers of the response.
    pub fn headers(&self) -> Vec<(String, String)> {
        let ms = (self.retry_after.as_millis() as u64).max(1);
        let mut h = vec![
            ("retry-after".into(), self.retry_after_secs().to_string()),
            ("retry-after-ms".into(), ms.to_string()),
        ];
        h.extend(rate_limit_headers(&self.status));
        h
    }
}

/// The outcome of [`Limiter::check_and_reserve`].
#[derive(Debug)]
pub enum Decision {
    /// Forward the call; settle or release the reservation when done.
    Admit(Admission),
    /// Answer 429 (or 503 for [`RejectReason::BackendDown`]) without forwarding.
    Reject(Rejection),
}

/// An admitted call.
#[derive(Debug)]
pub struct Admission {
    /// The reserved estimate, to settle with the actual usage.
    pub reservation: Reservation,
    /// Headroom of every matching limit after the reservation.
    pub status: Vec<LimitStatus>,
}

/// Which store decides right now; exported as a gauge so an outage is visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// Shared counters in Redis (or the local backend, which is never degraded).
    Redis,
    /// Redis is unreachable and `fail_open`: this node's local counters decide.
    LocalFallback,
    /// Redis is unreachable and `fail_closed`: limited calls are refused.
    Down,
}

/// Counters of the engine, as atomics the caller exports as metrics.
#[derive(Debug, Default)]
pub struct LimiterStats {
    /// Calls admitted.
    pub admitted: AtomicU64,
    /// Calls refused for a limit (`LimitExceeded` or `TooLarge`).
    pub rejected: AtomicU64,
    /// Calls refused because Redis was down under `fail_closed`.
    pub rejected_backend_down: AtomicU64,
    /// Redis calls that failed or timed out.
    pub redis_errors: AtomicU64,
    /// Transitions from Redis to fallback/down (outages).
    pub redis_outages: AtomicU64,
    /// Decisions made by local counters because Redis was unreachable.
    pub fallback_decisions: AtomicU64,
    /// Settles or releases that could not reach the store their reservation is in.
    pub lost_settles: AtomicU64,
    /// Reservations settled with a call's actual usage (settling runs after the response, off
    /// the request's task: tests wait on this instead of sleeping).
    pub settled: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Local,
    Redis,
}

#[derive(Debug)]
struct Held {
    store: Store,
    /// Counter key, bucket, count kind and reserved amount per limit.
    slots: Vec<(String, u64, CountKind, u64)>,
}

/// Estimate held in the limits of an admitted call until [`Limiter::settle`] or
/// [`Limiter::release`]; dropping it releases it (see the module docs).
#[derive(Debug)]
pub struct Reservation {
    held: Option<Held>,
    owner: Weak<Inner>,
}

impl Reservation {
    /// Whether the call touched no limit (nothing to settle).
    pub fn is_empty(&self) -> bool {
        self.held.as_ref().is_none_or(|h| h.slots.is_empty())
    }

    /// Makes the reserved amount final without a settle: for limits counting calls
    /// ([`Limiter::check_calls`]), where a call counts once however it ends.
    pub fn keep(mut self) {
        self.held = None;
    }
}

/// A limit that a feature matches itself and counts through [`Limiter::check_calls`] (MCP
/// tool-call limits), on the same counters and backend as the token policies. Compiled once
/// per config generation.
#[derive(Debug, Clone)]
pub struct CallLimit {
    rule: Arc<rules::CompiledRule>,
    /// Counter name before the `|who` part: `{feature}:{name}/{count}:{window}`, so features
    /// and token policies never share a counter and a changed window starts afresh.
    key_base: String,
}

impl CallLimit {
    /// The limit `cfg` of `feature` (e.g. `mcp-tools`), named `name` in rejections; validated
    /// like a token policy's limit (the error names the field below the limit).
    pub fn new(feature: &str, name: &str, cfg: &LimitRuleConfig) -> Result<Self, LimitError> {
        cfg.validate().map_err(|(field, message)| LimitError::Config { field, message })?;
        let rule = Arc::new(rules::compile_named(name.to_string(), cfg));
        let key_base = format!("{feature}:{name}/{}:{}", cfg.count.as_str(), cfg.window);
        Ok(CallLimit { rule, key_base })
    }

    /// The name rejections carry.
    pub fn name(&self) -> &str {
        &self.rule.name
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let (Some(held), Some(inner)) = (self.held.take(), self.owner.upgrade()) else { return };
        if held.slots.is_empty() {
            return;
        }
        match held.store {
            Store::Local => inner.adjust_local(&held, None),
            Store::Redis => match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { inner.adjust_redis(&held, None).await });
                }
                Err(_) => inc(&inner.stats.lost_settles),
            },
        }
    }
}

#[derive(Debug)]
struct Inner {
    rules: Rules,
    time: TimeSource,
    local: LocalBackend,
    redis: Option<RedisBackend>,
    prefix: String,
    stats: LimiterStats,
}

/// The engine: compiled policies plus a counter store. Cheap to share (`Arc` inside); one per
/// config generation.
#[derive(Debug, Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl Limiter {
    /// An engine for `cfg` on the system clock. With `backend: redis` this spawns the recovery
    /// probe, so it must run inside a Tokio runtime; Redis need not be up yet.
    pub async fn new(cfg: &TokenLimitsConfig) -> Result<Self, LimitError> {
        Self::with_time(cfg, TimeSource::System).await
    }

    /// An engine on an explicit time source (tests pin the calendar and move a manual clock).
    pub async fn with_time(cfg: &TokenLimitsConfig, time: TimeSource) -> Result<Self, LimitError> {
        let rules = Rules::compile(cfg)?;
        let redis = match cfg.backend {
            LimitBackend::Local => None,
            LimitBackend::Redis => Some(RedisBackend::new(&cfg.redis)?),
        };
        let prefix = redis.as_ref().map(|r| r.prefix.clone()).unwrap_or_default();
        let inner = Arc::new(Inner {
            rules,
            time,
            local: LocalBackend::new(cfg.local.max_keys, cfg.local.shards),
            redis,
            prefix,
            stats: LimiterStats::default(),
        });
        if let Some(r) = &inner.redis {
            if let Err(e) = r.ping().await {
                inner.redis_failed(&e);
            }
            tokio::spawn(probe(Arc::downgrade(&inner), r.probe_interval));
        }
        Ok(Self { inner })
    }

    /// Whether some limit covers `subject`: callers skip estimating tokens (the tokenizer is
    /// the main per-call cost of limits) for calls no policy limits.
    pub fn applies(&self, subject: &LimitSubject<'_>) -> bool {
        self.inner.rules.any_match(subject)
    }

    /// Whether any limit would cover `subject` whatever model it names.
    pub fn applies_to_any_model(&self, subject: &LimitSubject<'_>) -> bool {
        self.inner.rules.any_match_any_model(subject)
    }

    /// Checks every limit matching `subject` for room for `est` and reserves it in all of them,
    /// or in none. A call no policy matches is admitted with an empty reservation.
    pub async fn check_and_reserve(&self, subject: &LimitSubject<'_>, est: Estimate) -> Decision {
        let now = self.inner.time.now_ms();
        let slots = self.inner.rules.slots(&self.inner.prefix, subject, &est, now);
        self.reserve_slots(&slots, now).await
    }

    /// Counts one call in each of `hits` (a [`CallLimit`] and whose counter of it, e.g.
    /// `a=agent`), all of them or none, with the token policies' backend and `on_redis_error`
    /// behaviour. Features that match their own calls (MCP tool-call limits) use this so a
    /// fleet shares their budgets like it shares token budgets. Keep the admission's
    /// reservation with [`Reservation::keep`]; dropping it gives the calls back.
    pub async fn check_calls(&self, hits: &[(&CallLimit, String)]) -> Decision {
        let now = self.inner.time.now_ms();
        let prefix = &self.inner.prefix;
        let slots: Vec<Slot> =
            hits.iter().map(|(l, who)| Slot::new(&l.rule, format!("{prefix}{}|{who}", l.key_base), 1, now)).collect();
        self.reserve_slots(&slots, now).await
    }

    async fn reserve_slots(&self, slots: &[Slot], now: u64) -> Decision {
        let inner = &self.inner;
        if slots.is_empty() {
            return self.admit(Store::Local, slots, Vec::new());
        }
        if let Some(too_large) = slots.iter().find(|s| s.amount > s.limit) {
            let counts = vec![Counts::default(); slots.len()];
            let retry = too_large.geom.end_ms.saturating_sub(now);
            inc(&inner.stats.rejected);
            return Decision::Reject(Rejection {
                rule: too_large.rule.name.clone(),
                reason: RejectReason::TooLarge,
                retry_after: Duration::from_millis(retry),
                status: self.statuses(slots, &counts, now),
            });
        }
        let (store, (admitted, counts)) = match &inner.redis {
            None => (Store::Local, inner.local.reserve(slots, now)),
            Some(r) => {
                let mut state = r.state();
                if state == BackendState::Redis {
                    match r.reserve(slots, now).await {
                        Ok(res) => return self.decide(Store::Redis, slots, res, now),
                        Err(e) => state = inner.redis_failed(&e),
                    }
                }
                if state == BackendState::Down {
                    inc(&inner.stats.rejected_backend_down);
                    return Decision::Reject(Rejection {
                        rule: Arc::from("redis"),
                        reason: RejectReason::BackendDown,
                        retry_after: r.probe_interval,
                        status: Vec::new(),
                    });
                }
                inc(&inner.stats.fallback_decisions);
                (Store::Local, inner.local.reserve(slots, now))
            }
        };
        self.decide(store, slots, (admitted, counts), now)
    }

    /// Replaces the reservation's estimate with `actual` in every limit it holds (the bucket it
    /// was reserved in; if that bucket has left the window, nothing changes).
    pub async fn settle(&self, mut reservation: Reservation, actual: Usage) {
        if let Some(held) = reservation.held.take() {
            self.inner.adjust(&held, Some(&actual)).await;
            inc(&self.inner.stats.settled);
        }
    }

    /// Gives the reservation's estimate back (the call was never completed).
    pub async fn release(&self, mut reservation: Reservation) {
        if let Some(held) = reservation.held.take() {
            self.inner.adjust(&held, None).await;
        }
    }

    /// Which store decides right now (always `Redis` for the local backend: never degraded).
    pub fn backend_state(&self) -> BackendState {
        self.inner.redis.as_ref().map_or(BackendState::Redis, |r| r.state())
    }

    /// Engine counters for metrics.
    pub fn stats(&self) -> &LimiterStats {
        &self.inner.stats
    }

    /// The in-memory store (local backend, or the Redis backend's fallback), for its gauges.
    pub fn local(&self) -> &LocalBackend {
        &self.inner.local
    }

    fn statuses(&self, slots: &[Slot], counts: &[Counts], now: u64) -> Vec<LimitStatus> {
        slots.iter().zip(counts).map(|(s, c)| status(s, *c, now)).collect()
    }

    fn admit(&self, store: Store, slots: &[Slot], status: Vec<LimitStatus>) -> Decision {
        inc(&self.inner.stats.admitted);
        let held = slots.iter().map(|s| (s.key.clone(), s.geom.bucket, s.count, s.amount)).collect();
        Decision::Admit(Admission {
            reservation: Reservation { held: Some(Held { store, slots: held }), owner: Arc::downgrade(&self.inner) },
            status,
        })
    }

    fn decide(&self, store: Store, slots: &[Slot], (admitted, counts): (bool, Vec<Counts>), now: u64) -> Decision {
        let status = self.statuses(slots, &counts, now);
        if admitted {
            return self.admit(store, slots, status);
        }
        inc(&self.inner.stats.rejected);
        // The call needs room in every limit: it can retry when the slowest one frees.
        let (rule, wait) = slots
            .iter()
            .zip(&counts)
            .filter(|(s, c)| !fits(s, **c))
            .map(|(s, c)| (s.rule.name.clone(), retry_after_ms(s, *c, now).unwrap_or(0)))
            .max_by_key(|(_, w)| *w)
            .unwrap_or_else(|| (slots.first().map_or_else(|| Arc::from(""), |s| s.rule.name.clone()), 0));
        Decision::Reject(Rejection {
            rule,
            reason: RejectReason::LimitExceeded,
            retry_after: Duration::from_millis(wait.max(1)),
            status,
        })
    }
}

fn delta(count: CountKind, reserved: u64, actual: Option<&Usage>) -> i64 {
    let to = actual.map_or(0, |u| actual_amount(count, u));
    i64::try_from(i128::from(to) - i128::from(reserved)).unwrap_or(0)
}

impl Inner {
    /// Counts a failed Redis call, switches state on the first failure of an outage (logged
    /// once), and returns the state now in force.
    fn redis_failed(&self, e: &LimitError) -> BackendState {
        inc(&self.stats.redis_errors);
        let Some(r) = &self.redis else { return BackendState::Redis };
        if r.mark_lost() {
            inc(&self.stats.redis_outages);
            let mode = match r.on_error {
                OnRedisError::FailOpen => "deciding with local counters",
                OnRedisError::FailClosed => "refusing limited calls",
            };
            tracing::warn!(error = %e, "token limits: Redis unreachable, {mode} until it is back");
        }
        r.state()
    }

    async fn adjust(&self, held: &Held, actual: Option<&Usage>) {
        match held.store {
            Store::Local => self.adjust_local(held, actual),
            Store::Redis => self.adjust_redis(held, actual).await,
        }
    }

    fn adjust_local(&self, held: &Held, actual: Option<&Usage>) {
        for (key, bucket, count, reserved) in &held.slots {
            self.local.adjust(key, *bucket, delta(*count, *reserved, actual));
        }
    }

    async fn adjust_redis(&self, held: &Held, actual: Option<&Usage>) {
        let Some(r) = &self.redis else { return };
        let items: Vec<(String, i64)> = held
            .slots
            .iter()
            .map(|(key, bucket, count, reserved)| {
                (redis_backend::bucket_key(key, *bucket), delta(*count, *reserved, actual))
            })
            .filter(|(_, d)| *d != 0)
            .collect();
        if items.is_empty() {
            return;
        }
        // While Redis is known to be down, do not wait for it: the delta is lost.
        if r.state() != BackendState::Redis {
            inc(&self.stats.lost_settles);
            return;
        }
        if let Err(e) = r.adjust(&items).await {
            inc(&self.stats.lost_settles);
            self.redis_failed(&e);
        }
    }
}

/// Recovery probe: while Redis is marked lost, PING it every `every`; on success switch back
/// (logged). Ends when the engine is dropped.
async fn probe(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        let Some(r) = &inner.redis else { return };
        if r.state() == BackendState::Redis {
            continue;
        }
        if r.ping().await.is_ok() && r.mark_back() {
            tracing::info!("token limits: Redis reachable again, shared counting resumed");
        }
    }
}

/// Header suffix naming a count kind in `x-ratelimit-{limit,remaining,reset}-{suffix}`.
pub fn header_suffix(count: CountKind) -> &'static str {
    match count {
        CountKind::Requests => "requests",
        CountKind::Total => "tokens",
        CountKind::Prompt => "prompt-tokens",
        CountKind::Completion => "completion-tokens",
        CountKind::Cost => "cost-usd",
    }
}

fn render(count: CountKind, v: u64) -> String {
    match count {
        CountKind::Cost => format!("{}.{:06}", v / 1_000_000, v % 1_000_000),
        _ => v.to_string(),
    }
}

/// `x-ratelimit-limit-*`, `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` (whole seconds,
/// rounded up) as `(name, value)` pairs: one triple per count kind, from its most restrictive
/// limit (least remaining), so clients see the headroom that actually binds. Cost is in USD.
pub fn rate_limit_headers(status: &[LimitStatus]) -> Vec<(String, String)> {
    let mut best: Vec<&LimitStatus> = Vec::new();
    for s in status {
        match best.iter_mut().find(|b| b.count == s.count) {
            Some(b)
                if (s.remaining, std::cmp::Reverse(s.reset_after))
                    < (b.remaining, std::cmp::Reverse(b.reset_after)) =>
            {
                *b = s
            }
            Some(_) => {}
            None => best.push(s),
        }
    }
    let mut out = Vec::with_capacity(best.len() * 3);
    for s in best {
        let suffix = header_suffix(s.count);
        let reset = s.reset_after.as_millis().div_ceil(1000);
        out.push((format!("x-ratelimit-limit-{suffix}"), render(s.count, s.limit)));
        out.push((format!("x-ratelimit-remaining-{suffix}"), render(s.count, s.remaining)));
        out.push((format!("x-ratelimit-reset-{suffix}"), reset.to_string()));
    }
    out
}
