//! Gateway routing scenarios: failover by failure class and the circuit breaker, weighted
//! balancing and model aliases, provider-key rotation without leaks, and the Gemini and Azure
//! OpenAI providers over HTTP/2 with TLS (in `providers.rs`).
//!
//! Agents in the scenario's cgroup call virtual addresses `127.0.0.2:81xx` (captured, nothing
//! listens there) with a placeholder key; mock providers accept only the keys tollgate holds.
//! Which target served a call is read from the mocks (counters, request logs) and from
//! tollgate (access log `target`, `tollgate_upstream_attempts_total`); token counts are
//! recomputed from the bodies the mocks recorded, never taken from tollgate.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::client::{curl, CurlOut};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::openai::{self, ChatRequest, Reply};
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, ensure, merge, wait_for, Result};

use super::{assert_line_tokens, last_request, Gw};
use crate::support::wait_metric;

pub(super) const ATTEMPTS: &str = "tollgate_upstream_attempts_total";
pub(super) const CIRCUIT: &str = "tollgate_upstream_circuit_state";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `127.0.0.2:<port>`: a captured virtual address nothing listens on.
pub(super) fn vip(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 2], port))
}

/// tollgate capturing each route's virtual address for `gw`'s cgroup, with `providers` and one
/// gateway route per `(name, vip, fields)` (fields merged in: `targets`, `failover`, ...), plus
/// `extra` merged into the config (e.g. `tls`).
pub(super) fn gateway(
    gw: &Gw,
    providers: Value,
    routes: &[(&str, SocketAddr, Value)],
    extra: Value,
) -> Result<Tollgate> {
    let destinations: Vec<Value> =
        routes.iter().map(|(_, a, _)| json!({"cidr": format!("{}/32", a.ip()), "port": a.port()})).collect();
    let routes: Vec<Value> = routes
        .iter()
        .map(|(name, a, fields)| {
            let mut r = json!({"name": name, "match": {"addresses": [a.to_string()]}});
            merge(&mut r, fields.clone());
            r
        })
        .collect();
    let mut cfg = json!({
        "capture": {"scope": [gw.g.rel()], "destinations": destinations},
        "providers": providers,
        "routes": routes,
        "agents": [{"name": gw.agent, "match": {"cgroup": gw.g.rel()}}],
    });
    merge(&mut cfg, extra);
    gw.e.tollgate(cfg, None)
}

/// An `openai` provider named `name` at the plain mock `m`, keyed from `key`.
pub(super) fn openai_provider(name: &str, m: &MockLlm, key: &Path) -> Value {
    json!({"name": name, "kind": "openai", "base_url": format!("http://{}/v1", m.http[0]), "credentials": {"file": key}})
}

/// A `http://127.0.0.1:<port>` nothing listens on (bound a moment ago, then released).
pub(super) fn closed_base() -> String {
    format!("http://127.0.0.1:{}/v1", tollgate_e2e::free_port("127.0.0.1"))
}

/// The LLM access-log lines of `route`, waiting until there are at least `n`.
pub(super) fn route_lines(t: &Tollgate, route: &str, n: usize) -> Result<Vec<Value>> {
    let got = wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        let v: Vec<Value> = t.access_log().into_iter().filter(|l| l["kind"] == "llm" && l["route"] == route).collect();
        (v.len() >= n).then_some(v)
    });
    got.ok_or_else(|| {
        anyhow!("fewer than {n} llm access-log lines for route {route}; stdout:\n{}", t.stdout_lines().join("\n"))
    })
}

/// The `n`-th (1-based) LLM access-log line of `route`.
pub(super) fn nth_line(t: &Tollgate, route: &str, n: usize) -> Result<Value> {
    Ok(route_lines(t, route, n)?[n - 1].clone())
}

/// Assert an access-log line's `target`, `attempts` and `status`.
pub(super) fn assert_served(line: &Value, target: &str, attempts: u64, status: u64) -> Result<()> {
    ensure!(
        line["target"] == json!(target) && line["attempts"] == json!(attempts) && line["status"] == json!(status),
        "access log: want target={target} attempts={attempts} status={status}, got target={} attempts={} status={}: {line}",
        line["target"],
        line["attempts"],
        line["status"]
    );
    Ok(())
}

