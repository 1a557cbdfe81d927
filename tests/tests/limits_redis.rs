//! Token-limit engine with its Redis backend against a real `redis-server` (no root needed):
//! several nodes sharing one global limit under concurrency, a Redis outage under fail-open
//! and fail-closed with the recovery after it, and the latency of one check-and-reserve.
//!
//! Run: `cargo test -p tollgate-e2e --test limits_redis -- --nocapture` (prints the figures).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tollgate::config::limits::TokenLimitsConfig;
use tollgate::policy::limits::{BackendState, Decision, Estimate, LimitSubject, Limiter, RejectReason, Usage};
use tollgate_e2e::redis::RedisServer;
use tollgate_e2e::Result;

/// The tests measure throughput and latency; running them one at a time keeps the figures
/// (and the accuracy run's timing) from disturbing each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NO_GROUPS: &[String] = &[];

fn subject(agent: &str) -> LimitSubject<'_> {
    LimitSubject { agent, groups: NO_GROUPS, namespace: None, provider: "openai", model: "gpt-4o", route: "openai" }
}

fn config(yaml: &str) -> TokenLimitsConfig {
    let cfg: TokenLimitsConfig = serde_yaml_ng::from_str(yaml).expect("limits config");
    cfg.validate().expect("valid limits config");
    cfg
}

/// Sum of every counter under `prefix` in Redis.
fn redis_total(redis: &RedisServer, prefix: &str) -> Result<i64> {
    let pattern = format!("{prefix}*");
    let keys = redis.command(&["KEYS", &pattern])?.as_strings();
    let mut total = 0;
    for k in keys {
        total += redis.command(&["GET", &k])?.as_i64().unwrap_or(0);
    }
    Ok(total)
}

/// xorshift64*: enough randomness for load shapes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

