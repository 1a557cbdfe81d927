//! u3: the unmodified `anthropic` Python SDK, trusting only its provider's own CA (the mock's),
//! observed through the TLS uprobes: streamed messages with a tool call (the `tool_use` input
//! streamed as `input_json_delta` fragments), the streamed answer to its `tool_result`, and
//! non-streamed calls, all on the SDK's one keep-alive connection.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::client::python;
use tollgate_e2e::{anyhow, ensure, wait_for, Result};

use super::{assert_observed_tokens, setup_with, Observed, Opts};
use crate::support::wait_metric_at_least;

const HOST: &str = "api.anthropic.com";
const MODEL: &str = "claude-sonnet-4-6";
const AGENT: &str = "u3-agent";
/// Streamed tool call, streamed answer to its result, non-streamed, again.
const PLAN: &str = "tool,result,plain,tool,plain";

/// Run `anthropic_keepalive.py` with [`PLAN`] in the agent's cgroup and netns, the SDK left at
/// its default base URL (`https://api.anthropic.com`, the mock in this netns).
fn sdk_calls(o: &Observed) -> Result<Vec<Value>> {
    let env = [("ANTHROPIC_API_KEY", "sk-ant-agent-own-key"), ("SSL_CERT_FILE", o.mock_ca.as_str())];
    let out = python(Some(&o.g), Some(&o.ns), "anthropic_keepalive.py", &["--model", MODEL, "--plan", PLAN], &env)?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow!(
            "anthropic SDK run failed ({}, {e}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let calls = v.as_array().cloned().unwrap_or_default();
    ensure!(calls.len() == PLAN.split(',').count(), "calls {v}");
    Ok(calls)
}

/// How the agent's libssl came to be probed, from tollgate's log: in the scan at start (some
/// process on the machine mapped it already) or later, which with the rescans of this
/// scenario's config (no exec wake-ups, one periodic scan a minute) is the probe of the
/// connecting process before its TLS connection is spliced.
fn libssl_probe(o: &Observed) -> Result<&'static str> {
    let log = o.t.stderr_tail(400);
    let started = log.find("TLS uprobes attached").ok_or_else(|| anyhow!("no uprobe start in the log:\n{log}"))?;
    let probed = |l: &str| l.contains("TLS library probed") && l.contains("libssl.so");
    if log[..started].lines().any(probed) {
        Ok("probed at start (another process mapped it): the pre-splice probe was not needed")
    } else if log[started..].lines().any(probed) {
        Ok("probed on demand, before the agent's first connection was spliced")
    } else {
        Err(anyhow!("libssl never probed:\n{log}"))
    }
}
/// Sum of `usage.<key>` over `calls` as the SDK parsed them (NaN when one lacks it).
fn sum(calls: &[Value], key: &str) -> f64 {
    calls.iter().map(|c| c["usage"][key].as_f64().unwrap_or(f64::NAN)).sum()
}

