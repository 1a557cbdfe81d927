//! L7 without interception: agents that trust only their provider's own CA (here the mock's),
//! whose TLS tollgate splices untouched, are still counted per agent and model from the
//! plaintext the TLS uprobes read inside their OpenSSL.
//!
//! The proof that tollgate is not in the TLS path: the agent is given no tollgate CA at all
//! (`SSL_CERT_FILE` is the mock's CA), so any interception would fail its certificate check.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::python;
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::netns::Netns;
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, ensure, wait_for, Result};

use crate::support::*;

mod anthropic_sdk;
mod curl_node;

const HOST: &str = "api.openai.com";

/// Agents, each in its own cgroup, in one netns whose provider host (`api.openai.com` unless
/// told otherwise) is an HTTPS mock on the node, behind a spliced (not intercepted) route.
pub(super) struct Observed {
    pub(super) t: Tollgate,
    pub(super) mock: MockLlm,
    pub(super) ns: Netns,
    /// The first agent's cgroup.
    pub(super) g: Group,
    /// The other agents' cgroups, in the order named.
    pub(super) more: Vec<Group>,
    /// The mock's CA certificate (PEM file): the only trust root the agents are given.
    pub(super) mock_ca: String,
    pub(super) e: Env,
}

fn setup(name: &str, subnet: u8) -> Result<Observed> {
    setup_for(&[name], subnet, HOST, "openai")
}

/// [`Observed`] for `agents` (one cgroup each, named after the agent; the netns after the
/// first) whose `host` is the mock, routed as `provider` (also the route's name).
pub(super) fn setup_for(agents: &[&str], subnet: u8, host: &str, provider: &str) -> Result<Observed> {
    let name = *agents.first().ok_or_else(|| anyhow!("no agent"))?;
    let e = env()?;
    let g = e.cg.group(name)?;
    let more = agents[1..].iter().map(|a| e.cg.group(a)).collect::<Result<Vec<_>>>()?;
    let ns = Netns::create(name, subnet)?;
    ns.set_hosts(&[(ns.host_addr().to_string(), host)])?;
    let ca = TestCa::new(e.scratch.path(), "provider", "tollgate e2e provider CA")?;
    let cert = ca.issue(e.scratch.path(), "provider", &[host])?;
    let listen = format!("{}:443", ns.host_addr());
    let mock = e.mock(&[
        "--tls-listen",
        &listen,
        "--listen",
        "127.0.0.1:0",
        "--cert",
        &cert.cert_path.to_string_lossy(),
        "--key",
        &cert.key_path.to_string_lossy(),
        "--chunk-delay-ms",
        "2",
    ])?;
    let groups: Vec<&Group> = std::iter::once(&g).chain(&more).collect();
    let t = e.tollgate(
        json!({
            "listen": {"pod_ipv4": ns.host_addr().to_string()},
            "capture": {
                "scope": groups.iter().map(|g| g.rel()).collect::<Vec<_>>(),
                "destinations": [{"cidr": format!("{}/32", ns.host_addr()), "port": 443}],
            },
            // Spliced: tollgate never terminates this TLS.
            "routes": [{"name": provider, "provider": provider, "match": {"hosts": [host]}}],
            "agents": agents.iter().zip(&groups).map(|(a, g)| json!({"name": a, "match": {"cgroup": g.rel()}})).collect::<Vec<_>>(),
        }),
        None,
    )?;
    wait_metric(&t, "tollgate_uprobe_available", &[], 1.0)?;
    let mock_ca = ca.cert_path.to_string_lossy().into_owned();
    Ok(Observed { t, mock, ns, g, more, mock_ca, e })
}

