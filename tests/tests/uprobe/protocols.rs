//! MCP and A2A without interception: the real `mcp` and `a2a-sdk` clients, in an agent's cgroup
//! and netns, call real SDK servers that terminate their own HTTPS (uvicorn over asyncio's SSL)
//! with a certificate of their own CA, the only CA the client trusts. tollgate splices the TLS
//! and still counts tool calls per agent and tool, and A2A hops per caller and callee, from the
//! plaintext its uprobes read inside the client's OpenSSL (asyncio: a memory BIO).

use serde_json::{json, Value};
use tollgate_e2e::certs::{ServerCert, TestCa};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::python;
use tollgate_e2e::netns::Netns;
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, ensure, free_port, Result};

use crate::a2a::Agent;
use crate::mcp::McpServer;
use crate::support::*;

const MCP_HOST: &str = "tools.mcp.internal";
const MCP_PORT: u16 = 8443;
/// The legacy HTTP+SSE transport's server (answers on the GET stream).
const MCP_SSE_PORT: u16 = 8444;
const A2A_HOST: &str = "booking.a2a.internal";
const A2A_PORT: u16 = 9443;
const CALLEE_CARD: &str = "booking-agent";

/// An agent in its own cgroup and netns whose `host` is the netns's host address, a server
/// certificate for `host` from a CA of its own, and tollgate capturing `ports` there through
/// the spliced route `route`.
struct Observed {
    t: Tollgate,
    ns: Netns,
    g: Group,
    cert: ServerCert,
    ca: String,
    name: &'static str,
    e: Env,
}

fn setup(name: &'static str, subnet: u8, host: &str, ports: &[u16], route: Value) -> Result<Observed> {
    let e = env()?;
    let g = e.cg.group(name)?;
    let ns = Netns::create(name, subnet)?;
    ns.set_hosts(&[(ns.host_addr().to_string(), host)])?;
    let ca = TestCa::new(e.scratch.path(), "server", "tollgate e2e server's own CA")?;
    let cert = ca.issue(e.scratch.path(), "server", &[host])?;
    let t = e.tollgate(
        json!({
            "listen": {"pod_ipv4": ns.host_addr().to_string()},
            "capture": {
                "scope": [g.rel()],
                "destinations": ports
                    .iter()
                    .map(|p| json!({"cidr": format!("{}/32", ns.host_addr()), "port": p}))
                    .collect::<Vec<_>>(),
            },
            // Spliced (no `intercept`): tollgate never terminates this TLS.
            "routes": [route],
            "agents": [{"name": name, "match": {"cgroup": g.rel()}}],
        }),
        None,
    )?;
    wait_metric(&t, "tollgate_uprobe_available", &[], 1.0)?;
    let ca = ca.cert_path.to_string_lossy().into_owned();
    Ok(Observed { t, ns, g, cert, ca, name, e })
}

impl Observed {
    /// The server's `--ssl-certfile`/`--ssl-keyfile` arguments.
    fn tls_args(&self) -> [String; 4] {
        [
            "--ssl-certfile".into(),
            self.cert.cert_path.to_string_lossy().into_owned(),
            "--ssl-keyfile".into(),
            self.cert.key_path.to_string_lossy().into_owned(),
        ]
    }

