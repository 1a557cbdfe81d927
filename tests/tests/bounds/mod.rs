//! Bounds on the work one request can make tollgate do (issue 13, defect 9), against the real
//! tollgate binary (capture off, explicit `listener` routes to the mock, no key injected):
//!
//! * `bounds_a`: a client that trickles its upload gets 408 in its API's shape (OpenAI and
//!   Anthropic) after `limits.body_read_timeout`, and the upstream sees nothing.
//! * `bounds_b`: 64 concurrent 4 MiB bodies against a 16 MiB `limits.max_buffered_body_bytes`:
//!   at most 4 are read and forwarded, the rest get 503 with `retry-after` before their body is
//!   read, and tollgate's peak RSS (measured from /proc) stays under a bound derived from the
//!   budget, far below what buffering all 64 would take.
//! * `bounds_c`: a JSON-RPC batch longer than `mcp.max_batch_len` is refused with -32600 naming
//!   the limit on a captured-style MCP route and on a federation endpoint, and never forwarded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, ensure, free_port, http_request, Context, Result};

use crate::support::{env, wait_metric, Env, MODEL};

const REFUSALS: &str = "tollgate_bound_refusals_total";

fn listener() -> Result<SocketAddr> {
    Ok(format!("127.0.0.1:{}", free_port("127.0.0.1")).parse()?)
}

/// A tollgate (capture off) with gateway listener routes to the mock: `gw` OpenAI-shaped,
/// `gw-anthropic` Anthropic-shaped, plus `extra` merged into the config.
fn gateway(e: &Env, mock: &MockLlm, extra: Value) -> Result<(Tollgate, SocketAddr, SocketAddr)> {
    let (openai, anthropic) = (listener()?, listener()?);
    let mut cfg = json!({
        "capture": {"enabled": false},
        "providers": [{"name": "mock", "kind": "openai_compatible", "base_url": format!("http://{}/v1", mock.http[0])}],
        "routes": [
            {"name": "gw", "listener": openai.to_string(), "targets": [{"provider": "mock"}]},
            {"name": "gw-anthropic", "listener": anthropic.to_string(), "provider": "anthropic", "targets": [{"provider": "mock"}]},
        ],
    });
    tollgate_e2e::merge(&mut cfg, extra);
    Ok((e.tollgate(cfg, None)?, openai, anthropic))
}

/// API requests the mock received (any path).
fn mock_total(mock: &MockLlm) -> Result<u64> {
    mock.stats(None)?["total"].as_u64().ok_or_else(|| anyhow!("mock stats without total"))
}

/// A response read off a raw socket: status, lower-cased headers, body.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("HTTP {} body not JSON: {}", self.status, self.body))
    }
}

/// Read one response head (and, for a final response, its `content-length` body).
fn read_response(r: &mut BufReader<TcpStream>) -> Result<Raw> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut raw = Raw { status, headers, body: String::new() };
    if status >= 200 {
        let len: usize = raw.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        raw.body = String::from_utf8_lossy(&body).into_owned();
    }
    Ok(raw)
}

/// `VmRSS` or `VmHWM` of `pid` in bytes, from `/proc/<pid>/status`.
fn proc_mem(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn bounds_a_slow_upload_gets_408_in_the_callers_shape_and_never_reaches_the_upstream() -> Result<()> {
    let e = env()?;
    let mock = e.mock(&["--listen", "127.0.0.1:0"])?;
    let timeout = Duration::from_secs(1);
    let (t, openai, anthropic) = gateway(&e, &mock, json!({"limits": {"body_read_timeout": "1s"}}))?;
    for (addr, path) in [(openai, "/v1/chat/completions"), (anthropic, "/v1/messages")] {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = s.try_clone()?;
        // A body of 200 bytes declared, 20 sent, then nothing: a trickling upload.
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"model\":\"{MODEL}\","
        );
        let t0 = Instant::now();
        w.write_all(head.as_bytes())?;
        let r = read_response(&mut BufReader::new(s))?;
        let waited = t0.elapsed();
        ensure!(r.status == 408, "{path}: HTTP {} {}", r.status, r.body);
        ensure!(waited >= timeout && waited < timeout * 10, "{path}: answered after {waited:?}, timeout {timeout:?}");
        let v = r.json()?;
        if path == "/v1/messages" {
            ensure!(v["type"] == "error" && v["error"]["type"] == "timeout_error", "Anthropic shape: {v}");
        } else {
            ensure!(v["error"]["code"] == "request_body_timeout", "OpenAI shape: {v}");
            ensure!(v["error"]["type"] == "invalid_request_error", "OpenAI shape: {v}");
        }
        let msg = v["error"]["message"].as_str().unwrap_or("");
        ensure!(msg.starts_with("tollgate: ") && msg.contains("limits.body_read_timeout"), "message: {msg}");
    }
    ensure!(mock_total(&mock)? == 0, "a timed-out request reached the upstream");
    wait_metric(&t, REFUSALS, &[("bound", "limits.body_read_timeout")], 2.0)?;
    // A body sent in time is served on the same listener.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let (st, _, text) = http_request(
        openai,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer sk-test-e2e")],
        Some(&serde_json::to_vec(&body)?),
        Duration::from_secs(30),
    )?;
    ensure!(st == 200, "prompt body: HTTP {st} {text}");
    ensure!(mock_total(&mock)? == 1, "the prompt call reached the mock once");
    Ok(())
}

