//! MCP tool-call rate limits (`mcp.tool_limits`) with the real SDK on both sides: a limit of
//! two `get_weather` calls per minute for one agent lets two through, answers the third itself
//! with JSON-RPC error -32029 (which the SDK raises as `MCPError` with tollgate's data), never
//! sends it to the server, and leaves other tools and other agents alone; over the legacy
//! HTTP+SSE transport the refusal is written into the agent's stream. Metrics, the audit-backed
//! denial counter, the access log and the spans carry the `rate_limited` verdict.

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::otlp::OtlpReceiver;
use tollgate_e2e::{anyhow, ensure, wait_for, Result};

use super::{client, McpServer, Servers};
use crate::support::{env, wait_metric};

const RULE: &str = "weather-2-per-minute";

/// What the limited call must look like in the client's report.
fn is_limited(call: &Value) -> bool {
    let e = &call["error"];
    let d = &e["data"];
    call["ok"] == false
        && e["code"] == -32029
        && e["message"].as_str().is_some_and(|m| {
            m.starts_with(&format!("tollgate: tool get_weather rate limited by rule {RULE}; retry after "))
        })
        && d["tool"] == "get_weather"
        && d["rule"] == RULE
        && d["agent"] == "lim-a"
        && d["retry_after_secs"].as_u64().is_some_and(|s| (1..=120).contains(&s))
}

/// (b) Agent A may call `get_weather` twice a minute: its third call gets tollgate's -32029
/// error (tool, rule, agent, retry_after_secs), the server logs exactly two of A's calls, A's
/// `add` and agent B's three `get_weather` calls pass. The same counter holds on the legacy
/// transport, where the refusal arrives on the GET stream.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn mcp_b_tool_call_rate_limits_with_the_real_sdk() -> Result<()> {
    let e = env()?;
    let ga = e.cg.group("mcpl-agent-a")?;
    let gb = e.cg.group("mcpl-agent-b")?;
    let servers = Servers::start(&e)?;
    let rx = OtlpReceiver::start()?;
    let mut cfg = servers.config(&[("lim-a", &ga), ("lim-b", &gb)], &rx.endpoint());
    cfg["mcp"] = json!({"tool_limits": [
        {"name": RULE, "match": {"agent": "lim-a"}, "tools": ["get_weather"], "per_tool": true,
         "limit": 2, "window": "1m"},
    ]});
    let Servers { server, legacy, addr, legacy_addr, .. } = servers;
    let t = e.tollgate(cfg, None)?;
    let url = format!("http://{addr}/mcp");
    let paris = ("get_weather", json!({"city": "Paris"}));
    let calls = [paris.clone(), paris.clone(), paris.clone(), ("add", json!({"a": 1, "b": 2}))];

    let a = client(&ga, &url, "auto", &calls, None)?;
    let c = &a["calls"];
    for i in 0..2 {
        ensure!(c[i]["ok"] == true && c[i]["result"] == "Sunny in Paris, 21C", "A's call {i} is within the limit: {a}");
    }
    ensure!(is_limited(&c[2]), "A's third get_weather must get tollgate's -32029: {a}");
    ensure!(c[3]["ok"] == true && c[3]["result"] == "3", "another tool is not limited: {a}");
    let oslo = ("get_weather", json!({"city": "Oslo"}));
    let b = client(&gb, &url, "auto", &[oslo.clone(), oslo.clone(), oslo], None)?;
    ensure!(
        b["calls"].as_array().is_some_and(|c| c.len() == 3 && c.iter().all(|c| c["ok"] == true)),
        "another agent is not limited: {b}"
    );

    let cities =
        |s: &McpServer, city: &str| s.tool_calls("get_weather").iter().filter(|l| l["args"]["city"] == city).count();
    ensure!(cities(&server, "Paris") == 2, "the server ran exactly A's two admitted calls: {:?}", server.log());
    ensure!(cities(&server, "Oslo") == 3 && server.tool_calls("add").len() == 1, "{:?}", server.log());

    let calls_m = "tollgate_mcp_tool_calls_total";
    let a_weather = |v: &'static str| [("agent", "lim-a"), ("tool", "get_weather"), ("verdict", v)];
    wait_metric(&t, calls_m, &a_weather("rate_limited"), 1.0)?;
    wait_metric(&t, calls_m, &a_weather("allowed"), 2.0)?;
    wait_metric(&t, calls_m, &[("agent", "lim-b"), ("tool", "get_weather"), ("verdict", "allowed")], 3.0)?;
    wait_metric(&t, calls_m, &[("agent", "lim-a"), ("tool", "add"), ("verdict", "allowed")], 1.0)?;
    let denials = [("agent", "lim-a"), ("policy", "mcp_tool_limits"), ("rule", RULE)];
    wait_metric(&t, "tollgate_policy_denials_total", &denials, 1.0)?;
    let req = [("agent", "lim-a"), ("route", "mcp-tools"), ("method", "tools/call"), ("outcome", "rate_limited")];
    wait_metric(&t, "tollgate_mcp_requests_total", &req, 1.0)?;

    // Legacy HTTP+SSE transport: the per-agent counter is the same (still full), so A's call is
    // refused on its stream (the POST gets 202, as from the server) and never reaches the server.
    let sse_url = format!("http://{legacy_addr}/sse");
    let a2 = client(&ga, &sse_url, "legacy+sse", &[("get_weather", json!({"city": "Rome"}))], None)?;
    ensure!(is_limited(&a2["calls"][0]), "A over the legacy transport: {a2}");
    ensure!(legacy.tool_calls("get_weather").is_empty(), "legacy server: {:?}", legacy.log());
    wait_metric(&t, calls_m, &a_weather("rate_limited"), 2.0)?;

    // Access log and spans carry the verdict and the rule.
    let log = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let l: Vec<Value> =
            t.access_log().into_iter().filter(|l| l["kind"] == "mcp" && l["verdict"] == "rate_limited").collect();
        (l.len() == 2).then_some(l)
    })
    .ok_or_else(|| anyhow!("no two rate_limited mcp access-log lines: {:?}", t.access_log()))?;
    for l in &log {
        ensure!(
            l["agent"]["name"] == "lim-a"
                && l["tool"] == "get_weather"
                && l["rule"] == RULE
                && l["outcome"] == "rate_limited"
                && (l["status"] == 200 || (l["status"] == 202 && l["path"] == "/messages/")),
            "rate-limited line: {l}"
        );
    }
    let spans = rx
        .wait_spans(Duration::from_secs(15), |s| {
            s.iter()
                .any(|s| s.name == "tools/call get_weather" && s.attr("tollgate.mcp.verdict") == Some("rate_limited"))
        })
        .ok_or_else(|| anyhow!("no rate_limited tools/call span: {:?}", rx.spans()))?;
    let span = spans
        .iter()
        .find(|s| s.name == "tools/call get_weather" && s.attr("tollgate.mcp.verdict") == Some("rate_limited"))
        .ok_or_else(|| anyhow!("no rate_limited span"))?;
    for (k, v) in [
        ("gen_ai.operation.name", "execute_tool"),
        ("gen_ai.agent.name", "lim-a"),
        ("tollgate.rule", RULE),
        ("error.type", "tool_rate_limited"),
    ] {
        ensure!(span.attr(k) == Some(v), "span attribute {k}: {span:?}");
    }
    Ok(())
}
