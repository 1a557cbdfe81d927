//! Issue 13: how streams end and what a body tollgate cannot read may do, with the real SDKs.
//!
//! - An SDK that stops reading at the terminal event and closes before the chunked body's
//!   end arrives (the mock holds the end back 300 ms) made a complete call: no error in the
//!   access log, no `error_type` on the duration histogram. The `openai` SDK also never sees the
//!   `"usage": null` tollgate's injected `include_usage` makes OpenAI add to every chunk.
//! - An agent that closes after the first text chunk still pays the output it received: a
//!   completion-token limit trips after exactly the number of calls the mock's deterministic
//!   output predicts (closing early used to settle 0 output tokens, so it never tripped).
//! - A body a lenient provider accepts but `serde_json` refuses (trailing comma, BOM, `NaN`)
//!   is refused with a 400 in the caller's API shape where guards or limits apply, and never
//!   reaches the provider; where none applies it is forwarded as before.

use serde_json::{json, Value};
use tollgate_e2e::anthropic::{self as ant, MessagesRequest};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::python;
use tollgate_e2e::openai::{self as oa, ChatRequest};
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, ensure, Result};

use super::{config, json_of};
use crate::gateway::{last_request, parse_client};
use crate::support::{env, wait_metric, MODEL};

/// Run `sdk_streams.py` for `sdk` with `request` in `g`; its JSON line.
fn sdk(g: &Group, sdk: &str, mode: &str, request: &Value) -> Result<Value> {
    let env_vars = [
        ("OPENAI_API_KEY", "sk-test-e2e"),
        ("OPENAI_BASE_URL", "http://127.0.0.2:8000/v1"),
        ("ANTHROPIC_API_KEY", "sk-ant-test-e2e"),
        ("ANTHROPIC_BASE_URL", "http://127.0.0.2:8000"),
    ];
    let out = python(
        Some(g),
        None,
        "sdk_streams.py",
        &["--sdk", sdk, "--mode", mode, "--request", &request.to_string()],
        &env_vars,
    )?;
    parse_client("sdk_streams.py", &out)
}

/// The access-log lines of LLM calls on the governance route, waiting until there are `n`.
fn lines(t: &Tollgate, n: usize) -> Result<Vec<Value>> {
    tollgate_e2e::wait_for(std::time::Duration::from_secs(5), std::time::Duration::from_millis(50), || {
        let v: Vec<Value> =
            t.access_log().into_iter().filter(|l| l["kind"] == "llm" && l["route"] == "local-llm").collect();
        (v.len() >= n).then_some(v)
    })
    .ok_or_else(|| anyhow!("fewer than {n} llm access-log lines; stdout:\n{}", t.stdout_lines().join("\n")))
}

/// Complete streams closed before the body's end are not errors; no `"usage": null`.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn gov_stream_closed_at_its_terminal_event_is_complete() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("govd-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000", "--chunk-delay-ms", "2"])?;
    let t = e.tollgate(config(&mock, &[(&g, "govd-agent")], json!({})), None)?;
    // The body's end (chunked terminator) arrives 300 ms after the terminal event.
    mock.set_fault(json!({"end_delay_ms": 300}))?;

    let chat =
        json!({"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": "Six words on eBPF."}]});
    let msgs = json!({"model": "claude-sonnet-4-5", "max_tokens": 6, "messages": [{"role": "user", "content": "Six words on eBPF."}]});
    let calls: &[(&str, &Value)] = &[("openai", &chat), ("openai", &chat), ("anthropic", &msgs), ("openai", &chat)];
    for (i, (kind, req)) in calls.iter().enumerate() {
        let v = sdk(&g, kind, "full", req)?;
        ensure!(v["ok"] == true, "{kind} call failed: {v}");
        let seen = last_request(&mock)?;
        let (want_text, want_out) = if *kind == "openai" {
            ensure!(seen["body_json"]["stream_options"]["include_usage"] == true, "usage not asked for: {seen}");
            let r = oa::reply_for(&ChatRequest::from_json(&seen["body_json"]).map_err(|e| anyhow!(e))?);
            // What the provider sends a client that did not ask for usage: no `usage` key in
            // any chunk, no usage-only chunk.
            for c in v["chunks"].as_array().into_iter().flatten() {
                ensure!(
                    !c["fields"].as_array().is_some_and(|f| f.contains(&json!("usage"))) && c["choices"] != 0,
                    "the SDK was handed usage it did not ask for: {c}\n{v}"
                );
            }
            (r.words.concat(), r.completion_tokens)
        } else {
            let r = ant::reply_for(&MessagesRequest::from_json(&seen["body_json"], false).map_err(|e| anyhow!(e))?);
            (r.text.clone(), r.output_tokens)
        };
        ensure!(v["text"] == json!(want_text), "{kind}: text {v} want {want_text:?}");
        let l = lines(&t, i + 1)?;
        let line = &l[i];
        ensure!(
            line.get("error").is_none_or(Value::is_null) && line["status"] == 200,
            "{kind}: a complete stream was logged as failed: {line}"
        );
        ensure!(line["output_tokens"] == json!(want_out) && line["tokens_estimated"] == false, "{kind}: {line}");
    }
    let agent = [("agent", "govd-agent")];
    wait_metric(&t, "gen_ai_client_operation_duration_seconds_count", &agent, calls.len() as f64)?;
    let m = t.metrics()?;
    let failed = m
        .sum("gen_ai_client_operation_duration_seconds_count", &[("agent", "govd-agent"), ("error_type", "transport")]);
    ensure!(failed == 0.0, "complete streams counted as transport errors: {failed}\n{}", m.dump("gen_ai_"));
    let ok = m.sum("gen_ai_client_operation_duration_seconds_count", &[("agent", "govd-agent"), ("error_type", "")]);
    ensure!(ok == calls.len() as f64, "calls without error_type: {ok}\n{}", m.dump("gen_ai_"));
    Ok(())
}

