//! u7: four agents, each with 50 concurrent streamed calls through the real `openai` SDK, are
//! counted exactly per agent from the uprobes alone, while the same processes' TLS to an origin
//! outside every capture rule never leaves the kernel as plaintext.

use serde_json::Value;
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::python;
use tollgate_e2e::netns::Netns;
use tollgate_e2e::{anyhow, ensure, Result};

use super::{assert_observed, setup_with, usage_sum, Opts, HOST};
use crate::support::*;

/// Concurrent streamed calls per agent.
const CALLS: usize = 50;
/// Calls per agent to the uncaptured origin, and the prompt size of each (one large
/// `SSL_write` of the request body, far over what the captured calls write).
const OTHER_CALLS: usize = 8;
const OTHER_BYTES: usize = 512 << 10;
/// Port of the mock outside the capture rules (they name port 443 only).
const UNCAPTURED_PORT: u16 = 8443;
/// Generous bound of the plaintext one captured call emits (request head and body of a short
/// prompt, 16 streamed words plus the usage chunk, and their HTTP framing: about 5 KiB).
const CAPTURED_CALL_BOUND: f64 = 16.0 * 1024.0;

/// Run `openai_load.py` for one agent; returns its JSON result.
fn load(ns: &Netns, mock_ca: &str, g: &Group, asynchronous: bool) -> Result<Value> {
    let other_url = format!("https://{HOST}:{UNCAPTURED_PORT}/v1");
    let (calls, other_calls, other_bytes) = (CALLS.to_string(), OTHER_CALLS.to_string(), OTHER_BYTES.to_string());
    let mut args = vec!["--model", MODEL, "--calls", &calls, "--kind", "stream"];
    args.extend(["--other-url", &other_url, "--other-calls", &other_calls, "--other-bytes", &other_bytes]);
    if asynchronous {
        args.push("--async");
    }
    let env = [("OPENAI_API_KEY", "sk-agent-own-key"), ("SSL_CERT_FILE", mock_ca)];
    let out = python(Some(g), Some(ns), "openai_load.py", &args, &env)?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow!(
            "openai SDK load run failed ({}, {e}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u7_four_agents_50_concurrent_streams_exact_and_uncaptured_tls_never_emitted() -> Result<()> {
    let names = ["u7-agent-b", "u7-agent-c", "u7-agent-d"].map(String::from);
    let o = setup_with(
        "u7-agent-a",
        47,
        Opts {
            more_agents: names.to_vec(),
            uncaptured_ports: vec![UNCAPTURED_PORT],
            // Each stream lasts about 18 x 20 ms, so the 50 calls of an agent overlap.
            chunk_delay_ms: 20,
            ..Opts::default()
        },
    )?;
    let agents: Vec<(&str, &Group)> =
        std::iter::once(("u7-agent-a", &o.g)).chain(names.iter().map(String::as_str).zip(&o.more)).collect();
    let before = o.t.metrics()?;
    let not_captured_before = before.sum("tollgate_uprobe_not_captured_total", &[]);
    // All four agents at once: two over asyncio (memory BIO), two over threads (socket BIO).
    let (ns, ca) = (&o.ns, o.mock_ca.as_str());
    let results: Vec<Result<Value>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            agents.iter().enumerate().map(|(i, (_, g))| s.spawn(move || load(ns, ca, g, i % 2 == 0))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("load thread panicked")))).collect()
    });
    let mut results: Vec<Value> = results.into_iter().collect::<Result<_>>()?;
    for ((name, _), r) in agents.iter().zip(&mut results) {
        let calls = r["calls"].as_array().cloned().unwrap_or_default();
        let other = r["other"].as_array().map_or(0, Vec::len);
        ensure!(calls.len() == CALLS && other == OTHER_CALLS, "{name}: {} calls, {other} uncaptured", calls.len());
        let in_flight = r["max_in_flight"].as_u64().unwrap_or(0);
        println!("u7 {name}: {CALLS} streamed calls, at most {in_flight} in flight at once");
        ensure!(in_flight >= (CALLS / 2) as u64, "{name}: calls were not concurrent (max {in_flight} in flight)");
        assert_observed(&o, name, &calls)?;
        let (input, output, _) = usage_sum(&calls);
        println!("u7 {name}: input {input}, output {output} tokens (SDK usage = tollgate)");
    }
    // The mock answered every call, captured and not.
    let want = (agents.len() * (CALLS + OTHER_CALLS)) as u64;
    ensure!(o.mock.chat_requests()? == want, "mock stats {}", o.mock.stats(None)?);
    let m = o.t.metrics()?;
    let requests = m.sum("tollgate_llm_requests_total", &[]);
    ensure!(requests == (agents.len() * CALLS) as f64, "tollgate saw {requests} calls, want only the captured ones");
    // Plaintext of the uncaptured origin never left the kernel: its SSL calls were counted as
    // not captured, and the bytes emitted are bounded by the captured calls alone. Emitting
    // the uncaptured ones would add at least OTHER_CALLS x 4 x 256 KiB (the per-call cap)
    // = 8 MiB, over the 3.2 MiB bound.
    let not_captured = m.sum("tollgate_uprobe_not_captured_total", &[]) - not_captured_before;
    let other_ssl_calls = (agents.len() * OTHER_CALLS * 2) as f64;
    ensure!(
        not_captured >= other_ssl_calls,
        "not_captured grew by {not_captured}, want >= {other_ssl_calls} (a write and a read per uncaptured call)\n{}",
        m.dump("tollgate_uprobe")
    );
    let bytes = m.sum("tollgate_uprobe_bytes_total", &[]);
    let bound = (agents.len() * CALLS) as f64 * CAPTURED_CALL_BOUND;
    let uncaptured_sent = (agents.len() * OTHER_CALLS * OTHER_BYTES) as f64;
    println!(
        "u7: uprobe bytes emitted {bytes} (bound {bound}), uncaptured request bytes sent {uncaptured_sent}, \
         data events {}, not_captured +{not_captured}",
        m.sum("tollgate_uprobe_events_total", &[("kind", "data")])
    );
    ensure!(bytes > 0.0 && bytes <= bound, "uprobe bytes {bytes} over the captured calls' bound {bound}");
    // Losses on captured connections (`no_fd` counts SSL calls of any process, not only these).
    for reason in ["ring_full", "per_call_cap", "read_failed", "channel_full"] {
        let dropped = m.sum("tollgate_uprobe_events_dropped_total", &[("reason", reason)]);
        ensure!(dropped == 0.0, "{dropped} events dropped ({reason}) under load:\n{}", m.dump("tollgate_uprobe"));
    }
    Ok(())
}