/// What one of the concurrent clients of `bounds_b` saw.
struct Outcome {
    /// Final status.
    status: u16,
    /// From sending the head to tollgate's first answer (100 Continue or the final status).
    first_answer: Duration,
    raw: Raw,
}

/// POST `body` with `Expect: 100-continue`: the body is sent only if tollgate asks for it, so
/// a refusal before reading is seen as such (no reset of a half-sent upload).
fn post_expecting(addr: SocketAddr, body: &[u8], start: &Barrier) -> Result<Outcome> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nAuthorization: Bearer sk-test-e2e\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    start.wait();
    let t0 = Instant::now();
    w.write_all(head.as_bytes())?;
    let first = read_response(&mut r)?;
    let first_answer = t0.elapsed();
    let raw = if first.status == 100 {
        w.write_all(body)?;
        read_response(&mut r)?
    } else {
        first
    };
    Ok(Outcome { status: raw.status, first_answer, raw })
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn bounds_b_many_large_bodies_at_once_stay_within_the_buffered_bytes_budget() -> Result<()> {
    const CLIENTS: usize = 64;
    const BODY: usize = 4 << 20;
    const BUDGET: usize = 16 << 20;
    const HOLD: Duration = Duration::from_secs(3);
    let e = env()?;
    let mock = e.mock(&["--listen", "127.0.0.1:0"])?;
    let limits = json!({"limits": {"max_request_body_bytes": 5 << 20, "max_buffered_body_bytes": BUDGET}});
    let (t, openai, _) = gateway(&e, &mock, limits)?;
    let pid = t.pid().ok_or_else(|| anyhow!("tollgate has no pid"))?;
    // Admitted calls hold their bodies while the mock takes HOLD to answer, so the budget
    // stays taken while the other clients arrive.
    mock.set_fault(json!({"delay_ms": HOLD.as_millis() as u64}))?;
    let prefix = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":""#);
    let suffix = r#""}]}"#;
    let filler = "word ".repeat((BODY - prefix.len() - suffix.len()) / 5 + 1);
    let mut body = format!("{prefix}{filler}").into_bytes();
    body.truncate(BODY - suffix.len());
    body.extend_from_slice(suffix.as_bytes());
    ensure!(body.len() == BODY && serde_json::from_slice::<Value>(&body).is_ok(), "test body");
    let body = Arc::new(body);
    let rss_before = proc_mem(pid, "VmRSS")?;
    let start = Arc::new(Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (body, start) = (body.clone(), start.clone());
            std::thread::spawn(move || post_expecting(openai, &body, &start))
        })
        .collect();
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.join().map_err(|_| anyhow!("client thread panicked"))??);
    }
    let peak = proc_mem(pid, "VmHWM")?;
    let slowest_first = outcomes.iter().map(|o| o.first_answer).max().unwrap_or_default();
    // Every client was answered (admitted or refused) while the first admitted bodies were
    // still held: otherwise a late client could legitimately take a freed budget.
    ensure!(slowest_first < HOLD, "a client waited {slowest_first:?} for its first answer: the run is not concurrent");
    let ok = outcomes.iter().filter(|o| o.status == 200).count();
    let refused: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == 503).collect();
    let fit = BUDGET / BODY;
    println!(
        "bounds_b: {ok} served, {} refused of {CLIENTS}; RSS before {} MiB, peak {} MiB",
        refused.len(),
        rss_before >> 20,
        peak >> 20
    );
    ensure!(ok + refused.len() == CLIENTS, "statuses: {:?}", outcomes.iter().map(|o| o.status).collect::<Vec<_>>());
    ensure!((1..=fit).contains(&ok), "{ok} bodies served, the budget fits {fit}");
    for o in &refused {
        let v = o.raw.json()?;
        ensure!(v["error"]["code"] == "body_budget_exhausted", "503 body: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        ensure!(msg.contains("limits.max_buffered_body_bytes"), "503 message: {msg}");
        ensure!(o.raw.header("retry-after") == Some("1"), "503 without retry-after: {:?}", o.raw.headers);
    }
    // The upstream got exactly the admitted calls, nothing of the refused ones.
    ensure!(mock_total(&mock)? == ok as u64, "mock saw {} requests, {ok} were served", mock_total(&mock)?);
    wait_metric(&t, REFUSALS, &[("bound", "limits.max_buffered_body_bytes")], refused.len() as f64)?;
    wait_metric(&t, "tollgate_buffered_body_bytes", &[], 0.0)?;
    // Memory: what the budget admits, plus for each admitted call the uncharged working copies
    // of its body (the parsed request and the body sent upstream: 2 more), plus the per-client
    // connection state (hyper read buffers, at most 512 KiB each when headers only were read).
    // Buffering every body at once would take CLIENTS × BODY (256 MiB) on top of that.
    let bound = rss_before + (fit * BODY * 3 + CLIENTS * (512 << 10)) as u64;
    ensure!(
        peak < bound,
        "peak RSS {} MiB above the bound {} MiB (before: {} MiB)",
        peak >> 20,
        bound >> 20,
        rss_before >> 20
    );
    Ok(())
}

