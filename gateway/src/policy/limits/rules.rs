//! Compiled policies and the window arithmetic both backends share: which limits a call
//! touches ([`Slot`]), how much it reserves, and — from the two bucket counts a backend reads —
//! whether it fits, what remains and when it may retry. Keeping the math here means the local
//! counters and the Redis Lua script can only differ in *where* they add, not in *what*.
//!
//! # Sliding-window accuracy
//!
//! A sliding limit keeps two fixed buckets of the window's length, the current one and the one
//! before, and estimates the usage of the last window as
//! `⌈previous × (time left in the current bucket / window)⌉ + current`. The estimate is exact when
//! the previous bucket's usage was spread evenly; otherwise it errs by at most the previous
//! bucket's count times how unevenly it was spread. Two hard bounds hold whatever the traffic:
//! every aligned bucket admits at most `limit`, so any window-long interval (which spans at most
//! two buckets) admits at most `2 × limit`; and unlike a plain fixed window, a client cannot get
//! `2 × limit` through in a short burst around a bucket edge, because the previous bucket
//! weighs almost fully right after the edge.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glob::Pattern;

use super::{Estimate, LimitError, LimitStatus, LimitSubject, Usage};
use crate::config::limits::{
    CountKind, LimitAlgorithm, LimitKeyBy, LimitMatch, LimitPolicyConfig, LimitRuleConfig, LimitWindow,
    TokenLimitsConfig,
};
use crate::policy::Clock;

/// Weights are integers in millionths, the same in Rust and in the Lua script.
pub(super) const PPM: u64 = 1_000_000;
const DAY_MS: u64 = 86_400_000;

/// Wall-clock milliseconds since the Unix epoch. Counters shared through Redis must agree on
/// window boundaries across nodes, which a per-process monotonic clock cannot give; tests pin
/// the time to a [`Clock`] they move by hand.
#[derive(Debug, Clone)]
pub enum TimeSource {
    /// `SystemTime::now()` (NTP-synchronised nodes agree on window edges).
    System,
    /// `unix_ms` at the moment the source was made, advanced by `clock` since then.
    Manual {
        /// The moving clock (typically a [`crate::policy::ManualClock`]).
        clock: Arc<dyn Clock>,
        /// `clock.now()` when the source was made.
        anchor: Instant,
        /// Unix milliseconds that `anchor` stands for.
        unix_ms: u64,
    },
}

impl TimeSource {
    /// A source that reads `clock` and calls its current instant `unix_ms`, so tests can start
    /// at a chosen calendar date and advance without sleeping.
    pub fn manual(clock: Arc<dyn Clock>, unix_ms: u64) -> Self {
        let anchor = clock.now();
        TimeSource::Manual { clock, anchor, unix_ms }
    }

    /// Current Unix time in milliseconds.
    pub fn now_ms(&self) -> u64 {
        match self {
            TimeSource::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            TimeSource::Manual { clock, anchor, unix_ms } => {
                let since = clock.now().saturating_duration_since(*anchor);
                unix_ms.saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
            }
        }
    }
}

/// How a compiled limit's window moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WindowSpec {
    /// Weighted two buckets of this many milliseconds.
    Sliding(u64),
    /// Epoch-aligned buckets of this many milliseconds (`day` is `Fixed(86_400_000)`).
    Fixed(u64),
    /// UTC calendar months.
    Month,
}

/// Where `now` falls in a limit's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    /// Bucket number (consecutive buckets have consecutive numbers).
    pub bucket: u64,
    /// Bucket start, Unix ms.
    pub start_ms: u64,
    /// Bucket end (exclusive), Unix ms.
    pub end_ms: u64,
    /// Weight of the previous bucket in millionths (0 for fixed windows).
    pub prev_weight: u64,
}

