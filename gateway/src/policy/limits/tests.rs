//! Engine tests on the local backend with a manual clock: window math, reservations, headers,
//! bounds. The Redis backend runs against a real server in `tests/tests/limits_redis.rs`.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::limits::TokenLimitsConfig;
use crate::policy::ManualClock;

/// 2023-11-14T00:00:00Z, a multiple of every test window.
const T0: u64 = 1_699_920_000_000;

fn unix_ms(y: i32, m: u8, d: u8, hh: u8, mm: u8, ss: u8) -> u64 {
    let date = time::Date::from_calendar_date(y, time::Month::try_from(m).expect("month"), d).expect("date");
    let t = date.with_hms(hh, mm, ss).expect("time").assume_utc();
    u64::try_from(t.unix_timestamp()).expect("after epoch") * 1000
}

async fn limiter_at(yaml: &str, start_ms: u64) -> (Limiter, Arc<ManualClock>) {
    let cfg: TokenLimitsConfig = serde_yaml_ng::from_str(yaml).expect("config");
    let clock = Arc::new(ManualClock::new());
    let limiter = Limiter::with_time(&cfg, TimeSource::manual(clock.clone(), start_ms)).await.expect("limiter");
    (limiter, clock)
}

async fn limiter(yaml: &str) -> (Limiter, Arc<ManualClock>) {
    limiter_at(yaml, T0).await
}

const NO_GROUPS: &[String] = &[];

fn agent(name: &str) -> LimitSubject<'_> {
    LimitSubject {
        agent: name,
        groups: NO_GROUPS,
        namespace: None,
        provider: "openai",
        model: "gpt-4o",
        route: "openai",
    }
}

fn tokens(prompt: u64, completion: u64) -> Estimate {
    Estimate { prompt_tokens: prompt, max_completion_tokens: completion, cost_usd: 0.0 }
}

fn used(prompt: u64, completion: u64) -> Usage {
    Usage { prompt_tokens: prompt, completion_tokens: completion, cost_usd: 0.0 }
}

fn admit(d: Decision) -> Admission {
    match d {
        Decision::Admit(a) => a,
        Decision::Reject(r) => panic!("rejected: {r:?}"),
    }
}

fn reject(d: Decision) -> Rejection {
    match d {
        Decision::Reject(r) => r,
        Decision::Admit(a) => panic!("admitted: {:?}", a.status),
    }
}

async fn remaining(l: &Limiter, who: &str) -> u64 {
    let a = admit(l.check_and_reserve(&agent(who), tokens(0, 0)).await);
    a.status[0].remaining
}

#[tokio::test]
async fn sliding_window_weighs_previous_bucket() {
    let (l, clock) = limiter("policies: [{name: p, limits: [{limit: 100, window: 10s, count: requests}]}]").await;
    // Reservations are held: dropping one would give its request back.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(admit(l.check_and_reserve(&agent("a"), tokens(1, 1)).await));
    }
    let r = reject(l.check_and_reserve(&agent("a"), tokens(1, 1)).await);
    assert_eq!(r.reason, RejectReason::LimitExceeded);
    assert_eq!(&*r.rule, "p/requests:10s");
    // Full bucket: the 101st fits once the previous bucket weighs 99%: 100 ms into the next.
    assert_eq!(r.retry_after, Duration::from_millis(10_100));
    assert_eq!(r.retry_after_secs(), 11);

    clock.advance(Duration::from_millis(10_099));
    reject(l.check_and_reserve(&agent("a"), tokens(1, 1)).await);
    clock.advance(Duration::from_millis(1));
    held.push(admit(l.check_and_reserve(&agent("a"), tokens(1, 1)).await));
    let r = reject(l.check_and_reserve(&agent("a"), tokens(1, 1)).await);
    // prev 100 × w + cur 1 + 1 <= 100  =>  w <= 0.98, 100 ms later.
    assert_eq!(r.retry_after, Duration::from_millis(100));

    // Halfway through the bucket the previous one counts ~half: 49 + 1 used, 50 more fit.
    clock.advance(Duration::from_secs(5));
    let mut n = 0;
    while let Decision::Admit(a) = l.check_and_reserve(&agent("a"), tokens(1, 1)).await {
        held.push(a);
        n += 1;
    }
    assert_eq!(n, 50);
    // Other agents have their own counters.
    admit(l.check_and_reserve(&agent("b"), tokens(1, 1)).await);
}