/// POST `body` to `addr` `path`, returning status and JSON.
fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Result<(u16, Value)> {
    let (st, _, text) = http_request(
        addr,
        "POST",
        path,
        &[("Accept", "application/json, text/event-stream")],
        Some(&serde_json::to_vec(body)?),
        Duration::from_secs(30),
    )?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((st, v))
}

fn batch(n: usize) -> Value {
    Value::Array((0..n).map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "tools/list"})).collect())
}

fn is_batch_refusal(v: &Value, max: usize) -> bool {
    v["error"]["code"] == -32600
        && v["error"]["data"]["max_batch_len"] == max
        && v["error"]["message"].as_str().is_some_and(|m| m.contains(&format!("mcp.max_batch_len: {max}")))
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn bounds_c_long_json_rpc_batches_are_refused_and_never_forwarded() -> Result<()> {
    const MAX: usize = 4;
    let e = env()?;
    let mock = e.mock(&["--listen", "127.0.0.1:0", "--record-requests", "1000"])?;
    let (mcp, fed) = (listener()?, listener()?);
    let t = e.tollgate(
        json!({
            "capture": {"enabled": false},
            "mcp": {
                "max_batch_len": MAX,
                "federations": [{"name": "f", "servers": [{"name": "s", "url": format!("http://{}/fed-server", mock.http[0])}]}],
            },
            "routes": [
                {"name": "mcp", "protocol": "mcp", "listener": mcp.to_string(), "upstream": format!("http://{}", mock.http[0])},
                {"name": "fed", "protocol": "mcp", "listener": fed.to_string(), "federation": "f"},
            ],
        }),
        None,
    )?;
    // POSTs the mock received on the MCP route's path (the federation talks to its server on
    // another path, on its own schedule).
    let forwarded = || -> Result<usize> { Ok(mock.requests()?.iter().filter(|r| r["path"] == "/mcp").count()) };
    let (st, v) = post_json(mcp, "/mcp", &batch(MAX + 1))?;
    ensure!(st == 400 && is_batch_refusal(&v, MAX), "MCP route, batch of {}: HTTP {st} {v}", MAX + 1);
    let (st, v) = post_json(mcp, "/mcp", &batch(500))?;
    ensure!(st == 400 && is_batch_refusal(&v, MAX), "MCP route, batch of 500: HTTP {st} {v}");
    ensure!(forwarded()? == 0, "a refused batch reached the server");
    // A batch at the limit is forwarded (the mock, no MCP server, answers 404: it was sent).
    let (st, _) = post_json(mcp, "/mcp", &batch(MAX))?;
    ensure!(st == 404, "MCP route, batch of {MAX}: HTTP {st}");
    ensure!(forwarded()? == 1, "the batch at the limit was forwarded once");
    // Federation: the batch cap answers before anything else (here: the missing session).
    let (st, v) = post_json(fed, "/mcp", &batch(MAX + 1))?;
    ensure!(st == 400 && is_batch_refusal(&v, MAX), "federation, batch of {}: HTTP {st} {v}", MAX + 1);
    let (st, v) = post_json(fed, "/mcp", &batch(MAX))?;
    ensure!(st == 400 && !is_batch_refusal(&v, MAX), "federation, batch at the limit: HTTP {st} {v}");
    ensure!(forwarded()? == 1, "nothing more reached the MCP route's server");
    wait_metric(&t, REFUSALS, &[("bound", "mcp.max_batch_len")], 3.0)?;
    let logged = |t: &Tollgate| {
        t.access_log().iter().filter(|l| l["error"].as_str().is_some_and(|e| e.contains("mcp.max_batch_len"))).count()
    };
    let lines =
        tollgate_e2e::wait_for(Duration::from_secs(5), Duration::from_millis(100), || (logged(&t) == 2).then_some(()));
    ensure!(lines.is_some(), "access-log lines naming the batch refusal: {} (want 2)", logged(&t));
    Ok(())
}
