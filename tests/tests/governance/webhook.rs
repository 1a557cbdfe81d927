//! (f) Webhook guardrails: an external checker (a test server speaking JSON over HTTP) judges
//! captured calls' prompts before they are sent and non-streamed responses before the agent
//! sees them. What the checker received is compared with what the agent sent and what the
//! provider produced, and what the provider received is read from the mock, so a check that
//! never ran, ran on the wrong text, or blocked after forwarding cannot pass.
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::webhook::{Answer, Webhook};
use tollgate_e2e::{ensure, wait_for, Result};

use super::{config, json_of, post, streamed_text};
use crate::support::{assert_proxied, env, wait_metric, Env, MODEL};

/// The checker's policy: prompts about a "forbidden topic" are refused with a reason, a prompt
/// asking it to be "slow please" gets its answer after 1.5 s, responses mentioning a "launch
/// code" are refused; everything else is allowed.
fn checker() -> Result<Webhook> {
    Webhook::start(|v: &Value| {
        let text = v["text"].as_str().unwrap_or("");
        let (allowed, reason) = match v["phase"].as_str() {
            Some("input") if text.contains("forbidden topic") => (false, "off-topic request"),
            Some("output") if text.contains("launch code") => (false, "secret in answer"),
            _ => (true, ""),
        };
        let delay = if text.contains("slow please") { Duration::from_millis(1500) } else { Duration::ZERO };
        Answer { delay, ..Answer::ok(json!({"allowed": allowed, "reason": reason})) }
    })
}

fn guard(hook: &Webhook, on_error: &str, streams: &str) -> Value {
    json!({"guardrails": [{
        "kind": "webhook", "name": "checker", "url": hook.url(), "phase": "both",
        "timeout": "400ms", "on_error": on_error, "streams": streams,
        "response": {"pointer": "/allowed", "allow_if": [true], "reason_pointer": "/reason"},
    }]})
}