#[tokio::test]
async fn settle_replaces_estimate_up_and_down() {
    let (l, _clock) = limiter("policies: [{name: p, limits: [{limit: 1000, window: 1m, count: total}]}]").await;
    let a = admit(l.check_and_reserve(&agent("a"), tokens(100, 200)).await);
    assert_eq!(a.status[0].remaining, 700);
    l.settle(a.reservation, used(50, 50)).await;
    assert_eq!(remaining(&l, "a").await, 900);

    let a = admit(l.check_and_reserve(&agent("a"), tokens(100, 0)).await);
    assert_eq!(a.status[0].remaining, 800);
    l.settle(a.reservation, used(100, 400)).await;
    assert_eq!(remaining(&l, "a").await, 400);

    // Usage beyond the limit still counts (the call already happened) and blocks the next.
    let a = admit(l.check_and_reserve(&agent("a"), tokens(300, 100)).await);
    l.settle(a.reservation, used(300, 900)).await;
    let r = reject(l.check_and_reserve(&agent("a"), tokens(0, 0)).await);
    assert_eq!(r.status[0].remaining, 0);
}

#[tokio::test]
async fn release_and_drop_give_the_estimate_back() {
    let (l, _clock) = limiter("policies: [{name: p, limits: [{limit: 1000, window: 1m}]}]").await;
    let a = admit(l.check_and_reserve(&agent("a"), tokens(100, 500)).await);
    assert_eq!(a.status[0].remaining, 400);
    l.release(a.reservation).await;
    assert_eq!(remaining(&l, "a").await, 1000);

    let a = admit(l.check_and_reserve(&agent("a"), tokens(100, 500)).await);
    drop(a);
    assert_eq!(remaining(&l, "a").await, 1000);
}

#[tokio::test]
async fn settle_after_the_window_moved_on() {
    let (l, clock) = limiter("policies: [{name: p, limits: [{limit: 1000, window: 10s, algorithm: fixed}]}]").await;
    let a = admit(l.check_and_reserve(&agent("a"), tokens(100, 100)).await);
    clock.advance(Duration::from_secs(10));
    // The reservation's bucket is over: settling must not touch the new bucket.
    l.settle(a.reservation, used(900, 900)).await;
    assert_eq!(remaining(&l, "a").await, 1000);
}

#[tokio::test]
async fn all_limits_reserve_or_none() {
    let yaml = r#"
policies:
  - { name: per-agent, limits: [{limit: 2, window: 1m, count: requests}] }
  - { name: fleet, key: global, limits: [{limit: 1000, window: 1m, count: total}] }
"#;
    let (l, _clock) = limiter(yaml).await;
    let a = admit(l.check_and_reserve(&agent("a"), tokens(600, 0)).await);
    assert_eq!(a.status.len(), 2);
    let r = reject(l.check_and_reserve(&agent("a"), tokens(600, 0)).await);
    assert_eq!(&*r.rule, "fleet/total:1m");
    // The refused call did not take a request from the per-agent limit...
    let b = admit(l.check_and_reserve(&agent("a"), tokens(100, 0)).await);
    assert_eq!(b.status[0].remaining, 0);
    assert_eq!(b.status[1].remaining, 300);
    // ...which is now exhausted, while the fleet limit is not charged by the refused call.
    let r = reject(l.check_and_reserve(&agent("a"), tokens(10, 0)).await);
    assert_eq!(&*r.rule, "per-agent/requests:1m");
    assert_eq!(r.status[1].remaining, 300);
    // The global key is shared by agents.
    let c = admit(l.check_and_reserve(&agent("b"), tokens(300, 0)).await);
    assert_eq!(c.status[1].remaining, 0);
    drop((a, b, c));
}

#[tokio::test]
async fn rejection_retries_when_the_slowest_limit_frees() {
    let yaml = r#"
policies:
  - name: p
    limits:
      - { limit: 10, window: 10s, count: requests, algorithm: fixed }
      - { limit: 100, window: 1m, count: total, algorithm: fixed }
"#;
    let (l, clock) = limiter(yaml).await;
    clock.advance(Duration::from_millis(2_500));
    let a = admit(l.check_and_reserve(&agent("a"), tokens(100, 0)).await);
    let r = reject(l.check_and_reserve(&agent("a"), tokens(1, 0)).await);
    // Fixed windows: the 1 m bucket ends 57.5 s from now.
    assert_eq!(&*r.rule, "p/total:1m");
    assert_eq!(r.retry_after, Duration::from_millis(57_500));
    assert_eq!(r.retry_after_secs(), 58);
    let h = r.headers();
    assert_eq!(h[0], ("retry-after".into(), "58".into()));
    assert_eq!(h[1], ("retry-after-ms".into(), "57500".into()));
    drop(a);

    let tiny = Rejection {
        rule: Arc::from("x"),
        reason: RejectReason::LimitExceeded,
        retry_after: Duration::from_millis(1),
        status: vec![],
    };
    assert_eq!(tiny.retry_after_secs(), 1);
    let zero = Rejection { retry_after: Duration::ZERO, ..tiny };
    assert_eq!(zero.retry_after_secs(), 1);
    assert_eq!(zero.headers()[1].1, "1");
}