/// The SDK got what the plan asked for: tool calls streamed as JSON fragments, text answers.
fn check_answers(calls: &[Value]) -> Result<()> {
    for c in calls {
        match c["kind"].as_str() {
            Some("tool") => {
                ensure!(c["stop_reason"] == "tool_use" && c["tool_use"][0]["name"] == "get_weather", "tool call {c}");
                ensure!(c["tool_use"][0]["input"]["city"].is_string(), "tool input {c}");
                // The SDK's stream yields one `input_json` event per `input_json_delta`.
                let deltas = c["events"]["content_block_delta"].as_u64().unwrap_or(0);
                ensure!(deltas >= 2 && c["events"]["input_json"].as_u64() == Some(deltas), "tool stream events {c}");
            }
            Some("result") => {
                ensure!(c["stop_reason"] == "end_turn" && c["text"].as_str().is_some_and(|t| !t.is_empty()), "{c}")
            }
            Some("plain") => ensure!(c["stream"] == false && c["text"].as_str().is_some_and(|t| !t.is_empty()), "{c}"),
            _ => return Err(anyhow!("unexpected call {c}")),
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u3_anthropic_sdk_tool_call_stream_observed_without_any_ca_change() -> Result<()> {
    // No exec wake-ups and one periodic rescan a minute: CPython loads libssl with `_ssl` (a
    // `dlopen`) after its exec, so unless it was probed at start, only the probe of the
    // connecting process before the splice can catch it before the first request.
    let rescans = json!({"capture": {"uprobes": {"rescan_on_exec": false, "rescan_interval": "60s"}}});
    let o = setup_with(
        AGENT,
        53,
        Opts { host: HOST.to_owned(), provider: "anthropic".to_owned(), extra: rescans, ..Opts::default() },
    )?;
    let calls = sdk_calls(&o)?;
    println!("u3: libssl {}", libssl_probe(&o)?);
    check_answers(&calls)?;
    // The Anthropic SDK reads every stream to its end and keeps the connection: one for all.
    let ports: BTreeSet<u64> = calls.iter().map(|c| c["port"].as_u64().unwrap_or(0)).collect();
    ensure!(ports.len() == 1 && !ports.contains(&0), "the SDK did not keep one connection: local ports {ports:?}");
    // The mock answered every call over the agent's own TLS session (it trusts nothing else).
    ensure!(o.mock.counter("anthropic_messages")? == calls.len() as u64, "mock stats {}", o.mock.stats(None)?);

    // Tokens as the SDK reported them: tollgate's input is Anthropic's documented total input
    // (uncached + cache reads + cache writes), cached input the cache reads.
    let input = sum(&calls, "input_tokens")
        + sum(&calls, "cache_read_input_tokens")
        + sum(&calls, "cache_creation_input_tokens");
    let output = sum(&calls, "output_tokens");
    let cached = sum(&calls, "cache_read_input_tokens");
    ensure!(input > 0.0 && output > 0.0 && cached > 0.0, "usage missing in the SDK results: {calls:?}");
    let tokens = [("input", input), ("output", output), ("total", input + output), ("cached_input", cached)];
    assert_observed_tokens(&o, AGENT, ("anthropic", MODEL), calls.len(), &tokens)?;
    let m = o.t.metrics()?;
    ensure!(
        m.sum("tollgate_llm_requests_total", &[("agent", AGENT)]) == calls.len() as f64,
        "calls counted outside the uprobe path:\n{}",
        m.dump("tollgate_llm_requests")
    );
    ensure!(m.sum("tollgate_llm_requests_total", &[("capture", "intercept")]) == 0.0, "a call was intercepted");
    wait_metric_at_least(&o.t, "tollgate_connections_total", &[("agent", AGENT), ("kind", "spliced")], 1.0)?;

    // The access log: one line per call, each naming the uprobe path, the agent and its tokens.
    let lines = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let l: Vec<Value> = o.t.access_log().into_iter().filter(|l| l["kind"] == "llm").collect();
        (l.len() == calls.len()).then_some(l)
    })
    .ok_or_else(|| anyhow!("no {} llm access-log lines:\n{}", calls.len(), o.t.stderr_tail(20)))?;
    // Calls are sequential on one connection: lines come in call order.
    for (l, c) in lines.iter().zip(&calls) {
        ensure!(
            l["capture"] == "uprobe" && l["agent"]["name"] == AGENT && l["provider"] == "anthropic",
            "access-log line {l}"
        );
        let u = &c["usage"];
        let total_in = ["input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"]
            .iter()
            .map(|k| u[k].as_u64().unwrap_or(0))
            .sum::<u64>();
        ensure!(
            l["input_tokens"] == total_in && l["output_tokens"] == u["output_tokens"] && l["tokens_estimated"] == false,
            "access-log line {l} for the call that got {c}"
        );
    }
    let streamed = lines.iter().filter(|l| l["stream"] == true).count();
    let want = calls.iter().filter(|c| c["stream"] == true).count();
    ensure!(streamed == want, "{streamed} streamed lines, want {want}: {lines:?}");
    Ok(())
}
