//! Token limits shared through a real `redis-server` by several real tollgate processes
//! (issue 6): one global limit enforced across instances under 64 concurrent agents, and a
//! Redis outage under `fail_closed` and `fail_open` with the recovery after it.
//!
//! Each tollgate serves an explicit gateway `listener` route whose provider is the mock (key
//! injected from a file), with capture off, so the instances share nothing but Redis and the
//! mock. What was admitted is measured at the provider: the mock records every request it
//! served and its usage is recomputed with the mock's own formulas ([`openai::reply_for`]),
//! never taken from tollgate. Each instance on its own counters would admit the whole limit, so
//! three instances that did not share their counts would overshoot the bound threefold.
//!
//! The limits use a 1 h sliding window: the run lasts seconds, so the previous bucket is empty
//! and the window is effectively fixed (crossing an hour edge mid-run would add at most
//! `limit × run time / 1 h`, inside the in-flight allowance).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::redis::RedisServer;
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, ensure, free_port, http_request, wait_for, Result};

use crate::support::{env, wait_metric, Env, MODEL};

/// The key the mock accepts; tollgate injects it, agents send none.
const KEY: &str = "sk-gov-redis-upstream";
/// Sentence the agents' prompts are cut from: common words, one BPE token each, so tollgate's
/// prompt estimate and the mock's word-count usage agree closely.
const WORDS: &[&str] = &[
    "please", "write", "a", "short", "note", "about", "the", "weather", "in", "our", "city", "for", "the", "team",
    "and", "keep", "it", "very", "brief", "today",
];

/// Shared pieces of the Redis scenarios: environment, Redis, mock and the key file.
struct Shared {
    e: Env,
    redis: RedisServer,
    mock: MockLlm,
    key_file: std::path::PathBuf,
}

impl Shared {
    /// A fresh Redis and a mock that records every request (up to 200 000).
    fn new() -> Result<Shared> {
        let e = env()?;
        let redis = RedisServer::start()?;
        let mock = e.mock(&["--listen", "127.0.0.1:0", "--require-key", KEY, "--record-requests", "200000"])?;
        let key_file = e.path("gov-redis.key");
        std::fs::write(&key_file, format!("{KEY}\n"))?;
        Ok(Shared { e, redis, mock, key_file })
    }

    /// A tollgate (capture off) serving a gateway listener on a free port, with `limits` as its
    /// `rate_limits` section on this Redis. Returns the instance and its listener.
    fn tollgate(&self, limits: Value) -> Result<(Tollgate, SocketAddr)> {
        let listener: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse()?;
        let mut rl = json!({"backend": "redis", "redis": {"url": self.redis.url()}});
        tollgate_e2e::merge(&mut rl, limits);
        let t = self.e.tollgate(
            json!({
                "capture": {"enabled": false},
                "providers": [{
                    "name": "mock",
                    "kind": "openai_compatible",
                    "base_url": format!("http://{}/v1", self.mock.http[0]),
                    "credentials": {"file": self.key_file},
                }],
                "routes": [{"name": "gw", "listener": listener.to_string(), "targets": [{"provider": "mock"}],
                    "listener_auth": {"allow_cidrs": ["127.0.0.1/32"]}}],
                "rate_limits": rl,
            }),
            None,
        )?;
        Ok((t, listener))
    }

    /// Calls the mock served so far, as `(calls, total tokens, largest call)`, recomputed from
    /// the recorded request bodies with the mock's formulas.
    fn served(&self) -> Result<(u64, u64, u64)> {
        let (mut calls, mut tokens, mut largest) = (0, 0, 0);
        for r in self.mock.requests()?.iter().filter(|r| r["api"] == "openai_chat") {
            let req = ChatRequest::from_json(&r["body_json"]).map_err(|e| anyhow!("recorded body: {e}: {r}"))?;
            let t = openai::reply_for(&req).total_tokens();
            calls += 1;
            tokens += t;
            largest = largest.max(t);
        }
        let counted = self.mock.chat_requests()?;
        ensure!(counted == calls, "mock served {counted} chats but recorded {calls}: raise --record-requests");
        Ok((calls, tokens, largest))
    }