/// Run `openai_keepalive.py` with `plan` in the agent's cgroup and netns.
fn sdk_calls(o: &Observed, plan: &str, asynchronous: bool) -> Result<Vec<Value>> {
    let mut args = vec!["--model", MODEL, "--plan", plan];
    if asynchronous {
        args.push("--async");
    }
    let env = [("OPENAI_API_KEY", "sk-agent-own-key"), ("SSL_CERT_FILE", o.mock_ca.as_str())];
    let out = python(Some(&o.g), Some(&o.ns), "openai_keepalive.py", &args, &env)?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow!(
            "openai SDK run failed ({}, {e}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let calls = v.as_array().cloned().unwrap_or_default();
    ensure!(calls.len() == plan.split(',').count(), "calls {v}");
    Ok(calls)
}

/// What the agent was told it used, summed: (input, output, total).
pub(super) fn usage_sum(calls: &[Value]) -> (f64, f64, f64) {
    let f = |k: &str| calls.iter().map(|c| c["usage"][k].as_f64().unwrap_or(f64::NAN)).sum::<f64>();
    (f("prompt_tokens"), f("completion_tokens"), f("total_tokens"))
}

/// Per-agent tokens and requests of observed calls equal the agent's own usage figures.
pub(super) fn assert_observed(o: &Observed, agent: &str, calls: &[Value]) -> Result<()> {
    let (input, output, total) = usage_sum(calls);
    ensure!(input > 0.0 && output > 0.0, "usage missing in the SDK results: {calls:?}");
    let base = [("agent", agent), ("capture", "uprobe"), ("provider", "openai"), ("model", MODEL)];
    let with = |k: &'static str, v: &'static str| {
        let mut l = base.to_vec();
        l.push((k, v));
        l
    };
    wait_metric(&o.t, "tollgate_llm_requests_total", &with("status", "200"), calls.len() as f64)?;
    wait_metric(&o.t, "tollgate_llm_tokens_total", &with("token_type", "input"), input)?;
    wait_metric(&o.t, "tollgate_llm_tokens_total", &with("token_type", "output"), output)?;
    wait_metric(&o.t, "tollgate_llm_tokens_total", &with("token_type", "total"), total)?;
    let m = o.t.metrics()?;
    ensure!(
        m.sum("tollgate_llm_estimated_tokens_total", &[("agent", agent)]) == 0.0,
        "observed usage was estimated, not read:\n{}",
        m.dump("tollgate_llm")
    );
    ensure!(
        m.sum("tollgate_llm_requests_total", &[("agent", agent), ("capture", "intercept")]) == 0.0,
        "a call was intercepted"
    );
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u1_openai_sdk_observed_on_one_keepalive_connection_without_any_ca_change() -> Result<()> {
    let o = setup("u1-agent", 41)?;
    let calls = sdk_calls(&o, "plain,plain,plain,stream,stream", false)?;
    // The SDK keeps its connection across non-streamed calls and closes it after a stream
    // (it stops reading at `[DONE]`): the first four calls share one connection.
    let per_call: Vec<(bool, u64)> =
        calls.iter().map(|c| (c["stream"] == true, c["port"].as_u64().unwrap_or(0))).collect();
    let first: BTreeSet<u64> = per_call[..4].iter().map(|(_, p)| *p).collect();
    ensure!(first.len() == 1, "the SDK did not keep one connection: (stream, port) per call {per_call:?}");
    // The mock answered every call over the agent's own TLS session (it trusts nothing else).
    ensure!(o.mock.chat_requests()? == 5, "mock stats {}", o.mock.stats(None)?);
    assert_observed(&o, "u1-agent", &calls)?;
    wait_metric_at_least(&o.t, "tollgate_connections_total", &[("agent", "u1-agent"), ("kind", "spliced")], 1.0)?;
    // The access log names the path.
    let lines = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let l: Vec<Value> = o.t.access_log().into_iter().filter(|l| l["kind"] == "llm").collect();
        (l.len() == 5).then_some(l)
    })
    .ok_or_else(|| anyhow!("no 5 llm access-log lines:\n{}", o.t.stderr_tail(20)))?;
    for l in &lines {
        ensure!(l["capture"] == "uprobe" && l["agent"]["name"] == "u1-agent", "access-log line {l}");
    }
    let streamed = lines.iter().filter(|l| l["stream"] == true).count();
    ensure!(streamed == 2, "{streamed} streamed lines, want 2");
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u2_async_openai_sdk_observed_through_its_memory_bio() -> Result<()> {
    let o = setup("u2-agent", 42)?;
    let calls = sdk_calls(&o, "plain,stream", true)?;
    assert_observed(&o, "u2-agent", &calls)?;
    Ok(())
}