#[tokio::test]
async fn too_large_estimate_is_refused_without_counting() {
    let (l, _clock) = limiter("policies: [{name: p, limits: [{limit: 1000, window: 1m}]}]").await;
    let r = reject(l.check_and_reserve(&agent("a"), tokens(100, 4096)).await);
    assert_eq!(r.reason, RejectReason::TooLarge);
    assert_eq!(remaining(&l, "a").await, 1000);
}

#[tokio::test]
async fn headers_show_the_binding_limit_per_kind() {
    let yaml = r#"
policies:
  - name: p
    limits:
      - { limit: 1000, window: 1m, count: total }
      - { limit: 500, window: 10s, count: total, algorithm: fixed }
      - { limit: 60, window: 1m, count: requests }
      - { limit: 2.5, window: day, count: cost }
"#;
    let (l, clock) = limiter(yaml).await;
    clock.advance(Duration::from_millis(4_200));
    let est = Estimate { prompt_tokens: 100, max_completion_tokens: 300, cost_usd: 0.25 };
    let a = admit(l.check_and_reserve(&agent("a"), est).await);
    let h = rate_limit_headers(&a.status);
    let get =
        |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("{n} in {h:?}"));
    assert_eq!(h.len(), 9, "{h:?}");
    // Tokens: the 10 s limit binds (100 left < 600 left).
    assert_eq!(get("x-ratelimit-limit-tokens"), "500");
    assert_eq!(get("x-ratelimit-remaining-tokens"), "100");
    assert_eq!(get("x-ratelimit-reset-tokens"), "6");
    assert_eq!(get("x-ratelimit-limit-requests"), "60");
    assert_eq!(get("x-ratelimit-remaining-requests"), "59");
    // Sliding: the reservation leaves the window one bucket after this one ends.
    assert_eq!(get("x-ratelimit-reset-requests"), "116");
    assert_eq!(get("x-ratelimit-limit-cost-usd"), "2.500000");
    assert_eq!(get("x-ratelimit-remaining-cost-usd"), "2.250000");
}

#[tokio::test]
async fn calendar_month_and_day_windows() {
    let yaml = r#"
policies:
  - name: budget
    limits:
      - { limit: 10, window: month, count: cost }
      - { limit: 4, window: day, count: cost }
"#;
    let start = unix_ms(2024, 1, 31, 23, 59, 0);
    let (l, clock) = limiter_at(yaml, start).await;
    let cost = |usd: f64| Estimate { prompt_tokens: 0, max_completion_tokens: 0, cost_usd: usd };
    let spent = |usd: f64| Usage { prompt_tokens: 0, completion_tokens: 0, cost_usd: usd };
    let a = admit(l.check_and_reserve(&agent("a"), cost(1.0)).await);
    l.settle(a.reservation, spent(3.999_999)).await;
    let r = reject(l.check_and_reserve(&agent("a"), cost(0.01)).await);
    assert_eq!(&*r.rule, "budget/cost:day");
    assert_eq!(r.retry_after, Duration::from_secs(60), "until 2024-02-01T00:00Z");

    // February 1st: a new day and a new month.
    clock.advance(Duration::from_secs(60));
    for _ in 0..2 {
        let a = admit(l.check_and_reserve(&agent("a"), cost(1.0)).await);
        l.settle(a.reservation, spent(4.0)).await;
        clock.advance(Duration::from_secs(86_400));
    }
    // Feb 3rd: $8 spent this month; $2.5 more does not fit the month (29 days in Feb 2024).
    let r = reject(l.check_and_reserve(&agent("a"), cost(2.5)).await);
    assert_eq!(&*r.rule, "budget/cost:month");
    let march = unix_ms(2024, 3, 1, 0, 0, 0);
    let now = unix_ms(2024, 2, 3, 0, 0, 0);
    assert_eq!(r.retry_after, Duration::from_millis(march - now));
    let status = r.status.iter().find(|s| &*s.rule == "budget/cost:month").expect("month status");
    assert_eq!(status.remaining, 2_000_000, "micro-dollars");
    admit(l.check_and_reserve(&agent("a"), cost(2.0)).await);
}