    /// Forget what the mock served so far (recorded requests and counters), so [`Shared::served`]
    /// covers one phase.
    fn reset_mock(&self) -> Result<()> {
        self.mock.clear_requests()?;
        self.mock.control("DELETE", "/__mock/stats", None).map(|_| ())
    }

    /// Sum of every counter under `prefix` in Redis.
    fn redis_total(&self, prefix: &str) -> Result<i64> {
        let mut total = 0;
        for k in self.redis.command(&["KEYS", &format!("{prefix}*")])?.as_strings() {
            total += self.redis.command(&["GET", &k])?.as_i64().unwrap_or(0);
        }
        Ok(total)
    }

    /// Poll until Redis holds `want` under `prefix` (settles are written after the response).
    fn wait_redis_total(&self, prefix: &str, want: u64) -> Result<()> {
        let mut last = 0;
        let ok = wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
            last = self.redis_total(prefix).ok()?;
            (last == want as i64).then_some(())
        });
        ensure!(ok.is_some(), "Redis counters under {prefix:?} hold {last}, the mock served {want} tokens");
        Ok(())
    }
}

/// A reply as the scenarios read it: status, headers (names lower-cased), JSON body.
type Reply = (u16, Vec<(String, String)>, Value);

/// One chat completion to a gateway listener.
fn chat(addr: SocketAddr, body: &Value) -> Result<Reply> {
    let payload = serde_json::to_vec(body)?;
    let (st, headers, text) =
        http_request(addr, "POST", "/v1/chat/completions", &[], Some(&payload), Duration::from_secs(30))?;
    let v = serde_json::from_str(&text).map_err(|e| anyhow!("HTTP {st} from {addr}, body not JSON ({e}): {text}"))?;
    Ok((st, headers, v))
}