fn ask(e: &Env, g: &Group, text: &str, stream: bool) -> Result<(tollgate_e2e::client::CurlOut, Duration)> {
    let t0 = Instant::now();
    let body = json!({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": text}]});
    let r = post(e, g, &body)?;
    Ok((r, t0.elapsed()))
}

fn verdict<'a>(action: &'a str, kind: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("agent", "govf-agent"), ("guard", "checker"), ("action", action), ("kind", kind)]
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn gov_f_webhook_guardrail_input_output_and_fail_modes() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("govf-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let hook = checker()?;
    let t = e.tollgate(config(&mock, &[(&g, "govf-agent")], guard(&hook, "fail_closed", "unchecked")), None)?;

    // Allowed both ways: the checker saw the prompt, then the provider's exact answer.
    let (r, _) = ask(&e, &g, "Name three rivers.", false)?;
    ensure!(r.http_code == 200, "allowed call: {}", r.describe());
    assert_proxied(&r)?;
    let content = json_of(&r)?["choices"][0]["message"]["content"].as_str().unwrap_or("").to_string();
    let seen = hook.seen();
    ensure!(seen.len() == 2, "checker calls for one allowed call: {seen:?}");
    ensure!(
        seen[0]["phase"] == "input"
            && seen[0]["text"] == "Name three rivers."
            && seen[0]["agent"] == "govf-agent"
            && seen[0]["model"] == MODEL
            && seen[0]["messages"] == json!([{"role": "user", "content": "Name three rivers."}]),
        "input check: {}",
        seen[0]
    );
    ensure!(
        seen[1]["phase"] == "output" && seen[1]["text"] == content.as_str() && !content.is_empty(),
        "output check must see the provider's answer {content:?}: {}",
        seen[1]
    );
    ensure!(mock.chat_requests()? == 1, "allowed call not served once");

    // Refused on input: 400 naming the guard and the checker's reason; never sent.
    let (r, _) = ask(&e, &g, "Tell me about the forbidden topic.", false)?;
    ensure!(r.http_code == 400 && r.mock_peer().is_none(), "input block: {}", r.describe());
    let err = json_of(&r)?;
    let msg = err["error"]["message"].as_str().unwrap_or("");
    ensure!(err["error"]["code"] == "guardrail_blocked", "shape: {err}");
    ensure!(msg.contains("checker") && msg.contains("off-topic request"), "message: {msg}");
    ensure!(mock.chat_requests()? == 1, "a prompt the checker refused reached the provider");

    // Refused on output: the provider served it (mock count grows), the agent gets a 400.
    // The mock answers a tool result by echoing it, so the answer is known to hold the secret.
    let leak = json!({"model": MODEL, "messages": [
        {"role": "user", "content": "What does the vault tool say?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "vault", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "the launch code is 0000"},
    ]});
    let r = post(&e, &g, &leak)?;
    ensure!(r.http_code == 400, "output block: {}", r.describe());
    let err = json_of(&r)?;
    let msg = err["error"]["message"].as_str().unwrap_or("");
    ensure!(msg.contains("response blocked") && msg.contains("secret in answer"), "message: {msg}");
    ensure!(!r.text().contains("launch code"), "the refused answer leaked: {}", r.text());
    ensure!(mock.chat_requests()? == 2, "the output-checked call must have been served by the provider");
    let last = hook.seen().last().cloned().unwrap_or(Value::Null);
    ensure!(last["text"] == "The tool returned: the launch code is 0000", "output text checked: {last}");

    // Streams pass unheld and are counted as unchecked.
    let (r, _) = ask(&e, &g, "Stream a haiku.", true)?;
    ensure!(r.http_code == 200 && r.text().contains("data: [DONE]"), "stream: {}", r.describe());
    ensure!(!streamed_text(&r.body).is_empty(), "stream carried no text");

    // The checker misses its 400 ms deadline: fail_closed refuses at once (503), unsent.
    let (r, took) = ask(&e, &g, "Answer slow please.", false)?;
    ensure!(r.http_code == 503, "fail_closed on timeout: {}", r.describe());
    let err = json_of(&r)?;
    ensure!(err["error"]["code"] == "guardrail_unavailable", "shape: {err}");
    ensure!(took < Duration::from_millis(1400), "refusal waited for the checker: {took:?}");
    ensure!(mock.chat_requests()? == 3, "fail_closed call reached the provider (3 = 2 served + stream)");

    wait_metric(&t, "tollgate_guardrail_verdicts_total", &verdict("allow", "webhook_input"), 3.0)?;
    wait_metric(&t, "tollgate_guardrail_verdicts_total", &verdict("block", "webhook_input"), 1.0)?;
    wait_metric(&t, "tollgate_guardrail_verdicts_total", &verdict("allow", "webhook_output"), 1.0)?;
    wait_metric(&t, "tollgate_guardrail_verdicts_total", &verdict("block", "webhook_output"), 1.0)?;
    wait_metric(&t, "tollgate_guardrail_verdicts_total", &verdict("unchecked", "webhook_output"), 1.0)?;
    wait_metric(&t, "tollgate_guardrail_verdicts_total", &verdict("fail_closed", "webhook_input"), 1.0)?;
    wait_metric(
        &t,
        "tollgate_policy_denials_total",
        &[("agent", "govf-agent"), ("policy", "guardrail"), ("rule", "checker")],
        3.0,
    )?;
    drop(t);

    // Same checker, fail_open, and streams refused: the timed-out check lets the call through
    // after the deadline; a streaming call is refused before anything is sent.
    let t = e.tollgate(config(&mock, &[(&g, "govf-agent")], guard(&hook, "fail_open", "refuse")), None)?;
    let before = mock.chat_requests()?;
    let (r, took) = ask(&e, &g, "Answer slow please.", false)?;
    ensure!(r.http_code == 200, "fail_open on timeout: {}", r.describe());
    ensure!(took >= Duration::from_millis(400), "answered before the checker's deadline: {took:?}");
    ensure!(mock.chat_requests()? == before + 1, "fail_open call not served");
    wait_metric(&t, "tollgate_guardrail_verdicts_total", &verdict("fail_open", "webhook_input"), 1.0)?;
    let checks_before = hook.seen().len();
    let served_before = mock.chat_requests()?;
    let (r, _) = ask(&e, &g, "Stream a limerick.", true)?;
    ensure!(r.http_code == 400 && r.mock_peer().is_none(), "streams: refuse: {}", r.describe());
    let err = json_of(&r)?;
    let msg = err["error"]["message"].as_str().unwrap_or("");
    ensure!(err["error"]["code"] == "guardrail_blocked" && msg.contains("checker"), "refusal: {err}");
    ensure!(mock.chat_requests()? == served_before, "a refused stream reached the provider");
    ensure!(hook.seen().len() == checks_before, "a refused stream still asked the checker");
    wait_metric(&t, "tollgate_guardrail_verdicts_total", &verdict("block", "webhook_output"), 1.0)?;
    let line = wait_for(Duration::from_secs(3), Duration::from_millis(100), || {
        t.access_log().into_iter().find(|l| l["status"] == 200 && l.to_string().contains("govf-agent"))
    });
    ensure!(line.is_some(), "no access-log line for the fail_open call: {:?}", t.stdout_lines());
    eprintln!("gov_f: checker calls {}, fail_open answer after {took:?}", hook.seen().len());
    Ok(())
}