#[tokio::test]
async fn key_table_is_bounded() {
    let yaml = r#"
local: { max_keys: 64, shards: 4 }
policies: [{name: p, limits: [{limit: 5, window: 10s}]}]
"#;
    let (l, clock) = limiter(yaml).await;
    for i in 0..1000 {
        admit(l.check_and_reserve(&agent(&format!("agent-{i}")), tokens(1, 1)).await);
        assert!(l.local().len() <= 64, "len {} at {i}", l.local().len());
    }
    let evicted = l.local().evictions();
    assert!(evicted >= 1000 - 64, "evictions {evicted}");
    // Once counters expired (2 windows), new keys replace them without evicting live ones.
    clock.advance(Duration::from_secs(21));
    for i in 0..64 {
        admit(l.check_and_reserve(&agent(&format!("late-{i}")), tokens(1, 1)).await);
    }
    assert!(l.local().len() <= 64);
    assert!(l.local().evictions() - evicted < 16, "expired counters go first");
}

#[tokio::test]
async fn policies_match_and_key_by_identity() {
    let yaml = r#"
policies:
  - name: team
    match: { group: "team-*", provider: openai, model: "gpt-4*" }
    key: group
    limits: [{limit: 2, window: 1m, count: requests}]
  - name: ns
    match: { namespace: "prod-*" }
    key: namespace
    limits: [{limit: 1, window: 1m, count: requests}]
"#;
    let (l, _clock) = limiter(yaml).await;
    let groups = vec!["ops".to_string(), "team-a".to_string()];
    let s = |who| LimitSubject {
        agent: who,
        groups: &groups,
        namespace: None,
        provider: "openai",
        model: "gpt-4o",
        route: "r",
    };
    let a = admit(l.check_and_reserve(&s("x"), tokens(1, 1)).await);
    assert_eq!(&*a.status[0].rule, "team/requests:1m");
    // Another agent of the same group shares the group counter.
    let b = admit(l.check_and_reserve(&s("y"), tokens(1, 1)).await);
    assert_eq!(b.status[0].remaining, 0);
    reject(l.check_and_reserve(&s("z"), tokens(1, 1)).await);
    // Other model: no policy applies.
    let other = LimitSubject { model: "o3", ..s("x") };
    assert!(admit(l.check_and_reserve(&other, tokens(1, 1)).await).reservation.is_empty());
    // Namespace policy: no namespace, no limit; per namespace otherwise.
    let prod = LimitSubject { namespace: Some("prod-eu"), ..agent("p") };
    let c = admit(l.check_and_reserve(&prod, tokens(1, 1)).await);
    reject(l.check_and_reserve(&prod, tokens(1, 1)).await);
    let us = LimitSubject { namespace: Some("prod-us"), ..agent("p") };
    let d = admit(l.check_and_reserve(&us, tokens(1, 1)).await);
    assert!(admit(l.check_and_reserve(&agent("p"), tokens(1, 1)).await).reservation.is_empty());
    assert_eq!(l.stats().rejected.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(l.backend_state(), BackendState::Redis);
    drop((a, b, c, d));
}

/// The advertised retry time is exact: the call fits then, and not a millisecond earlier
/// (sliding and fixed windows, many count combinations).
#[test]
fn retry_after_is_the_first_moment_that_fits() {
    use super::rules::{fits, retry_after_ms, CompiledRule, Counts, Slot, WindowSpec};
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for sliding in [true, false] {
        let spec = if sliding { WindowSpec::Sliding(10_000) } else { WindowSpec::Fixed(10_000) };
        for _ in 0..20_000 {
            let limit = 1 + rnd(2_000);
            let (prev, cur, amount) = (rnd(limit + 1), rnd(limit + 1), 1 + rnd(limit));
            let now = T0 + rnd(10_000);
            let rule = Arc::new(CompiledRule { name: Arc::from("r"), count: CountKind::Total, limit, window: spec });
            let at = |t: u64| {
                let geom = spec.geometry(t);
                let base = spec.geometry(now).bucket;
                let c = match geom.bucket - base {
                    0 => Counts { prev: if sliding { prev } else { 0 }, cur },
                    1 => Counts { prev: if sliding { cur } else { 0 }, cur: 0 },
                    _ => Counts::default(),
                };
                let rule = rule.clone();
                let slot = Slot { rule, key: String::new(), geom, limit, amount, count: CountKind::Total, sliding };
                (slot, c)
            };
            let (slot, c) = at(now);
            if fits(&slot, c) {
                continue;
            }
            let wait = retry_after_ms(&slot, c, now).expect("amount <= limit");
            let (s, c) = at(now + wait);
            assert!(fits(&s, c), "prev {prev} cur {cur} amount {amount} limit {limit}: no fit after {wait}");
            let (s, c) = at(now + wait - 1);
            assert!(!fits(&s, c), "prev {prev} cur {cur} amount {amount} limit {limit}: fits before {wait}");
        }
    }
}