/// `error.code` of an OpenAI-shaped error body ("" when there is none).
fn code_of(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// `sum(name{labels})` on `t`'s `/metrics` now (NaN when the scrape fails, so checks fail).
fn metric(t: &Tollgate, name: &str, labels: &[(&str, &str)]) -> f64 {
    t.metrics().map(|m| m.sum(name, labels)).unwrap_or(f64::NAN)
}

/// What one agent saw, per instance.
#[derive(Default, Clone)]
struct Tally {
    ok: [u64; 3],
    refused: [u64; 3],
    /// Tokens in the usage of the 200 responses the agent received.
    tokens: u64,
    /// First unexpected reply (anything but 200 or a 429 `rate_limit_exceeded`).
    unexpected: Option<String>,
}

const AGENTS: usize = 64;
const LIMIT: u64 = 30_000;

/// (d) Three tollgates, one Redis, one global token limit: 64 concurrent agents spread over the
/// instances call until refused. What the provider served is within the limit plus one
/// in-flight call per agent and at least 99 % of it; every instance refuses once the shared
/// count is full, every settle reaches Redis, and no instance ever fell back.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn gov_d_three_tollgates_one_redis() -> Result<()> {
    let s = Shared::new()?;
    let prefix = "govd:";
    let limits = json!({
        "redis": {"timeout": "500ms", "key_prefix": prefix},
        "policies": [{"name": "fleet", "key": "global", "limits": [{"limit": LIMIT, "window": "1h", "count": "total"}]}],
    });
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(s.tollgate(limits.clone())?);
    }
    for (t, _) in &nodes {
        wait_metric(t, "tollgate_ratelimit_backend_state", &[], 0.0)?;
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|(_, a)| *a).collect();

    let start = Instant::now();
    let last_admit_ms = AtomicU64::new(0);
    let tallies: Vec<Tally> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..AGENTS)
            .map(|i| {
                let (addrs, last_admit_ms) = (&addrs[..], &last_admit_ms);
                sc.spawn(move || run_agent(i, addrs, start, last_admit_ms))
            })
            .collect();
        let panicked = || Tally { unexpected: Some("agent thread panicked".into()), ..Tally::default() };
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| panicked())).collect()
    });
    let took = start.elapsed();

    if let Some(u) = tallies.iter().find_map(|t| t.unexpected.clone()) {
        return Err(anyhow!("unexpected reply: {u}"));
    }
    let per = |f: fn(&Tally) -> [u64; 3]| -> [u64; 3] {
        let mut out = [0; 3];
        for t in &tallies {
            for (o, v) in out.iter_mut().zip(f(t)) {
                *o += v;
            }
        }
        out
    };
    let (ok, refused) = (per(|t| t.ok), per(|t| t.refused));
    let client_tokens: u64 = tallies.iter().map(|t| t.tokens).sum();
    let (calls, admitted, largest) = s.served()?;
    let ratio = admitted as f64 / LIMIT as f64;
    let bound = LIMIT + AGENTS as u64 * largest;
    eprintln!(
        "gov_d figures: limit {LIMIT} tokens (global, 3 tollgates, {AGENTS} agents): provider served {admitted} tokens \
         in {calls} calls = {:.4} of the limit (bound {bound} = limit + {AGENTS} x largest call {largest}); \
         admitted per instance {ok:?}, refused per instance {refused:?}; {:.1} s",
        ratio,
        took.as_secs_f64()
    );
    ensure!(calls == ok.iter().sum::<u64>(), "the mock served {calls} calls, the agents got {ok:?} 200s");
    ensure!(client_tokens == admitted, "agents received usage {client_tokens}, the mock's formulas give {admitted}");
    ensure!(admitted <= bound, "admitted {admitted} tokens > limit {LIMIT} + one in-flight call per agent ({bound})");
    ensure!(ratio >= 0.99, "admitted only {admitted} of {LIMIT} tokens ({ratio:.4})");
    for (i, (t, _)) in nodes.iter().enumerate() {
        ensure!(ok[i] > 0 && refused[i] > 0, "instance {i} admitted {} and refused {}: not sharing", ok[i], refused[i]);
        wait_metric(
            t,
            "tollgate_ratelimit_rejections_total",
            &[("policy", "fleet"), ("count", "total")],
            refused[i] as f64,
        )?;
        wait_metric(t, "tollgate_llm_requests_total", &[("route", "gw"), ("status", "200")], ok[i] as f64)?;
        let (errors, state) = (
            metric(t, "tollgate_ratelimit_redis_errors_total", &[]),
            metric(t, "tollgate_ratelimit_backend_state", &[]),
        );
        ensure!(errors == 0.0 && state == 0.0, "instance {i}: {errors} Redis errors, backend state {state}");
    }
    // Every reservation was settled in Redis to what the provider really served.
    s.wait_redis_total(prefix, admitted)?;
    Ok(())
}