impl WindowSpec {
    fn from_config(w: LimitWindow, algorithm: LimitAlgorithm) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        match (w, algorithm) {
            (LimitWindow::Duration(d), LimitAlgorithm::Sliding) => WindowSpec::Sliding(ms(d)),
            (LimitWindow::Duration(d), LimitAlgorithm::Fixed) => WindowSpec::Fixed(ms(d)),
            (LimitWindow::Day, _) => WindowSpec::Fixed(DAY_MS),
            (LimitWindow::Month, _) => WindowSpec::Month,
        }
    }

    /// The bucket containing `now_ms`.
    pub(super) fn geometry(self, now_ms: u64) -> Geometry {
        match self {
            WindowSpec::Sliding(len) | WindowSpec::Fixed(len) => {
                let bucket = now_ms / len;
                let start_ms = bucket * len;
                let end_ms = start_ms.saturating_add(len);
                let prev_weight = match self {
                    WindowSpec::Sliding(_) => (end_ms - now_ms) * PPM / len,
                    _ => 0,
                };
                Geometry { bucket, start_ms, end_ms, prev_weight }
            }
            WindowSpec::Month => {
                let (year, month) = year_month(now_ms);
                let bucket = u64::try_from(i64::from(year) * 12 + i64::from(month) - 1).unwrap_or(0);
                let start_ms = month_start_ms(year, month);
                let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
                Geometry { bucket, start_ms, end_ms: month_start_ms(ny, nm), prev_weight: 0 }
            }
        }
    }
}

/// UTC (year, month 1..=12) of a Unix millisecond time.
fn year_month(unix_ms: u64) -> (i32, u8) {
    let secs = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => (t.year(), u8::from(t.month())),
        Err(_) => (1970, 1),
    }
}

/// Unix ms of 00:00 UTC on the first of `month` in `year`.
fn month_start_ms(year: i32, month: u8) -> u64 {
    let date = time::Month::try_from(month)
        .ok()
        .and_then(|m| time::Date::from_calendar_date(year, m, 1).ok())
        .unwrap_or(time::Date::MIN);
    let secs = date.midnight().assume_utc().unix_timestamp();
    u64::try_from(secs).unwrap_or(0).saturating_mul(1000)
}

/// One limit of one policy, ready to evaluate.
#[derive(Debug)]
pub(super) struct CompiledRule {
    /// `policy/count:window`, e.g. `team-a/total:1m`: names the rule in rejections and keys.
    pub name: Arc<str>,
    pub count: CountKind,
    /// In units: tokens, requests or micro-dollars.
    pub limit: u64,
    pub window: WindowSpec,
}

#[derive(Debug)]
struct Matcher {
    agent: Option<Pattern>,
    group: Option<Pattern>,
    namespace: Option<Pattern>,
    provider: Option<Pattern>,
    model: Option<Pattern>,
    route: Option<Pattern>,
}

/// A policy with its globs parsed once.
#[derive(Debug)]
pub(super) struct CompiledPolicy {
    matcher: Matcher,
    key_by: LimitKeyBy,
    rules: Vec<Arc<CompiledRule>>,
}

/// One limit a call touches: the counter, where `now` falls in its window and how much the
/// call reserves. Backends check and add `amount` for all slots of a call atomically.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    /// The limit (a token policy's, or a [`super::CallLimit`]), for names and statuses.
    pub rule: Arc<CompiledRule>,
    /// Counter name without the bucket suffix.
    pub key: String,
    pub geom: Geometry,
    pub limit: u64,
    pub amount: u64,
    pub count: CountKind,
    /// Sliding (weighted previous bucket) rather than fixed window.
    pub sliding: bool,
}

impl Slot {
    /// How long a bucket's counter must live: until it can no longer be the previous bucket.
    pub(super) fn ttl_ms(&self, now_ms: u64) -> u64 {
        let len = self.geom.end_ms - self.geom.start_ms;
        (self.geom.end_ms + len).saturating_sub(now_ms).max(1)
    }
}

/// Counts a backend read for a slot: previous and current bucket (after adding the amount if
/// the call was admitted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub prev: u64,
    pub cur: u64,
}

/// All compiled policies.
#[derive(Debug)]
pub(super) struct Rules {
    policies: Vec<CompiledPolicy>,
}

impl Rules {
    /// Validates and compiles the config.
    pub(super) fn compile(cfg: &TokenLimitsConfig) -> Result<Self, LimitError> {
        cfg.validate().map_err(|(field, message)| LimitError::Config { field, message })?;
        let policies = cfg.policies.iter().map(compile_policy).collect::<Result<_, _>>()?;
        Ok(Self { policies })
    }

    /// Whether any policy covers `subject` (cheap: glob matches, no estimate needed).
    pub(super) fn any_match(&self, subject: &LimitSubject<'_>) -> bool {
        self.policies.iter().any(|p| p.matches(subject).is_some())
    }

    /// Whether any policy would cover `subject` whatever its model (the model of a request
    /// whose body cannot be read is unknown).
    pub(super) fn any_match_any_model(&self, subject: &LimitSubject<'_>) -> bool {
        self.policies.iter().any(|p| p.matches_any_model(subject))
    }

