//! u9: the uprobes' ring buffer overflows inside the real tollgate (smallest ring the config
//! allows): the loss is counted, tollgate keeps running and serving, the call that lost bytes is
//! reported only as an estimate, and the next call on a new connection is exact again.

use serde_json::{json, Value};
use tollgate_e2e::prom::Scrape;
use tollgate_e2e::{anyhow, ensure, wait_for, Result};

use super::{sdk_calls, setup_with, usage_sum, Observed, Opts};
use crate::support::*;

/// The smallest ring `capture.uprobes.ring_buffer_bytes` accepts: three 16 KiB events fit.
const RING: u64 = 64 << 10;
/// Request body of the overflowing call: written by one `SSL_write`, whose return probe
/// emits its 13 chunks back to back (under the 256 KiB per-call cap, so only the ring drops).
/// The reader would have to drain ten events while that one probe runs to lose nothing.
const BIG_PROMPT: &str = "200000";

/// Tokens tollgate reported for `agent` as read from the provider (not estimated), by type
/// (`input` or `output`: the estimated family has no `total`).
fn exact(m: &Scrape, agent: &str, token_type: &str) -> f64 {
    let l = [("agent", agent), ("capture", "uprobe"), ("token_type", token_type)];
    m.sum("tollgate_llm_tokens_total", &l) - m.sum("tollgate_llm_estimated_tokens_total", &l)
}

fn big_call(o: &Observed) -> Result<Value> {
    let args = ["--model", MODEL, "--calls", "1", "--kind", "plain", "--prompt-bytes", BIG_PROMPT];
    let env = [("OPENAI_API_KEY", "sk-agent-own-key"), ("SSL_CERT_FILE", o.mock_ca.as_str())];
    let v = python_json(Some(&o.g), Some(&o.ns), "openai_load.py", &args, &env)?;
    v["calls"][0].as_object().map(|c| Value::Object(c.clone())).ok_or_else(|| anyhow!("no call in {v}"))
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u9_ring_overflow_counted_flagged_estimated_and_next_call_exact() -> Result<()> {
    let agent = "u9-agent";
    let o = setup_with(agent, 49, Opts { uprobes: json!({"ring_buffer_bytes": RING}), ..Opts::default() })?;
    let big = big_call(&o)?;
    let ring_full =
        wait_metric_at_least(&o.t, "tollgate_uprobe_events_dropped_total", &[("reason", "ring_full")], 1.0)?;
    println!("u9: {ring_full} events dropped (ring_full) by one {BIG_PROMPT}-byte request body");
    // The call is reported (the provider answered it), but as an estimate.
    wait_metric(&o.t, "tollgate_llm_requests_total", &[("agent", agent), ("capture", "uprobe")], 1.0)?;
    let line = wait_for(std::time::Duration::from_secs(5), std::time::Duration::from_millis(100), || {
        o.t.access_log().into_iter().find(|l| l["kind"] == "llm" && l["agent"]["name"] == agent)
    })
    .ok_or_else(|| anyhow!("no llm access-log line:\n{}", o.t.stderr_tail(30)))?;
    ensure!(line["tokens_estimated"] == true, "the call that lost bytes was not flagged estimated: {line}");
    let m = o.t.metrics()?;
    for t in ["input", "output"] {
        ensure!(
            exact(&m, agent, t) == 0.0,
            "{t} tokens of the call that lost bytes reported as exact (SDK usage {}):\n{}",
            big["usage"],
            m.dump("tollgate_llm")
        );
    }
    ensure!(
        m.sum("tollgate_llm_estimated_tokens_total", &[("agent", agent)]) > 0.0,
        "no estimated tokens:\n{}",
        m.dump("tollgate_llm")
    );
    // Still alive and serving; a later call on a new connection is exact again.
    let calls = sdk_calls(&o, "plain", false)?;
    let (input, output, total) = usage_sum(&calls);
    let all_total = total + big["usage"]["total_tokens"].as_f64().unwrap_or(f64::NAN);
    wait_metric(&o.t, "tollgate_llm_requests_total", &[("agent", agent), ("capture", "uprobe")], 2.0)?;
    let mut last = Scrape::default();
    let ok = wait_for(std::time::Duration::from_secs(5), std::time::Duration::from_millis(100), || {
        last = o.t.metrics().ok()?;
        let total_of_both = last.sum("tollgate_llm_tokens_total", &[("agent", agent), ("token_type", "total")]);
        let got = (exact(&last, agent, "input"), exact(&last, agent, "output"), total_of_both);
        (got == (input, output, all_total)).then_some(())
    });
    ensure!(
        ok.is_some(),
        "the call after the overflow is not exact: want (exact in, exact out, total of both) = ({input}, {output}, {all_total})\n{}",
        last.dump("tollgate_llm")
    );
    // Still the same process, uprobes still up.
    wait_metric(&o.t, "tollgate_uprobe_available", &[], 1.0)?;
    Ok(())
}