/// Wait until `tollgate_upstream_attempts_total{route}` has exactly these `(target, outcome,
/// count)` values.
pub(super) fn expect_attempts(t: &Tollgate, route: &str, want: &[(&str, &str, u64)]) -> Result<()> {
    for (target, outcome, n) in want {
        wait_metric(t, ATTEMPTS, &[("route", route), ("target", target), ("outcome", outcome)], *n as f64)?;
    }
    Ok(())
}

/// Wait until the circuit gauge of `target` on `route` reads `state` (0 closed, 1 half-open,
/// 2 open).
pub(super) fn expect_circuit(t: &Tollgate, route: &str, target: &str, state: u8) -> Result<()> {
    wait_metric(t, CIRCUIT, &[("route", route), ("target", target)], f64::from(state))
}

/// One chat completion through the unmodified openai SDK (`openai_tools.py --no-tools`) with a
/// placeholder key; its JSON output.
pub(super) fn sdk_chat(gw: &Gw, base: &str, model: &str, prompt: &str) -> Result<Value> {
    gw.client(
        "openai_tools.py",
        &["--no-tools", "--base-url", base, "--api-key", "placeholder", "--model", model, "--prompt", prompt],
    )
}

/// `burst.py` with `args`; its JSON output.
pub(super) fn burst(gw: &Gw, args: &[&str]) -> Result<Value> {
    gw.client("burst.py", args)
}

/// Requests a mock received (`total`, faulted ones included) and chat completions it served.
pub(super) fn seen(m: &MockLlm) -> Result<(u64, u64)> {
    let s = m.stats(None)?;
    let get = |k: &str| s[k].as_u64().ok_or_else(|| anyhow!("no counter {k:?} in mock stats: {s}"));
    Ok((get("total")?, get("openai_chat")?))
}

/// Assert a mock's counters moved by exactly `(received, served)` since `before`.
pub(super) fn assert_delta(name: &str, m: &MockLlm, before: (u64, u64), want: (u64, u64)) -> Result<(u64, u64)> {
    let now = seen(m)?;
    let got = (now.0 - before.0, now.1 - before.1);
    ensure!(
        got == want,
        "mock {name}: want {} requests received / {} chats served since the step began, got {} / {}",
        want.0,
        want.1,
        got.0,
        got.1
    );
    Ok(now)
}

/// The mock's last recorded request: a chat completion carrying exactly `Bearer <key>` (the
/// agent's placeholder gone); returns the reply the mock computed for it.
pub(super) fn recorded_chat(m: &MockLlm, key: &str) -> Result<(Value, Reply)> {
    let rec = last_request(m)?;
    let auth = &rec["headers"]["authorization"];
    ensure!(*auth == json!(format!("Bearer {key}")), "provider saw authorization {auth}, not tollgate's key");
    ensure!(!rec["headers"].to_string().contains("placeholder"), "the agent's placeholder key reached the provider");
    let req = ChatRequest::from_json(&rec["body_json"]).map_err(|e| anyhow!("recorded body: {e}: {rec}"))?;
    Ok((rec, openai::reply_for(&req)))
}

/// The SDK's output matches `reply` (id, content, exact usage).
pub(super) fn assert_sdk_reply(v: &Value, reply: &Reply) -> Result<()> {
    ensure!(v["id"] == json!(reply.id), "SDK got id {}, the mock sent {}", v["id"], reply.id);
    ensure!(
        v["content"] == json!(reply.content),
        "SDK got content {}, the mock sent {:?}",
        v["content"],
        reply.content
    );
    let u = &v["usage"];
    ensure!(
        u["prompt_tokens"] == json!(reply.prompt_tokens) && u["completion_tokens"] == json!(reply.completion_tokens),
        "SDK got usage {u}, the mock sent prompt={} completion={}",
        reply.prompt_tokens,
        reply.completion_tokens
    );
    Ok(())
}