    /// The slots of every limit of every policy `subject` matches.
    pub(super) fn slots(&self, prefix: &str, subject: &LimitSubject<'_>, est: &Estimate, now_ms: u64) -> Vec<Slot> {
        let mut out = Vec::new();
        for p in &self.policies {
            if let Some(who) = p.matches(subject) {
                for r in &p.rules {
                    let key = format!("{prefix}{}|{who}", r.name);
                    out.push(Slot::new(r, key, estimate_amount(r.count, est), now_ms));
                }
            }
        }
        out
    }
}

impl Slot {
    /// The slot of `rule`'s counter `key` (prefix included) for a call reserving `amount`.
    pub(super) fn new(rule: &Arc<CompiledRule>, key: String, amount: u64, now_ms: u64) -> Self {
        Slot {
            rule: rule.clone(),
            key,
            geom: rule.window.geometry(now_ms),
            limit: rule.limit,
            amount,
            count: rule.count,
            sliding: matches!(rule.window, WindowSpec::Sliding(_)),
        }
    }
}

fn pattern(field: &str, v: &Option<String>) -> Result<Option<Pattern>, LimitError> {
    v.as_deref()
        .map(|s| {
            Pattern::new(s).map_err(|e| LimitError::Config { field: format!("match.{field}"), message: e.to_string() })
        })
        .transpose()
}

fn compile_policy(p: &LimitPolicyConfig) -> Result<CompiledPolicy, LimitError> {
    let m: &LimitMatch = &p.matches;
    let matcher = Matcher {
        agent: pattern("agent", &m.agent)?,
        group: pattern("group", &m.group)?,
        namespace: pattern("namespace", &m.namespace)?,
        provider: pattern("provider", &m.provider)?,
        model: pattern("model", &m.model)?,
        route: pattern("route", &m.route)?,
    };
    let rules = p.limits.iter().map(|l| Arc::new(compile_rule(&p.name, l))).collect();
    Ok(CompiledPolicy { matcher, key_by: p.key, rules })
}

fn compile_rule(policy: &str, l: &LimitRuleConfig) -> CompiledRule {
    compile_named(format!("{policy}/{}:{}", l.count.as_str(), l.window), l)
}

/// A limit named `name` (in rejections and statuses).
pub(super) fn compile_named(name: String, l: &LimitRuleConfig) -> CompiledRule {
    let limit = match l.count {
        CountKind::Cost => usd_to_micros(l.limit),
        _ => l.limit as u64,
    };
    CompiledRule {
        name: Arc::from(name),
        count: l.count,
        limit,
        window: WindowSpec::from_config(l.window, l.effective_algorithm()),
    }
}

fn matches(p: &Option<Pattern>, v: &str) -> bool {
    p.as_ref().is_none_or(|p| p.matches(v))
}

impl CompiledPolicy {
    /// `Some(counter key part)` when the policy covers `s`, `None` otherwise (also when the
    /// key identity, a group or namespace, is missing).
    fn matches(&self, s: &LimitSubject<'_>) -> Option<String> {
        self.matches_with(s, true)
    }

    /// [`Self::matches`] with the model selector ignored.
    fn matches_any_model(&self, s: &LimitSubject<'_>) -> bool {
        self.matches_with(s, false).is_some()
    }

    fn matches_with(&self, s: &LimitSubject<'_>, check_model: bool) -> Option<String> {
        let m = &self.matcher;
        let ok = matches(&m.agent, s.agent)
            && matches(&m.provider, s.provider)
            && (!check_model || matches(&m.model, s.model))
            && matches(&m.route, s.route)
            && match &m.namespace {
                None => true,
                Some(p) => s.namespace.is_some_and(|ns| p.matches(ns)),
            };
        if !ok {
            return None;
        }
        let group = s.groups.iter().find(|g| matches(&m.group, g));
        if m.group.is_some() && group.is_none() {
            return None;
        }
        match self.key_by {
            LimitKeyBy::Agent => Some(format!("a={}", s.agent)),
            LimitKeyBy::Group => group.map(|g| format!("g={g}")),
            LimitKeyBy::Namespace => s.namespace.map(|ns| format!("n={ns}")),
            LimitKeyBy::Global => Some("*".into()),
        }
    }
}

/// Integer micro-dollars of a USD amount (negative and NaN count as 0).
pub(super) fn usd_to_micros(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round() as u64
    } else {
        0
    }
}