const LIMIT: u64 = 20_000;
const WINDOW_MS: u64 = 10_000;
const AGENTS: u64 = 64;
const MAX_PROMPT: u64 = 40;
const MAX_COMPLETION: u64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_one_global_limit() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start()?;
    // Timeout generous for a loaded 2-core CI machine: this test is about accuracy, and a
    // timeout would (correctly) switch a node to its local counters.
    let cfg = config(&format!(
        r#"
backend: redis
redis: {{ url: "{}", timeout: 500ms, key_prefix: "acc:" }}
policies:
  - {{ name: fleet, key: global, limits: [{{ limit: {LIMIT}, window: 10s, count: total }}] }}
"#,
        redis.url()
    ));
    let nodes = [Limiter::new(&cfg).await?, Limiter::new(&cfg).await?, Limiter::new(&cfg).await?];
    for n in &nodes {
        assert_eq!(n.backend_state(), BackendState::Redis);
    }

    // Stay inside one 10 s bucket: the run takes 2 s, start with at least 5 s left.
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let into = now_ms % WINDOW_MS;
    if into > WINDOW_MS - 5_000 {
        tokio::time::sleep(Duration::from_millis(WINDOW_MS - into + 20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let settled = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let max_over = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..AGENTS {
        let node = nodes[(i % 3) as usize].clone();
        let (settled, admitted, rejected, max_over) =
            (settled.clone(), admitted.clone(), rejected.clone(), max_over.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i + 1).wrapping_mul(0x1000_0000_01b3));
            let agent = format!("agent-{i}");
            while Instant::now() < deadline {
                let est = Estimate {
                    prompt_tokens: rng.range(20, MAX_PROMPT),
                    max_completion_tokens: MAX_COMPLETION,
                    cost_usd: 0.0,
                };
                match node.check_and_reserve(&subject(&agent), est).await {
                    Decision::Admit(a) => {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(rng.range(0, 3))).await;
                        // Actual usage near the estimate: 85%..105% of it.
                        let reserved = est.prompt_tokens + est.max_completion_tokens;
                        let total = reserved * rng.range(85, 105) / 100;
                        let completion = total.saturating_sub(est.prompt_tokens);
                        let usage =
                            Usage { prompt_tokens: total - completion, completion_tokens: completion, cost_usd: 0.0 };
                        max_over.fetch_max(total.saturating_sub(reserved), Ordering::Relaxed);
                        node.settle(a.reservation, usage).await;
                        settled.fetch_add(total, Ordering::Relaxed);
                    }
                    Decision::Reject(r) => {
                        assert_eq!(r.reason, RejectReason::LimitExceeded, "{r:?}");
                        assert!(r.retry_after_secs() >= 1);
                        rejected.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let settled = settled.load(Ordering::Relaxed);
    let in_redis = redis_total(&redis, "acc:")?;
    let accuracy = settled as f64 / LIMIT as f64;
    let max_over = max_over.load(Ordering::Relaxed);
    println!(
        "accuracy: 3 nodes x {AGENTS} agents, limit {LIMIT} tokens/10s: settled {settled} tokens ({:.3}% of the limit), \
         counter in Redis {in_redis}, {} admitted / {} rejected calls, largest settle above its estimate {max_over}",
        accuracy * 100.0,
        admitted.load(Ordering::Relaxed),
        rejected.load(Ordering::Relaxed),
    );
    for n in &nodes {
        let s = n.stats();
        assert_eq!(s.redis_errors.load(Ordering::Relaxed), 0, "no Redis errors expected");
        assert_eq!(s.fallback_decisions.load(Ordering::Relaxed), 0);
    }
    assert_eq!(in_redis, settled as i64, "every settle reached Redis");
    // Admission guarantees the counter was <= LIMIT; only calls in flight at that moment (at
    // most one per agent) can settle above their estimate afterwards.
    let bound = LIMIT + AGENTS * (MAX_PROMPT + MAX_COMPLETION);
    assert!(settled <= bound, "settled {settled} > {bound}");
    assert!(settled <= LIMIT + AGENTS * max_over, "overshoot beyond the in-flight settles");
    assert!(accuracy >= 0.99, "only {settled} of {LIMIT} used");
    Ok(())
}

async fn wait_state(l: &Limiter, want: BackendState, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if l.backend_state() == want {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fail_open_fail_closed_and_recovery() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start()?;
    let yaml = |mode: &str, prefix: &str| {
        format!(
            r#"
backend: redis
redis: {{ url: "{}", timeout: 50ms, probe_interval: 200ms, on_redis_error: {mode}, key_prefix: "{prefix}" }}
policies:
  - {{ name: per-agent, limits: [{{ limit: 5, window: 1m, count: requests, algorithm: fixed }}] }}
"#,
            redis.url()
        )
    };
    let open = Limiter::new(&config(&yaml("fail_open", "open:"))).await?;
    let closed = Limiter::new(&config(&yaml("fail_closed", "closed:"))).await?;
    let est = Estimate { prompt_tokens: 10, max_completion_tokens: 10, cost_usd: 0.0 };
    let usage = Usage { prompt_tokens: 10, completion_tokens: 5, cost_usd: 0.0 };
    let mut held = Vec::new();

    for _ in 0..3 {
        let Decision::Admit(a) = open.check_and_reserve(&subject("a"), est).await else { panic!("admit") };
        held.push(a.reservation);
    }
    let Decision::Admit(a) = closed.check_and_reserve(&subject("a"), est).await else { panic!("admit") };
    closed.settle(a.reservation, usage).await;
    assert_eq!(redis_total(&redis, "open:")?, 3);
    assert_eq!(redis_total(&redis, "closed:")?, 1);

    redis.kill();
    // fail_open: the first call notices the outage and every call is decided locally; the
    // local counter starts empty, so 5 more requests pass and the 6th is refused.
    let t = Instant::now();
    let mut local = Vec::new();
    for i in 0..5 {
        match open.check_and_reserve(&subject("a"), est).await {
            Decision::Admit(a) => local.push(a.reservation),
            Decision::Reject(r) => panic!("fail_open call {i} refused: {r:?}"),
        }
        assert_eq!(open.backend_state(), BackendState::LocalFallback);
    }
    let first_calls = t.elapsed();
    let Decision::Reject(r) = open.check_and_reserve(&subject("a"), est).await else { panic!("local limit") };
    assert_eq!(r.reason, RejectReason::LimitExceeded);
    let s = open.stats();
    assert_eq!(s.redis_outages.load(Ordering::Relaxed), 1, "one outage, logged once");
    assert_eq!(s.fallback_decisions.load(Ordering::Relaxed), 6);
    // Releases of reservations made in Redis cannot reach it: counted, not waited for.
    let t = Instant::now();
    for r in held.drain(..) {
        open.release(r).await;
    }
    assert!(t.elapsed() < Duration::from_millis(50), "did not wait for the dead Redis");
    assert_eq!(s.lost_settles.load(Ordering::Relaxed), 3);
    // Local reservations settle locally.
    for r in local.drain(..) {
        open.release(r).await;
    }
    assert_eq!(s.lost_settles.load(Ordering::Relaxed), 3);
    let Decision::Admit(a) = open.check_and_reserve(&subject("a"), est).await else { panic!("released locally") };
    open.settle(a.reservation, usage).await;

    // fail_closed: refused with the distinct reason.
    let Decision::Reject(r) = closed.check_and_reserve(&subject("a"), est).await else {
        panic!("fail_closed admitted")
    };
    assert_eq!(r.reason, RejectReason::BackendDown);
    assert!(r.retry_after_secs() >= 1);
    assert_eq!(closed.backend_state(), BackendState::Down);
    assert_eq!(closed.stats().rejected_backend_down.load(Ordering::Relaxed), 1);
    println!("outage: 5 fail-open decisions took {first_calls:?} (the first one detects the outage)");

    redis.restart()?;
    let open_back = wait_state(&open, BackendState::Redis, Duration::from_secs(3)).await;
    let closed_back = wait_state(&closed, BackendState::Redis, Duration::from_secs(3)).await;
    println!(
        "recovery: back to Redis after {open_back:?} (fail_open) / {closed_back:?} (fail_closed), probe interval 200ms"
    );
    assert!(open_back.is_some() && closed_back.is_some(), "state did not return to Redis");

    // Shared counting resumed: the restarted (empty) Redis holds the new counts.
    let Decision::Admit(a) = open.check_and_reserve(&subject("a"), est).await else { panic!("admit after recovery") };
    assert_eq!(a.status[0].remaining, 4, "counted from the fresh Redis counter");
    open.settle(a.reservation, usage).await;
    let Decision::Admit(a) = closed.check_and_reserve(&subject("a"), est).await else { panic!("admit after recovery") };
    closed.settle(a.reservation, usage).await;
    assert_eq!(redis_total(&redis, "open:")?, 1);
    assert_eq!(redis_total(&redis, "closed:")?, 1);
    assert_eq!(open.stats().fallback_decisions.load(Ordering::Relaxed), 7);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_reserve_latency() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start()?;
    let cfg = config(&format!(
        r#"
backend: redis
redis: {{ url: "{}", timeout: 500ms }}
policies:
  - name: per-agent
    limits:
      - {{ limit: 1000000000, window: 1m, count: total }}
      - {{ limit: 1000000, window: 1m, count: requests }}
  - {{ name: fleet, key: global, limits: [{{ limit: 1000000000, window: 1h, count: total }}] }}
"#,
        redis.url()
    ));
    let l = Limiter::new(&cfg).await?;
    let est = Estimate { prompt_tokens: 100, max_completion_tokens: 100, cost_usd: 0.0 };
    let usage = Usage { prompt_tokens: 100, completion_tokens: 50, cost_usd: 0.0 };
    let mut samples = Vec::with_capacity(2000);
    for i in 0..2100 {
        let t = Instant::now();
        let d = l.check_and_reserve(&subject("a"), est).await;
        let took = t.elapsed();
        let Decision::Admit(a) = d else { panic!("admit") };
        if i >= 100 {
            samples.push(took); // the first 100 warm up the connection and script cache
        }
        l.settle(a.reservation, usage).await;
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "latency: check_and_reserve over 3 limits on local Redis, {} calls: p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        pct(0.50),
        pct(0.99),
        samples[samples.len() - 1]
    );
    assert_eq!(l.stats().redis_errors.load(Ordering::Relaxed), 0);
    Ok(())
}