/// Closing after the first text chunk cannot evade a completion-token limit.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn gov_stream_closed_early_still_pays_output_tokens() -> Result<()> {
    const LIMIT: u64 = 12;
    const MAX_TOKENS: u64 = 5;
    let e = env()?;
    let g = e.cg.group("gove-agent")?;
    // 300 ms between events: the agent has long closed before the next one is due.
    let mock = e.mock(&["--listen", "127.0.0.2:8000", "--chunk-delay-ms", "300"])?;
    let limits = json!({"rate_limits": {"policies": [{"name": "out", "match": {"agent": "gove-agent"},
        "limits": [{"limit": LIMIT, "window": "month", "count": "completion"}]}]}});
    let t = e.tollgate(config(&mock, &[(&g, "gove-agent")], limits), None)?;
    let req =
        json!({"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "Count to five."}]});

    let mut per_call = None;
    let mut admitted = 0u64;
    let mut expected = None;
    for i in 0..20u64 {
        let v = sdk(&g, "openai", "first", &req)?;
        if v["ok"] != true {
            ensure!(v["status"] == 429, "call {i}: {v}");
            break;
        }
        admitted += 1;
        let seen = last_request(&mock)?;
        let r = oa::reply_for(&ChatRequest::from_json(&seen["body_json"]).map_err(|e| anyhow!(e))?);
        ensure!(v["text"] == json!(r.words[0]), "the agent read one word: {v}");
        // What the agent received: the role chunk (no text) and the first word.
        let out = tollgate::protocol::llm::estimate::count(&r.words[0]);
        ensure!(out > 0 && per_call.is_none_or(|p| p == out), "deterministic output: {out}");
        per_call = Some(out);
        // Calls admitted while used + max_tokens fits: used grows by `out` per call.
        let want = (0..).find(|k| k * out + MAX_TOKENS > LIMIT).expect("finite");
        expected = Some(want);
        let line = &lines(&t, i as usize + 1)?[i as usize];
        ensure!(
            line["output_tokens"] == json!(out) && line["tokens_estimated"] == true,
            "call {i}: the output delivered before the agent closed is counted: {line}"
        );
        ensure!(admitted <= want, "admitted {admitted} calls, the limit allows {want}");
    }
    let want = expected.ok_or_else(|| anyhow!("no call admitted"))?;
    ensure!(admitted == want, "limit tripped after {admitted} calls, want {want} ({per_call:?} tokens per call)");
    wait_metric(&t, "tollgate_ratelimit_rejections_total", &[("agent", "gove-agent"), ("policy", "out")], 1.0)?;
    eprintln!("gov_stream_closed_early: {per_call:?} output tokens per early-closed call, limit {LIMIT} tripped after {admitted} calls");
    Ok(())
}

/// Bodies a lenient server accepts and `serde_json` refuses, with what the guard must not miss.
fn unreadable() -> Vec<(&'static str, Vec<u8>)> {
    let msg = r#"[{"role":"user","content":"mail jane.doe@example.com"}]"#;
    vec![
        ("trailing comma", format!(r#"{{"model":"{MODEL}","messages":{msg},}}"#).into_bytes()),
        ("BOM", [&b"\xef\xbb\xbf"[..], format!(r#"{{"model":"{MODEL}","messages":{msg}}}"#).as_bytes()].concat()),
        ("NaN", format!(r#"{{"model":"{MODEL}","temperature":NaN,"messages":{msg}}}"#).into_bytes()),
    ]
}

fn post_raw(e: &crate::support::Env, g: &Group, path: &str, body: &[u8]) -> Result<tollgate_e2e::client::CurlOut> {
    let file = e.path("govf-body.json");
    std::fs::write(&file, body)?;
    let data = format!("@{}", file.display());
    let url = format!("http://127.0.0.2:8000{path}");
    let args = ["-g", "-H", "Content-Type: application/json", "-H", "Authorization: Bearer sk-test-e2e"];
    tollgate_e2e::client::curl(
        Some(g),
        None,
        &[&args[..], &["-H", "x-api-key: sk-ant", "--data-binary", &data, &url]].concat(),
    )
}

/// Unreadable bodies: refused where a guard or limit applies, forwarded where none does.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn gov_unreadable_body_is_refused_where_guarded() -> Result<()> {
    let e = env()?;
    let guarded = e.cg.group("govf-guarded")?;
    let free = e.cg.group("govf-free")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let agents = [(&guarded, "govf-guarded"), (&free, "govf-free")];
    let policies = json!({
        "guardrails": [{"kind": "pii", "name": "pii", "roles": ["user"], "entities": {"email": "redact"}}],
    });
    let t = e.tollgate(config(&mock, &agents, policies), None)?;
    let bodies = unreadable();
    for (what, body) in &bodies {
        let r = post_raw(&e, &guarded, "/v1/chat/completions", body)?;
        ensure!(r.http_code == 400 && r.mock_peer().is_none(), "{what}: {}", r.describe());
        let v = json_of(&r)?;
        ensure!(v["error"]["code"] == "invalid_request_body", "{what}: OpenAI error shape: {v}");
        ensure!(v["error"]["message"].as_str().is_some_and(|m| m.contains("line 1 column")), "{what}: reason: {v}");
        // The Anthropic path answers in Anthropic's shape.
        let r = post_raw(&e, &guarded, "/v1/messages", body)?;
        let v = json_of(&r)?;
        ensure!(
            r.http_code == 400 && v["type"] == "error" && v["error"]["type"] == "invalid_request_error",
            "{what}: {v}"
        );
    }
    let total = mock.counter("total")?;
    ensure!(total == 0, "the provider saw {total} unreadable bodies: {:?}", mock.requests()?);
    wait_metric(
        &t,
        "tollgate_policy_denials_total",
        &[("agent", "govf-guarded"), ("policy", "request_body"), ("rule", "unreadable_json")],
        2.0 * bodies.len() as f64,
    )?;
    ensure!(t.stderr_tail(200).contains("unreadable_json"), "no audit line naming the reason");
    drop(t);

    // No guard; a limit that covers another agent only: the body goes through untouched.
    let policies = json!({"rate_limits": {"policies": [{"name": "p", "match": {"agent": "govf-guarded"},
        "limits": [{"limit": 100000, "window": "1h", "count": "total"}]}]}});
    let _t = e.tollgate(config(&mock, &agents, policies), None)?;
    for (i, (what, body)) in bodies.iter().enumerate() {
        let r = post_raw(&e, &free, "/v1/chat/completions", body)?;
        // The mock parses strictly and answers its own 400: it did see the body.
        ensure!(r.http_code == 400 && r.mock_peer().is_some(), "{what}: {}", r.describe());
        let seen = mock.requests()?;
        ensure!(seen.len() == i + 1, "{what}: not forwarded: {seen:?}");
        let r = post_raw(&e, &guarded, "/v1/chat/completions", body)?;
        ensure!(r.http_code == 400 && r.mock_peer().is_none(), "{what}: the limit covers this agent: {}", r.describe());
    }
    Ok(())
}