/// What a call reserves against a limit counting `count`, before it runs.
pub(super) fn estimate_amount(count: CountKind, e: &Estimate) -> u64 {
    match count {
        CountKind::Prompt => e.prompt_tokens,
        CountKind::Completion => e.max_completion_tokens,
        CountKind::Total => e.prompt_tokens.saturating_add(e.max_completion_tokens),
        CountKind::Requests => 1,
        CountKind::Cost => usd_to_micros(e.cost_usd),
    }
}

/// What a finished call used of a limit counting `count`.
pub(super) fn actual_amount(count: CountKind, u: &Usage) -> u64 {
    match count {
        CountKind::Prompt => u.prompt_tokens,
        CountKind::Completion => u.completion_tokens,
        CountKind::Total => u.prompt_tokens.saturating_add(u.completion_tokens),
        CountKind::Requests => 1,
        CountKind::Cost => usd_to_micros(u.cost_usd),
    }
}

/// Usage the window currently counts: `⌈prev × weight⌉ + cur` (the Lua script computes the
/// same). Rounding up keeps the estimate on the safe side of the limit.
pub(super) fn weighted(c: Counts, prev_weight: u64) -> u64 {
    let prev = (u128::from(c.prev) * u128::from(prev_weight)).div_ceil(u128::from(PPM)) as u64;
    prev.saturating_add(c.cur)
}

/// Whether `slot.amount` fits next to the counted usage.
pub(super) fn fits(slot: &Slot, c: Counts) -> bool {
    weighted(c, slot.geom.prev_weight).saturating_add(slot.amount) <= slot.limit
}

/// Milliseconds until `slot.amount` fits, if no other call adds to the counter meanwhile;
/// `None` when it never fits (the amount alone exceeds the limit).
pub(super) fn retry_after_ms(slot: &Slot, c: Counts, now_ms: u64) -> Option<u64> {
    let (limit, amount) = (slot.limit, slot.amount);
    if amount > limit {
        return None;
    }
    if fits(slot, c) {
        return Some(0);
    }
    let len = slot.geom.end_ms - slot.geom.start_ms;
    let to_end = slot.geom.end_ms.saturating_sub(now_ms);
    if !slot.sliding {
        return Some(to_end);
    }
    // The previous bucket's weight w(t) falls linearly to 0 at the bucket end; solve
    // prev × w + cur + amount <= limit for w, then convert w back to time.
    let weight_needed = |prev: u64, room: u64| -> u64 {
        // Largest weight (ppm) with ⌈prev × w⌉ <= room.
        if prev == 0 {
            return PPM;
        }
        (u128::from(room) * u128::from(PPM) / u128::from(prev)).min(u128::from(PPM)) as u64
    };
    if c.cur.saturating_add(amount) <= limit {
        let w = weight_needed(c.prev, limit - c.cur - amount);
        // w(t) = (end - t) / len  =>  t = end - w × len
        let at = slot.geom.end_ms - (u128::from(w) * u128::from(len) / u128::from(PPM)) as u64;
        return Some(at.saturating_sub(now_ms).max(1));
    }
    // Wait for the next bucket, where the current one becomes the previous.
    let w = weight_needed(c.cur, limit - amount);
    let at = slot.geom.end_ms + len - (u128::from(w) * u128::from(len) / u128::from(PPM)) as u64;
    Some(at.saturating_sub(now_ms).max(1))
}

/// Status of one limit for the rate-limit headers.
pub(super) fn status(slot: &Slot, c: Counts, now_ms: u64) -> LimitStatus {
    let rule = &slot.rule;
    let used = weighted(c, slot.geom.prev_weight);
    let reset = reset_ms(slot, c, now_ms);
    LimitStatus {
        rule: rule.name.clone(),
        count: rule.count,
        limit: rule.limit,
        remaining: rule.limit.saturating_sub(used),
        reset_after: Duration::from_millis(reset),
    }
}

/// Milliseconds until every usage counted now has left the window (the limit is whole again).
pub(super) fn reset_ms(slot: &Slot, c: Counts, now_ms: u64) -> u64 {
    let to_end = slot.geom.end_ms.saturating_sub(now_ms);
    let len = slot.geom.end_ms - slot.geom.start_ms;
    match (slot.sliding, c.cur > 0, c.prev > 0) {
        (true, true, _) => to_end + len,
        (true, false, true) | (false, true, _) => to_end,
        _ => 0,
    }
}