/// A random lower-case hex tag (for keys nobody could guess or have in a log by chance).
pub(super) fn random_hex() -> String {
    let s = RandomState::new();
    format!("{:016x}{:016x}", s.hash_one(std::process::id()), s.hash_one(Instant::now()))
}

/// POST `body` (JSON) with curl from the agent's cgroup, with extra `headers`.
pub(super) fn curl_post(gw: &Gw, url: &str, headers: &[&str], body: &Value) -> Result<CurlOut> {
    let file = gw.e.path(&format!("body-{}.json", random_hex()));
    std::fs::write(&file, serde_json::to_vec(body)?)?;
    let data = format!("@{}", file.display());
    let mut args = vec!["-g", "-X", "POST", "-H", "Content-Type: application/json"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.extend(["--data-binary", &data, url]);
    let out = curl(Some(&gw.g), None, &args);
    let _ = std::fs::remove_file(&file);
    out
}

/// The body of a tollgate-made OpenAI error: `{"error": {"message": "tollgate: ...", "type",
/// "code"}}` with this type and code.
pub(super) fn assert_tollgate_error(body: &Value, kind: &str, code: &str) -> Result<()> {
    let e = &body["error"];
    ensure!(e["type"] == json!(kind) && e["code"] == json!(code), "want error type {kind:?} code {code:?}, got {body}");
    let msg = e["message"].as_str().unwrap_or("");
    ensure!(msg.starts_with("tollgate: "), "error message does not start with `tollgate:`: {body}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// g5: failover on 503, 429 and timeout; circuit breaker; exhausted and unreachable targets
// ---------------------------------------------------------------------------------------------

/// Failover and circuit breaking with the unmodified openai SDK. Target A (priority 0) is
/// preferred, B (priority 1) takes over when A fails with a class listed in `failover.on`:
/// * a 503, a 429 and a response slower than `attempt_timeout` (800 ms; A delays 3 s) from A
///   are each retried on B, invisibly to the SDK (and the timeout well before A's 3 s); the
///   next clean call is served by A again;
/// * two consecutive 503s open A's circuit (`max_fails: 2`): the next call never reaches A;
///   after `fail_timeout` (2 s) the circuit half-opens, one probe call goes to A and closes it;
/// * `tollgate_upstream_attempts_total` counts every attempt with its outcome;
/// * when A and B both fail, the SDK raises `APIStatusError` 503 with the provider's own error;
/// * a route whose only target is unreachable answers 502 with a tollgate OpenAI error object.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g5_failover_on_503_429_timeout_and_circuit() -> Result<()> {
    let gw = Gw::new("g5-agent", 8111)?;
    let dead_vip = vip(8112);
    let (key_a, key_b) = ("sk-g5-provider-a", "sk-g5-provider-b");
    let a = gw.mock("a", &[key_a], &[])?;
    let b = gw.mock("b", &[key_b], &[])?;
    let (ka, kb) = (gw.key_file("a", key_a)?, gw.key_file("b", key_b)?);
    let kd = gw.key_file("dead", "sk-g5-dead")?;
    let failover = json!({
        "on": ["connect", "timeout", "rate_limited", "server_error"],
        "max_attempts": 2,
        "attempt_timeout": "800ms",
        "request_timeout": "10s",
    });
    let t = gateway(
        &gw,
        json!([
            openai_provider("a", &a, &ka),
            openai_provider("b", &b, &kb),
            {"name": "dead", "kind": "openai", "base_url": closed_base(), "credentials": {"file": kd}},
        ]),
        &[
            (
                "gw",
                gw.vip,
                json!({
                    "targets": [{"provider": "a", "priority": 0}, {"provider": "b", "priority": 1}],
                    "failover": failover,
                    "circuit": {"max_fails": 2, "fail_timeout": "2s"},
                }),
            ),
            ("dead", dead_vip, json!({"targets": [{"provider": "dead"}], "failover": failover})),
        ],
        json!({}),
    )?;
    let base = gw.url("/v1");
    let mut lines = 0;
    let mut ca = seen(&a)?;
    let mut cb = seen(&b)?;

    // --- One failure of each class on A: the call fails over to B, the next one is A's again.
    for (step, fault) in [
        ("503", json!({"status": 503, "count": 1})),
        ("429", json!({"status": 429, "count": 1})),
        // No response headers for 3 s. The 503 after the delay never reaches tollgate (it gave
        // up at 800 ms); it only keeps the abandoned request from being served late, which
        // would move A's counters under a later step.
        ("timeout", json!({"delay_ms": 3000, "status": 503, "count": 1})),
    ] {
        a.set_fault(fault.clone())?;
        let prompt = format!("failover on {step}");
        let started = Instant::now();
        let v = if step == "timeout" {
            // burst.py times the SDK call itself (not the interpreter start-up).
            let r = burst(&gw, &["--mode", "sdk", "--base-url", &base, "--prompt", &prompt])?;
            ensure!(r["ok"] == json!(1), "SDK call failed although B was healthy: {r}");
            let ms = r["max_ms"].as_f64().unwrap_or(f64::MAX);
            ensure!(
                (800.0..2000.0).contains(&ms),
                "the SDK call took {ms} ms: want >= the 800 ms attempt timeout and well under A's 3 s delay"
            );
            r
        } else {
            sdk_chat(&gw, &base, "gpt-4o-mini", &prompt)?
        };
        let wall = started.elapsed();
        // A received the call (and failed it), B served it.
        ca = assert_delta("a", &a, ca, (1, 0))?;
        cb = assert_delta("b", &b, cb, (1, 1))?;
        let rec_a = last_request(&a)?;
        ensure!(rec_a["fault"].is_object(), "A's recorded request was not the faulted one: {rec_a}");
        let (_, reply) = recorded_chat(&b, key_b)?;
        if step != "timeout" {
            assert_sdk_reply(&v, &reply)?;
        }
        lines += 1;
        let line = nth_line(&t, "gw", lines)?;
        assert_served(&line, "b", 2, 200)?;
        assert_line_tokens(&line, reply.prompt_tokens, reply.completion_tokens)?;
        if step == "timeout" {
            let d = line["duration_ms"].as_f64().unwrap_or(0.0);
            ensure!((800.0..2000.0).contains(&d), "tollgate took {d} ms for the timed-out call (wall {wall:?})");
        }
        // The fault was used up: the next call is A's again.
        let v = sdk_chat(&gw, &base, "gpt-4o-mini", &format!("after {step}"))?;
        ca = assert_delta("a", &a, ca, (1, 1))?;
        cb = assert_delta("b", &b, cb, (0, 0))?;
        let (_, reply) = recorded_chat(&a, key_a)?;
        assert_sdk_reply(&v, &reply)?;
        lines += 1;
        assert_served(&nth_line(&t, "gw", lines)?, "a", 1, 200)?;
    }
    expect_attempts(
        &t,
        "gw",
        &[
            ("a", "server_error", 1),
            ("a", "rate_limited", 1),
            ("a", "timeout", 1),
            ("a", "ok", 3),
            ("b", "ok", 3),
            ("b", "server_error", 0),
        ],
    )?;
    expect_circuit(&t, "gw", "a", 0)?;

    // --- Circuit: A fails persistently. One SDK client makes three calls back to back (well
    // within fail_timeout): the first two fail over and open A's circuit, the third skips A.
    a.set_fault(json!({"status": 503}))?;
    let r = burst(&gw, &["--mode", "sdk", "--base-url", &base, "--count", "3", "--prompt", "A is down"])?;
    // First, while well within fail_timeout of the opening.
    expect_circuit(&t, "gw", "a", 2)?;
    ca = assert_delta("a", &a, ca, (2, 0))?;
    cb = assert_delta("b", &b, cb, (3, 3))?;
    let calls = r["calls"].as_array().cloned().unwrap_or_default();
    ensure!(
        r["statuses"] == json!({"200": 3}) && calls.len() == 3 && calls.iter().all(|c| c["served_by"] == json!("b")),
        "want three SDK calls served by B, got {r}"
    );
    let (_, reply) = recorded_chat(&b, key_b)?;
    ensure!(
        calls[2]["usage"]["prompt_tokens"] == json!(reply.prompt_tokens)
            && calls[2]["usage"]["completion_tokens"] == json!(reply.completion_tokens),
        "SDK got usage {}, the mock sent prompt={} completion={}",
        calls[2]["usage"],
        reply.prompt_tokens,
        reply.completion_tokens
    );
    for attempts in [2, 2, 1] {
        lines += 1;
        assert_served(&nth_line(&t, "gw", lines)?, "b", attempts, 200)?;
    }
    // A recovers; after fail_timeout the circuit half-opens and one probe is served by A.
    a.clear_fault()?;
    std::thread::sleep(Duration::from_millis(2100));
    expect_circuit(&t, "gw", "a", 1)?;
    let v = sdk_chat(&gw, &base, "gpt-4o-mini", "probe A")?;
    ca = assert_delta("a", &a, ca, (1, 1))?;
    cb = assert_delta("b", &b, cb, (0, 0))?;
    assert_sdk_reply(&v, &recorded_chat(&a, key_a)?.1)?;
    lines += 1;
    assert_served(&nth_line(&t, "gw", lines)?, "a", 1, 200)?;
    expect_circuit(&t, "gw", "a", 0)?;
    expect_attempts(&t, "gw", &[("a", "server_error", 3), ("a", "ok", 4), ("b", "ok", 6)])?;

    // --- Both targets fail: the SDK sees the last provider error (B's 503), passed through.
    a.set_fault(json!({"status": 503}))?;
    b.set_fault(json!({"status": 503}))?;
    let r = burst(&gw, &["--mode", "sdk", "--base-url", &base, "--prompt", "everything is down"])?;
    a.clear_fault()?;
    b.clear_fault()?;
    assert_delta("a", &a, ca, (1, 0))?;
    assert_delta("b", &b, cb, (1, 0))?;
    let err = &r["errors"][0];
    ensure!(
        r["statuses"] == json!({"503": 1})
            && err["api_status_error"] == json!(true)
            && err["class"] == json!("InternalServerError"),
        "want the SDK to raise APIStatusError (InternalServerError) 503, got {r}"
    );
    ensure!(
        err["body"]["message"] == json!("Mock fault injected: HTTP 503")
            && err["body"]["type"] == json!("server_error"),
        "the SDK did not get the provider's own error body: {r}"
    );
    ensure!(r["served_by"] == json!({"b": 1}), "the error returned should be B's (last attempt), got {r}");
    lines += 1;
    assert_served(&nth_line(&t, "gw", lines)?, "b", 2, 503)?;
    expect_attempts(&t, "gw", &[("a", "server_error", 4), ("b", "server_error", 1), ("b", "ok", 6)])?;

    // --- The only target is unreachable: tollgate's own 502, an OpenAI error object.
    let dead = format!("http://{dead_vip}/v1");
    let r = burst(&gw, &["--mode", "sdk", "--base-url", &dead, "--prompt", "nobody home"])?;
    let err = &r["errors"][0];
    ensure!(
        r["statuses"] == json!({"502": 1})
            && err["api_status_error"] == json!(true)
            && err["class"] == json!("InternalServerError"),
        "want the SDK to raise APIStatusError 502 for an unreachable target, got {r}"
    );
    ensure!(r["served_by"] == json!({"none": 1}), "a provider answered for an unreachable target: {r}");
    // The SDK hands over `error`'s content as `body`.
    assert_tollgate_error(&json!({"error": err["body"]}), "upstream_error", "all_targets_failed")?;
    let raw = curl_post(
        &gw,
        &format!("{dead}/chat/completions"),
        &["Authorization: Bearer placeholder"],
        &ChatRequest::simple("gpt-4o-mini", "nobody home").to_json(),
    )?;
    ensure!(raw.exit == 0 && raw.http_code == 502, "want HTTP 502 from tollgate: {}", raw.describe());
    let body: Value =
        serde_json::from_slice(&raw.body).map_err(|e| anyhow!("502 body is not JSON ({e}): {}", raw.text()))?;
    assert_tollgate_error(&body, "upstream_error", "all_targets_failed")?;
    ensure!(
        raw.header("content-type").is_some_and(|c| c.starts_with("application/json")),
        "502 content-type: {}",
        raw.describe()
    );
    expect_attempts(&t, "dead", &[("dead", "connect", 2)])?;
    let dl = route_lines(&t, "dead", 2)?;
    ensure!(dl.iter().all(|l| l["status"] == json!(502)), "dead route access log: {dl:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// g6: weighted split and model aliases
// ---------------------------------------------------------------------------------------------

/// Weighted balancing and model aliases.
/// * Route `gw`: A weight 1, B weight 3 (`weighted`): 1000 non-streamed calls from the agent's
///   cgroup split 250/750 within 5% of each share, the same by the mocks' counters, by the
///   `x-mock-name` of the responses the client got and by `tollgate_upstream_attempts_total
///   {outcome="ok"}`.
/// * Route `alias`: `{A, model small-1, alias fast}`, `{B, model large-1, alias smart}`: an agent
///   asking for `fast` is served by A, which receives `small-1`; `smart` by B with `large-1`; the
///   access log keeps the requested alias in `request_model`.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g6_weighted_split_and_model_alias() -> Result<()> {
    let gw = Gw::new("g6-agent", 8113)?;
    let alias_vip = vip(8114);
    let (key_a, key_b) = ("sk-g6-provider-a", "sk-g6-provider-b");
    let a = gw.mock("a", &[key_a], &[])?;
    let b = gw.mock("b", &[key_b], &[])?;
    let (ka, kb) = (gw.key_file("a", key_a)?, gw.key_file("b", key_b)?);
    let t = gateway(
        &gw,
        json!([openai_provider("a", &a, &ka), openai_provider("b", &b, &kb)]),
        &[
            (
                "gw",
                gw.vip,
                json!({
                    "targets": [{"provider": "a", "weight": 1}, {"provider": "b", "weight": 3}],
                    "balance": {"strategy": "weighted"},
                }),
            ),
            (
                "alias",
                alias_vip,
                json!({
                    "targets": [
                        {"provider": "a", "model": "small-1", "model_alias": "fast"},
                        {"provider": "b", "model": "large-1", "model_alias": "smart"},
                    ],
                }),
            ),
        ],
        json!({}),
    )?;

    // --- 1000 calls, keep-alive, four at a time.
    const N: u64 = 1000;
    let started = Instant::now();
    let r = burst(&gw, &["--base-url", &gw.url("/v1"), "--count", &N.to_string(), "--concurrency", "4", "--vary"])?;
    let took = started.elapsed();
    ensure!(r["ok"] == json!(N), "not every call succeeded: {r}");
    let (na, nb) = (a.counter("openai_chat")?, b.counter("openai_chat")?);
    ensure!(na + nb == N, "the mocks served {na} + {nb} calls, the client made {N}");
    let within = |got: u64, want: f64| (got as f64 - want).abs() <= want * 0.05;
    ensure!(
        within(na, N as f64 * 0.25) && within(nb, N as f64 * 0.75),
        "weights 1:3 over {N} calls: want 250/750 within 5%, A served {na}, B served {nb}"
    );
    ensure!(
        r["served_by"] == json!({"a": na, "b": nb}),
        "responses the client got name other providers than the mocks counted ({na}/{nb}): {}",
        r["served_by"]
    );
    expect_attempts(&t, "gw", &[("a", "ok", na), ("b", "ok", nb)])?;
    let logged = route_lines(&t, "gw", N as usize)?;
    let by = |target: &str| logged.iter().filter(|l| l["target"] == json!(target) && l["status"] == json!(200)).count();
    ensure!(
        (logged.len(), by("a") as u64, by("b") as u64) == (N as usize, na, nb),
        "access log: {} lines, {} by a, {} by b; the mocks served {na}/{nb}",
        logged.len(),
        by("a"),
        by("b")
    );
    let m = t.metrics()?;
    let failed: f64 =
        m.select(ATTEMPTS, &[("route", "gw")]).filter(|s| s.labels["outcome"] != "ok").map(|s| s.value).sum();
    ensure!(failed == 0.0, "failed attempts during the split:\n{}", m.dump(ATTEMPTS));
    eprintln!("g6: {N} calls in {took:?} (client {} ms): A {na}, B {nb}", r["elapsed_ms"]);

    // --- Aliases pick the target and the model it is asked for.
    let alias_base = format!("http://{alias_vip}/v1");
    let mut n = 0;
    for (alias, m, key, other, model, target) in
        [("fast", &a, key_a, &b, "small-1", "a"), ("smart", &b, key_b, &a, "large-1", "b")]
    {
        let before = (seen(m)?, seen(other)?);
        let v = sdk_chat(&gw, &alias_base, alias, &format!("which model is {alias}?"))?;
        assert_delta(target, m, before.0, (1, 1))?;
        assert_delta("other", other, before.1, (0, 0))?;
        let (rec, reply) = recorded_chat(m, key)?;
        ensure!(
            rec["body_json"]["model"] == json!(model),
            "alias {alias}: provider {target} was asked for {}, want {model}",
            rec["body_json"]["model"]
        );
        assert_sdk_reply(&v, &reply)?;
        n += 1;
        let line = nth_line(&t, "alias", n)?;
        assert_served(&line, target, 1, 200)?;
        ensure!(line["request_model"] == json!(alias), "access log request_model: want {alias:?}: {line}");
        assert_line_tokens(&line, reply.prompt_tokens, reply.completion_tokens)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// g7: key rotation, and no key anywhere tollgate writes
// ---------------------------------------------------------------------------------------------

/// Provider-key rotation and secrecy. The provider key file holds `sk-rot-old-<random>`; the
/// agent sends `placeholder` and the provider receives the old key. The file is replaced
/// atomically (temp file + rename) with `sk-rot-new-<random>`: tollgate logs the reload and the
/// very next call carries the new key. Then neither key (nor its random part) appears in
/// tollgate's stdout (access log), stderr, `/metrics`, the clients' outputs, or the error
/// bodies tollgate makes (unreachable target: 502; attempt timeout on the only target: 504).
/// Spans are covered too: they are built from the same `LlmCall` record as the access log,
/// which holds no key (there is no OTLP receiver in this scenario).
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g7_key_rotation_and_no_key_leak() -> Result<()> {
    let gw = Gw::new("g7-agent", 8115)?;
    let dead_vip = vip(8116);
    let tag = random_hex();
    let (old, new, dead_key) = (format!("sk-rot-old-{tag}"), format!("sk-rot-new-{tag}"), format!("sk-rot-dead-{tag}"));
    let m = gw.mock("p", &[&old, &new], &[])?;
    let key = gw.key_file("p", &old)?;
    let kd = gw.key_file("dead", &dead_key)?;
    let failover = json!({"attempt_timeout": "800ms", "max_attempts": 2});
    let t = gateway(
        &gw,
        json!([
            openai_provider("p", &m, &key),
            {"name": "dead", "kind": "openai", "base_url": closed_base(), "credentials": {"file": kd}},
        ]),
        &[
            ("gw", gw.vip, json!({"targets": [{"provider": "p"}], "failover": failover})),
            ("dead", dead_vip, json!({"targets": [{"provider": "dead"}], "failover": failover})),
        ],
        json!({}),
    )?;
    let base = gw.url("/v1");
    let mut client_out = String::new();
    let reloaded = |t: &Tollgate| {
        t.stderr_tail(100_000)
            .lines()
            .filter(|l| l.contains("provider key reloaded") && l.contains(&*key.to_string_lossy()))
            .count()
    };

    // --- The old key.
    let v = sdk_chat(&gw, &base, "gpt-4o-mini", "which key?")?;
    client_out.push_str(&v.to_string());
    let (_, reply) = recorded_chat(&m, &old)?;
    assert_sdk_reply(&v, &reply)?;
    ensure!(reloaded(&t) == 0, "a reload was logged before the key changed:\n{}", t.stderr_tail(30));

    // --- Rotate: write a temp file, rename it over the key file.
    let tmp = gw.e.path(".p.key.tmp");
    std::fs::write(&tmp, format!("{new}\n"))?;
    std::fs::rename(&tmp, &key)?;
    let logged = wait_for(Duration::from_secs(5), Duration::from_millis(20), || (reloaded(&t) >= 1).then_some(()));
    ensure!(logged.is_some(), "no `provider key reloaded` for {} within 5 s:\n{}", key.display(), t.stderr_tail(30));
    let v = sdk_chat(&gw, &base, "gpt-4o-mini", "which key now?")?;
    client_out.push_str(&v.to_string());
    let (_, reply) = recorded_chat(&m, &new)?;
    assert_sdk_reply(&v, &reply)?;
    ensure!(m.counter("openai_chat")? == 2, "the mock served {} calls, want 2", m.counter("openai_chat")?);

    // --- Errors tollgate makes itself carry no key either.
    let chat = ChatRequest::simple("gpt-4o-mini", "fail please").to_json();
    let auth = ["Authorization: Bearer placeholder"];
    let unreachable = curl_post(&gw, &format!("http://{dead_vip}/v1/chat/completions"), &auth, &chat)?;
    ensure!(unreachable.http_code == 502, "unreachable target: want 502: {}", unreachable.describe());
    let body: Value = serde_json::from_slice(&unreachable.body)
        .map_err(|e| anyhow!("502 body is not JSON ({e}): {}", unreachable.text()))?;
    assert_tollgate_error(&body, "upstream_error", "all_targets_failed")?;
    m.set_fault(json!({"delay_ms": 2000, "status": 503, "count": 1}))?;
    let slow = curl_post(&gw, &format!("{base}/chat/completions"), &auth, &chat)?;
    ensure!(slow.http_code == 504, "attempt timeout on the only target: want 504: {}", slow.describe());
    let body: Value =
        serde_json::from_slice(&slow.body).map_err(|e| anyhow!("504 body is not JSON ({e}): {}", slow.text()))?;
    assert_tollgate_error(&body, "upstream_error", "upstream_timeout")?;
    let sdk_err = burst(&gw, &["--mode", "sdk", "--base-url", &format!("http://{dead_vip}/v1")])?;
    ensure!(sdk_err["statuses"] == json!({"502": 1}), "SDK against the unreachable target: {sdk_err}");
    for c in [&unreachable, &slow] {
        client_out.push_str(&format!("{:?}\n{}\n{}\n", c.headers, c.text(), c.stderr));
    }
    client_out.push_str(&sdk_err.to_string());
    route_lines(&t, "gw", 3)?;
    route_lines(&t, "dead", 2)?;

    // --- Nowhere: stdout, stderr, metrics, client outputs, error bodies.
    let (st, metrics) = tollgate_e2e::http_get(t.admin, "/metrics", Duration::from_secs(5))?;
    ensure!(st == 200, "/metrics: HTTP {st}");
    let stdout = t.stdout_lines().join("\n");
    let stderr = t.stderr_tail(1_000_000);
    ensure!(!stdout.is_empty() && !stderr.is_empty() && metrics.contains(ATTEMPTS), "nothing to search");
    for (what, text) in
        [("stdout (access log)", &stdout), ("stderr", &stderr), ("/metrics", &metrics), ("client output", &client_out)]
    {
        for secret in [&old, &new, &dead_key, &tag] {
            ensure!(
                !text.contains(secret.as_str()),
                "{what} contains the provider key (or its part {secret:?}):\n{text}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// g8: Gemini and Azure OpenAI providers over HTTP/2 (TLS)
// ---------------------------------------------------------------------------------------------