/// Agent `i` of [`gov_d_three_tollgates_one_redis`]: round-robin over the instances with
/// prompts of known size until it was refused and nobody anywhere was admitted for 500 ms
/// (`last_admit_ms` since `start`; room freed by settles below the estimate is still picked
/// up), or the deadline passes. Any reply but a 200 or a 429 `rate_limit_exceeded` ends it.
fn run_agent(i: usize, addrs: &[SocketAddr], start: Instant, last_admit_ms: &AtomicU64) -> Tally {
    let deadline = Duration::from_secs(120);
    let mut t = Tally::default();
    for j in 0usize.. {
        let node = (i + j) % 3;
        let n = 4 + (i * 7 + j * 3) % 16;
        let prompt: Vec<&str> = (0..n).map(|k| WORDS[(i + j + k) % WORDS.len()]).collect();
        let body = json!({"model": MODEL, "max_tokens": 8 + (i + j) % 17,
            "messages": [{"role": "user", "content": prompt.join(" ")}]});
        match chat(addrs[node], &body) {
            Ok((200, _, v)) => {
                t.ok[node] += 1;
                t.tokens += v["usage"]["total_tokens"].as_u64().unwrap_or(0);
                last_admit_ms.fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            Ok((429, _, v)) if code_of(&v) == "rate_limit_exceeded" => {
                t.refused[node] += 1;
                let idle = (start.elapsed().as_millis() as u64).saturating_sub(last_admit_ms.load(Ordering::Relaxed));
                if idle > 500 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok((st, _, v)) => {
                t.unexpected = Some(format!("HTTP {st} from node {node}: {v}"));
                break;
            }
            Err(e) => {
                t.unexpected = Some(format!("node {node}: {e:#}"));
                break;
            }
        }
        if start.elapsed() > deadline {
            t.unexpected.get_or_insert(format!("agent {i} still running after {deadline:?}"));
            break;
        }
    }
    t
}

/// A call of 30 tokens by the mock's formulas: prompt 3 + 4 + 4 words, 19 completion words.
fn small_call() -> Value {
    json!({"model": MODEL, "max_tokens": 19, "messages": [{"role": "user", "content": "say one word please"}]})
}
const CALL: u64 = 30;
const SMALL_LIMIT: u64 = 600;

/// Sends [`small_call`] to `addr` until refused (at most `max` calls): how many were admitted,
/// and the refusal's status and body.
fn until_refused(addr: SocketAddr, max: usize) -> Result<(u64, u16, Value)> {
    for n in 0..max as u64 {
        let (st, _, v) = chat(addr, &small_call())?;
        if st != 200 {
            return Ok((n, st, v));
        }
    }
    Err(anyhow!("{addr} admitted {max} calls without refusing"))
}

/// (e) Redis killed mid-test: an instance with `on_redis_error: fail_closed` answers 503
/// (`rate_limit_unavailable`) without forwarding, one with `fail_open` decides with its own
/// counters (a whole limit of its own, more than was globally left); both export the state and
/// count Redis errors. Redis restarted (empty): both switch back and count globally again,
/// refusing together at the shared limit.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn gov_e_redis_outage_fail_closed_fail_open() -> Result<()> {
    let mut s = Shared::new()?;
    let prefix = "gove:";
    let limits = |mode: &str| {
        json!({
            "redis": {"timeout": "200ms", "probe_interval": "200ms", "on_redis_error": mode, "key_prefix": prefix},
            "policies": [{"name": "fleet", "key": "global", "limits": [{"limit": SMALL_LIMIT, "window": "1h", "count": "total"}]}],
        })
    };
    let (closed, a) = s.tollgate(limits("fail_closed"))?;
    let (open, b) = s.tollgate(limits("fail_open"))?;
    let one = openai::reply_for(&ChatRequest::from_json(&small_call()).map_err(|e| anyhow!(e))?).total_tokens();
    ensure!(one == CALL, "the small call is {one} tokens by the mock's formulas, not {CALL}");

    // Shared counting before the outage.
    for addr in [a, b, a, b] {
        let (st, _, v) = chat(addr, &small_call())?;
        ensure!(st == 200, "before the outage {addr}: HTTP {st}: {v}");
    }
    s.wait_redis_total(prefix, 4 * CALL)?;

    s.redis.kill();
    let served_before = s.mock.chat_requests()?;
    let (st, headers, v) = chat(a, &small_call())?;
    ensure!(st == 503 && code_of(&v) == "rate_limit_unavailable", "fail_closed during the outage: HTTP {st}: {v}");
    ensure!(v["error"]["message"].as_str().is_some_and(|m| m.contains("Redis")), "503 message: {v}");
    ensure!(headers.iter().any(|(k, _)| k == "retry-after"), "503 without retry-after: {headers:?}");
    ensure!(s.mock.chat_requests()? == served_before, "a fail_closed refusal reached the provider");
    wait_metric(&closed, "tollgate_ratelimit_backend_state", &[], 2.0)?;
    wait_metric(&closed, "tollgate_policy_denials_total", &[("policy", "rate_limit"), ("rule", "redis")], 1.0)?;
    let closed_errors = metric(&closed, "tollgate_ratelimit_redis_errors_total", &[]);
    ensure!(closed_errors >= 1.0, "fail_closed instance counted {closed_errors} Redis errors");

    // fail_open: local counters start empty, so this instance alone admits a whole limit,
    // although only SMALL_LIMIT - 4 calls were left globally; then its local limit refuses.
    s.reset_mock()?;
    let (local_calls, st, v) = until_refused(b, 100)?;
    ensure!(st == 429 && code_of(&v) == "rate_limit_exceeded", "fail_open local limit: HTTP {st}: {v}");
    let (_, local_tokens, _) = s.served()?;
    // Refused within one estimate of its local limit, and past what was left globally.
    ensure!(
        local_tokens <= SMALL_LIMIT && local_tokens + 2 * CALL > SMALL_LIMIT && local_tokens > SMALL_LIMIT - 4 * CALL,
        "fail_open admitted {local_tokens} tokens locally ({local_calls} calls), want about the whole {SMALL_LIMIT}"
    );
    wait_metric(&open, "tollgate_ratelimit_backend_state", &[], 1.0)?;
    let open_errors = metric(&open, "tollgate_ratelimit_redis_errors_total", &[]);
    ensure!(open_errors >= 1.0, "fail_open instance counted {open_errors} Redis errors");
    // Still closed on the other instance.
    let (st, _, v) = chat(a, &small_call())?;
    ensure!(st == 503, "fail_closed still during the outage: HTTP {st}: {v}");

    s.redis.restart()?;
    let t0 = Instant::now();
    wait_metric(&closed, "tollgate_ratelimit_backend_state", &[], 0.0)?;
    wait_metric(&open, "tollgate_ratelimit_backend_state", &[], 0.0)?;
    let back = t0.elapsed();

    // Shared again: alternate until both refuse in the same round. The fail_open instance's
    // local counter is full, so every call it admits now was decided in Redis.
    s.reset_mock()?;
    let (mut via_a, mut via_b) = (0u64, 0u64);
    for round in 0.. {
        ensure!(round < 100, "no shared refusal after 100 rounds");
        let (sa, _, va) = chat(a, &small_call())?;
        let (sb, _, vb) = chat(b, &small_call())?;
        for (st, v) in [(sa, &va), (sb, &vb)] {
            ensure!(st == 200 || (st == 429 && code_of(v) == "rate_limit_exceeded"), "after recovery: HTTP {st}: {v}");
        }
        via_a += u64::from(sa == 200);
        via_b += u64::from(sb == 200);
        if sa == 429 && sb == 429 {
            break;
        }
    }
    let (_, shared_tokens, _) = s.served()?;
    eprintln!(
        "gov_e figures: outage: fail_closed 503 rate_limit_unavailable ({closed_errors} Redis errors counted), \
         fail_open admitted {local_calls} calls = {local_tokens} tokens on local counters (limit {SMALL_LIMIT}, \
         {} left globally); back to Redis {back:?} after restart; then {via_a} + {via_b} calls = {shared_tokens} tokens \
         admitted through the two instances before both refused",
        SMALL_LIMIT - 4 * CALL
    );
    ensure!(via_a > 0 && via_b > 0, "after recovery: {via_a} admitted by fail_closed, {via_b} by fail_open");
    ensure!(
        shared_tokens <= SMALL_LIMIT && shared_tokens + 2 * CALL > SMALL_LIMIT,
        "after recovery the two instances admitted {shared_tokens} tokens together, want the shared {SMALL_LIMIT}"
    );
    s.wait_redis_total(prefix, shared_tokens)?;
    Ok(())
}