    /// Run `script` in the agent's cgroup and netns, trusting the server's CA only; its JSON.
    fn run(&self, script: &str, args: &[&str]) -> Result<Value> {
        let out = python(Some(&self.g), Some(&self.ns), script, args, &[("SSL_CERT_FILE", self.ca.as_str())])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).map_err(|e| {
            anyhow!(
                "{script} output not JSON ({e}, {}): {stdout}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Nothing of `family` was counted as intercepted, and the agent's connections were spliced.
    fn assert_not_intercepted(&self, family: &str, agent_label: (&str, &str)) -> Result<()> {
        let m = self.t.metrics()?;
        ensure!(
            m.sum(family, &[agent_label, ("capture", "intercept")]) == 0.0,
            "{family} counted as intercepted:\n{}",
            m.dump(family)
        );
        wait_metric_at_least(&self.t, "tollgate_connections_total", &[("agent", self.name), ("kind", "spliced")], 1.0)?;
        Ok(())
    }
}

/// u5: the `mcp` SDK client calls the `mcp` SDK server over HTTPS, over Streamable HTTP in
/// both protocol generations (current and the legacy `initialize` handshake) and over the
/// legacy HTTP+SSE transport: every `tools/call` is counted per agent and tool with `capture="uprobe"`, exactly as many as the
/// client made and the server served, and none as intercepted.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u5_mcp_sdk_over_https_tool_calls_observed_per_agent_and_tool() -> Result<()> {
    const AGENT: &str = "u5-agent";
    let route = json!({"name": "mcp-tools", "protocol": "mcp", "match": {"hosts": [MCP_HOST]}});
    let o = setup(AGENT, 45, MCP_HOST, &[MCP_PORT, MCP_SSE_PORT], route)?;
    let host = o.ns.host_addr().to_string();
    let tls = o.tls_args();
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let server = McpServer::start_with(&o.e, &host, MCP_PORT, "streamable-http", "tls", &tls)?;
    let legacy = McpServer::start_with(&o.e, &host, MCP_SSE_PORT, "sse", "tls-sse", &tls)?;

    let calls = [
        ("get_weather", json!({"city": "Paris"})),
        ("add", json!({"a": 2, "b": 40})),
        ("get_weather", json!({"city": "Lisbon"})),
        ("add", json!({"a": 1, "b": 1})),
        ("get_weather", json!({"city": "Oslo"})),
    ];
    let (url, sse_url) =
        (format!("https://{MCP_HOST}:{MCP_PORT}/mcp"), format!("https://{MCP_HOST}:{MCP_SSE_PORT}/sse"));
    // Streamable HTTP in the current protocol and the legacy handshake, then the legacy
    // HTTP+SSE transport (POSTs answered 202, results on the GET stream).
    let runs: [(&str, &[&str]); 3] = [
        ("auto", &["--url", &url, "--mode", "auto"]),
        ("legacy", &["--url", &url, "--mode", "legacy"]),
        ("legacy+sse", &["--url", &sse_url, "--mode", "legacy", "--sse"]),
    ];
    let mut call_args: Vec<String> = Vec::new();
    for (tool, a) in &calls {
        call_args.extend(["--call".into(), tool.to_string(), a.to_string()]);
    }
    for (mode, args) in runs {
        let argv = [args, &call_args.iter().map(String::as_str).collect::<Vec<_>>()].concat();
        let v = o.run("mcp_client.py", &argv)?;
        let got = v["calls"].as_array().cloned().unwrap_or_default();
        ensure!(
            got.len() == calls.len() && got.iter().all(|c| c["ok"] == true),
            "client ({mode}) calls failed: {v}\n{}",
            o.t.stderr_tail(30)
        );
        ensure!(got[1]["result"] == "42" && got[0]["result"] == "Sunny in Paris, 21C", "answers ({mode}): {v}");
    }

    // The server served every call over the client's own TLS session.
    let n = runs.len() as f64;
    let per_tool = |tool: &str| calls.iter().filter(|(t, _)| *t == tool).count() as f64 * n;
    for tool in ["get_weather", "add"] {
        let served = server.tool_calls(tool).len() + legacy.tool_calls(tool).len();
        ensure!(served as f64 == per_tool(tool), "the servers served {served} {tool} calls");
        wait_metric(
            &o.t,
            "tollgate_mcp_tool_calls_total",
            &[("agent", AGENT), ("tool", tool), ("verdict", "allowed"), ("capture", "uprobe")],
            per_tool(tool),
        )?;
    }
    let all = calls.len() as f64 * n;
    wait_metric(&o.t, "tollgate_mcp_tool_calls_total", &[("agent", AGENT), ("capture", "uprobe")], all)?;
    wait_metric(
        &o.t,
        "tollgate_mcp_requests_total",
        &[("agent", AGENT), ("route", "mcp-tools"), ("method", "tools/call"), ("outcome", "ok"), ("capture", "uprobe")],
        all,
    )?;
    o.assert_not_intercepted("tollgate_mcp_tool_calls_total", ("agent", AGENT))?;
    o.assert_not_intercepted("tollgate_mcp_requests_total", ("agent", AGENT))?;
    // The access log names the path of each observed tool call.
    let lines: Vec<Value> =
        o.t.access_log().into_iter().filter(|l| l["kind"] == "mcp" && l["method"] == "tools/call").collect();
    ensure!(
        lines.len() as f64 == all
            && lines.iter().all(|l| l["capture"] == "uprobe" && l["agent"]["name"] == AGENT && l["tool"].is_string()),
        "mcp tools/call access-log lines: {lines:#?}"
    );
    Ok(())
}

/// u6: the `a2a-sdk` client (caller agent) resolves the callee's card and sends it messages
/// (streamed and not) over HTTPS: each hop is counted with caller, callee (its card name) and
/// `capture="uprobe"`, exactly, and none as intercepted.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u6_a2a_sdk_hop_over_https_observed_with_caller_and_callee() -> Result<()> {
    const CALLER: &str = "u6-caller";
    let route = json!({"name": "booking", "protocol": "a2a", "match": {"hosts": [A2A_HOST]}});
    let o = setup(CALLER, 46, A2A_HOST, &[A2A_PORT], route)?;
    let host = o.ns.host_addr().to_string();
    // The callee answers with the mock LLM (plaintext, outside the capture: not under test).
    let llm = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let mock = o.e.mock(&["--listen", &llm])?;
    let callee_g = o.e.cg.group("u6-callee")?;
    let tls = o.tls_args();
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let url = format!("https://{A2A_HOST}:{A2A_PORT}/");
    let _callee = Agent::start_serving(
        &callee_g,
        CALLEE_CARD,
        &format!("{host}:{A2A_PORT}"),
        &url,
        &format!("http://{llm}/v1/chat/completions"),
        &tls,
    )?;

    let plan: [&[&str]; 3] = [&["--stream"], &[], &["--stream", "--skill", "book-flight"]];
    for extra in plan {
        let args = [&["--url", url.as_str(), "--text", "Book a flight to Lisbon"][..], extra].concat();
        let v = o.run("a2a_orchestrator.py", &args)?;
        ensure!(
            v["ok"] == true && v["card_name"] == CALLEE_CARD,
            "hop failed ({extra:?}): {v}\n{}",
            o.t.stderr_tail(30)
        );
        ensure!(v["state"] == "TASK_STATE_COMPLETED" && v["answer"].is_string(), "task ({extra:?}): {v}");
    }
    ensure!(mock.chat_requests()? == plan.len() as u64, "the callee did not answer every hop");

    let hops = "tollgate_a2a_hops_total";
    let edge = [("source", CALLER), ("target", CALLEE_CARD), ("capture", "uprobe")];
    let with = |k: &'static str, v: &'static str| {
        let mut l = edge.to_vec();
        l.push((k, v));
        l
    };
    wait_metric(&o.t, hops, &with("outcome", "completed"), plan.len() as f64)?;
    wait_metric(&o.t, hops, &edge, plan.len() as f64)?;
    wait_metric(&o.t, hops, &with("method", "SendStreamingMessage"), 2.0)?;
    wait_metric(&o.t, hops, &with("method", "SendMessage"), 1.0)?;
    wait_metric(&o.t, "tollgate_a2a_hop_duration_seconds_count", &edge, plan.len() as f64)?;
    o.assert_not_intercepted(hops, ("source", CALLER))?;
    let lines: Vec<Value> = o.t.access_log().into_iter().filter(|l| l["kind"] == "a2a").collect();
    ensure!(
        lines.len() == plan.len()
            && lines
                .iter()
                .all(|l| l["capture"] == "uprobe" && l["agent"]["name"] == CALLER && l["target"] == CALLEE_CARD),
        "a2a access-log lines: {lines:#?}"
    );
    Ok(())
}
