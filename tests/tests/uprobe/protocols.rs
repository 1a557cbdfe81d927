//! MCP and A2A without interception: the real `mcp` and `a2a-sdk` clients, in an agent's cgroup
//! and netns, call real SDK servers that terminate their own HTTPS (uvicorn over asyncio's SSL)
//! with a certificate of their own CA, the only CA the client trusts. tollgate splices the TLS
//! and still counts tool calls per agent and tool, and A2A hops per caller and callee, from the
//! plaintext its uprobes read inside the client's OpenSSL (asyncio: a memory BIO); in a chain
//! (u10), the callee's own HTTPS LLM calls are counted per callee as well.

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
const A2A_PORT_2: u16 = 9444;
const CALLEE_CARD: &str = "booking-agent";
const CALLEE_CARD_2: &str = "payments-agent";

/// Agents, each in its own cgroup, sharing one netns whose `host` is the netns's host address;
/// a server certificate for `host` from a CA of its own; tollgate capturing `ports` there (and
/// `more_dests`) through the spliced `routes`.
struct Observed {
    t: Tollgate,
    ns: Netns,
    agents: Vec<(&'static str, Group)>,
    cert: ServerCert,
    ca: String,
    e: Env,
}

fn setup(
    names: &[&'static str],
    subnet: u8,
    host: &str,
    ports: &[u16],
    more_dests: &[Value],
    routes: &[Value],
) -> Result<Observed> {
    let e = env()?;
    let agents = names.iter().map(|n| Ok((*n, e.cg.group(n)?))).collect::<Result<Vec<_>>>()?;
    let ns = Netns::create(names[0], subnet)?;
    ns.set_hosts(&[(ns.host_addr().to_string(), host)])?;
    let ca = TestCa::new(e.scratch.path(), "server", "tollgate e2e server's own CA")?;
    let cert = ca.issue(e.scratch.path(), "server", &[host])?;
    let t = e.tollgate(
        json!({
            "listen": {"pod_ipv4": ns.host_addr().to_string()},
            "capture": {
                "scope": agents.iter().map(|(_, g)| g.rel()).collect::<Vec<_>>(),
                "destinations": ports
                    .iter()
                    .map(|p| json!({"cidr": format!("{}/32", ns.host_addr()), "port": p}))
                    .chain(more_dests.iter().cloned())
                    .collect::<Vec<_>>(),
            },
            // Spliced (no `intercept`): tollgate never terminates this TLS.
            "routes": routes,
            "agents": agents.iter().map(|(n, g)| json!({"name": n, "match": {"cgroup": g.rel()}})).collect::<Vec<_>>(),
        }),
        None,
    )?;
    wait_metric(&t, "tollgate_uprobe_available", &[], 1.0)?;
    let ca = ca.cert_path.to_string_lossy().into_owned();
    Ok(Observed { t, ns, agents, cert, ca, e })
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

    /// Run `script` as agent `i` (its cgroup, the netns), trusting the server's CA only; its JSON.
    fn run(&self, i: usize, script: &str, args: &[&str]) -> Result<Value> {
        let g = &self.agents[i].1;
        let out = python(Some(g), Some(&self.ns), script, args, &[("SSL_CERT_FILE", self.ca.as_str())])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).map_err(|e| {
            anyhow!(
                "{script} output not JSON ({e}, {}): {stdout}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Nothing of `family` was counted as intercepted for agent `i` (labelled `agent_label`), and
    /// its connections were spliced.
    fn assert_not_intercepted(&self, i: usize, family: &str, agent_label: &str) -> Result<()> {
        let name = self.agents[i].0;
        let m = self.t.metrics()?;
        ensure!(
            m.sum(family, &[(agent_label, name), ("capture", "intercept")]) == 0.0,
            "{family} counted as intercepted:\n{}",
            m.dump(family)
        );
        wait_metric_at_least(&self.t, "tollgate_connections_total", &[("agent", name), ("kind", "spliced")], 1.0)?;
        Ok(())
    }
}

/// u5: two agents (two cgroups, one netns) run the `mcp` SDK client at the same time against
/// the `mcp` SDK server over HTTPS, over Streamable HTTP in both protocol generations (current
/// and the legacy `initialize` handshake) and over the legacy HTTP+SSE transport, each with its
/// own mix of tools: every `tools/call` is counted per agent and tool with `capture="uprobe"`,
/// exactly as many as that agent made (and the servers served), and none as intercepted.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u5_mcp_sdk_over_https_tool_calls_observed_per_agent_and_tool() -> Result<()> {
    let route = json!({"name": "mcp-tools", "protocol": "mcp", "match": {"hosts": [MCP_HOST]}});
    let o = setup(&["u5-agent-a", "u5-agent-b"], 45, MCP_HOST, &[MCP_PORT, MCP_SSE_PORT], &[], &[route])?;
    let host = o.ns.host_addr().to_string();
    let tls = o.tls_args();
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let server = McpServer::start_with(&o.e, &host, MCP_PORT, "streamable-http", "tls", &tls)?;
    let legacy = McpServer::start_with(&o.e, &host, MCP_SSE_PORT, "sse", "tls-sse", &tls)?;

    // Each agent's calls; the first is checked by its answer.
    let plans: [&[(&str, Value)]; 2] = [
        &[
            ("get_weather", json!({"city": "Paris"})),
            ("add", json!({"a": 2, "b": 40})),
            ("get_weather", json!({"city": "Lisbon"})),
            ("add", json!({"a": 1, "b": 1})),
            ("get_weather", json!({"city": "Oslo"})),
        ],
        &[
            ("add", json!({"a": 40, "b": 2})),
            ("delete_file", json!({"path": "/tmp/u5"})),
            ("add", json!({"a": 3, "b": 4})),
            ("add", json!({"a": 5, "b": 6})),
        ],
    ];
    let first_answer = ["Sunny in Paris, 21C", "42"];
    let (url, sse_url) =
        (format!("https://{MCP_HOST}:{MCP_PORT}/mcp"), format!("https://{MCP_HOST}:{MCP_SSE_PORT}/sse"));
    // Streamable HTTP in the current protocol and the legacy handshake, then the legacy
    // HTTP+SSE transport (POSTs answered 202, results on the GET stream).
    let runs: [(&str, &[&str]); 3] = [
        ("auto", &["--url", &url, "--mode", "auto"]),
        ("legacy", &["--url", &url, "--mode", "legacy"]),
        ("legacy+sse", &["--url", &sse_url, "--mode", "legacy", "--sse"]),
    ];
    let call_args: Vec<Vec<String>> = plans
        .iter()
        .map(|p| p.iter().flat_map(|(tool, a)| ["--call".into(), tool.to_string(), a.to_string()]).collect())
        .collect();
    for (mode, args) in runs {
        // Both agents at once: their connections interleave on the node.
        let outs: Vec<Result<Value>> = std::thread::scope(|s| {
            let handles: Vec<_> = call_args
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let o = &o;
                    s.spawn(move || {
                        let argv = [args, &c.iter().map(String::as_str).collect::<Vec<_>>()].concat();
                        o.run(i, "mcp_client.py", &argv)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("client thread panicked")))).collect()
        });
        for (i, v) in outs.into_iter().enumerate() {
            let v = v?;
            let got = v["calls"].as_array().cloned().unwrap_or_default();
            ensure!(
                got.len() == plans[i].len() && got.iter().all(|c| c["ok"] == true),
                "agent {i}'s client ({mode}) calls failed: {v}\n{}",
                o.t.stderr_tail(30)
            );
            ensure!(got[0]["result"] == first_answer[i], "agent {i}'s answers ({mode}): {v}");
        }
    }

    let n = runs.len() as f64;
    let made = |i: usize, tool: &str| plans[i].iter().filter(|(t, _)| *t == tool).count() as f64 * n;
    for tool in ["get_weather", "add", "delete_file"] {
        // The servers served every call over the clients' own TLS sessions.
        let served = (server.tool_calls(tool).len() + legacy.tool_calls(tool).len()) as f64;
        ensure!(served == made(0, tool) + made(1, tool), "the servers served {served} {tool} calls");
        for (i, (agent, _)) in o.agents.iter().enumerate() {
            wait_metric(
                &o.t,
                "tollgate_mcp_tool_calls_total",
                &[("agent", agent), ("tool", tool), ("verdict", "allowed"), ("capture", "uprobe")],
                made(i, tool),
            )?;
        }
    }
    for (i, (agent, _)) in o.agents.iter().enumerate() {
        let all = plans[i].len() as f64 * n;
        wait_metric(&o.t, "tollgate_mcp_tool_calls_total", &[("agent", agent), ("capture", "uprobe")], all)?;
        wait_metric(
            &o.t,
            "tollgate_mcp_requests_total",
            &[
                ("agent", agent),
                ("route", "mcp-tools"),
                ("method", "tools/call"),
                ("outcome", "ok"),
                ("capture", "uprobe"),
            ],
            all,
        )?;
        o.assert_not_intercepted(i, "tollgate_mcp_tool_calls_total", "agent")?;
        o.assert_not_intercepted(i, "tollgate_mcp_requests_total", "agent")?;
        // The access log names the path of each observed tool call.
        let lines: Vec<Value> =
            o.t.access_log()
                .into_iter()
                .filter(|l| l["kind"] == "mcp" && l["method"] == "tools/call" && l["agent"]["name"] == *agent)
                .collect();
        ensure!(
            lines.len() as f64 == all && lines.iter().all(|l| l["capture"] == "uprobe" && l["tool"].is_string()),
            "{agent}'s mcp tools/call access-log lines: {lines:#?}"
        );
    }
    Ok(())
}

/// u6: the `a2a-sdk` client (caller agent) resolves the cards of two callees on the same host
/// (two ports) and sends them messages (streamed and not) over HTTPS: each hop is counted with
/// the caller, the right callee (its card name) and `capture="uprobe"`, exactly, and none as
/// intercepted.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u6_a2a_sdk_hop_over_https_observed_with_caller_and_callee() -> Result<()> {
    const CALLER: &str = "u6-caller";
    let route = json!({"name": "agents", "protocol": "a2a", "match": {"hosts": [A2A_HOST]}});
    let o = setup(&[CALLER], 43, A2A_HOST, &[A2A_PORT, A2A_PORT_2], &[], &[route])?;
    let host = o.ns.host_addr().to_string();
    // The callees answer with the mock LLM (plaintext, outside the capture: not under test).
    let llm = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let mock = o.e.mock(&["--listen", &llm])?;
    let callee_g = o.e.cg.group("u6-callees")?;
    let tls = o.tls_args();
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let llm_url = format!("http://{llm}/v1/chat/completions");
    let mut callees = Vec::new();
    let mut urls = Vec::new();
    for (card, port) in [(CALLEE_CARD, A2A_PORT), (CALLEE_CARD_2, A2A_PORT_2)] {
        let url = format!("https://{A2A_HOST}:{port}/");
        callees.push(Agent::start_serving(&callee_g, card, &format!("{host}:{port}"), &url, &llm_url, &tls, &[])?);
        urls.push(url);
    }

    // (callee, SDK options): three hops to the first callee, two to the second.
    let plan: [(usize, &[&str]); 5] =
        [(0, &["--stream"]), (1, &[]), (0, &[]), (1, &["--stream"]), (0, &["--stream", "--skill", "book-flight"])];
    let cards = [CALLEE_CARD, CALLEE_CARD_2];
    for (callee, extra) in plan {
        let args = [&["--url", urls[callee].as_str(), "--text", "Book a flight to Lisbon"][..], extra].concat();
        let v = o.run(0, "a2a_orchestrator.py", &args)?;
        ensure!(
            v["ok"] == true && v["card_name"] == cards[callee],
            "hop failed ({callee}, {extra:?}): {v}\n{}",
            o.t.stderr_tail(30)
        );
        ensure!(v["state"] == "TASK_STATE_COMPLETED" && v["answer"].is_string(), "task ({extra:?}): {v}");
    }
    ensure!(mock.chat_requests()? == plan.len() as u64, "the callees did not answer every hop");

    let hops = "tollgate_a2a_hops_total";
    for (i, card) in cards.iter().enumerate() {
        let to = |stream: Option<bool>| {
            plan.iter().filter(|(c, x)| *c == i && stream.is_none_or(|s| x.contains(&"--stream") == s)).count() as f64
        };
        let edge = [("source", CALLER), ("target", card), ("capture", "uprobe")];
        let with = |k: &'static str, v: &'static str| {
            let mut l = edge.to_vec();
            l.push((k, v));
            l
        };
        wait_metric(&o.t, hops, &edge, to(None))?;
        wait_metric(&o.t, hops, &with("outcome", "completed"), to(None))?;
        wait_metric(&o.t, hops, &with("method", "SendStreamingMessage"), to(Some(true)))?;
        wait_metric(&o.t, hops, &with("method", "SendMessage"), to(Some(false)))?;
        wait_metric(&o.t, "tollgate_a2a_hop_duration_seconds_count", &edge, to(None))?;
    }
    wait_metric(&o.t, hops, &[("source", CALLER)], plan.len() as f64)?;
    o.assert_not_intercepted(0, hops, "source")?;
    let lines: Vec<Value> = o.t.access_log().into_iter().filter(|l| l["kind"] == "a2a").collect();
    let to_first = lines.iter().filter(|l| l["target"] == CALLEE_CARD).count();
    ensure!(
        lines.len() == plan.len()
            && to_first == 3
            && lines.iter().all(|l| l["capture"] == "uprobe" && l["agent"]["name"] == CALLER),
        "a2a access-log lines: {lines:#?}"
    );
    Ok(())
}

/// u10: an A2A chain observed end to end without interception: the caller's hop to the callee
/// over HTTPS (asyncio, memory BIO) and the callee's own calls to its LLM over HTTPS (`urllib`,
/// on a worker thread of the process that serves the hop's TLS) are both counted: the hop per
/// (caller, callee card), the LLM tokens per callee agent, exactly the mock's usage.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u10_a2a_chain_hop_and_callees_llm_tokens_observed_per_agent() -> Result<()> {
    const CALLER: &str = "u10-caller";
    const CALLEE: &str = "u10-callee";
    const LLM_IP: &str = "127.0.0.2";
    const TEXT: &str = "Book a flight to Porto";
    let llm_port = free_port(LLM_IP);
    let llm = format!("{LLM_IP}:{llm_port}");
    let routes = [
        json!({"name": "agents", "protocol": "a2a", "match": {"hosts": [A2A_HOST]}}),
        // Spliced too: the callee trusts its provider's CA, never tollgate's.
        json!({"name": "llm", "provider": "openai", "match": {"addresses": [llm]}}),
    ];
    let dests = [json!({"cidr": format!("{LLM_IP}/32"), "port": llm_port})];
    let o = setup(&[CALLER, CALLEE], 44, A2A_HOST, &[A2A_PORT], &dests, &routes)?;
    let host = o.ns.host_addr().to_string();
    // The provider: an HTTPS mock with a certificate for its address from the same private CA.
    let llm_cert = TestCa::new(o.e.scratch.path(), "provider", "tollgate e2e provider CA")?;
    let llm_pem = llm_cert.issue(o.e.scratch.path(), "provider", &[LLM_IP])?;
    let mock = o.e.mock(&[
        "--tls-listen",
        &llm,
        "--listen",
        "127.0.0.1:0",
        "--cert",
        &llm_pem.cert_path.to_string_lossy(),
        "--key",
        &llm_pem.key_path.to_string_lossy(),
    ])?;
    let llm_ca = llm_cert.cert_path.to_string_lossy().into_owned();
    let tls = o.tls_args();
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let url = format!("https://{A2A_HOST}:{A2A_PORT}/");
    let callee_g = &o.agents[1].1;
    let _callee = Agent::start_serving(
        callee_g,
        CALLEE_CARD,
        &format!("{host}:{A2A_PORT}"),
        &url,
        &format!("https://{llm}/v1/chat/completions"),
        &tls,
        &[("SSL_CERT_FILE", llm_ca.as_str())],
    )?;

    let plan: [&[&str]; 3] = [&["--stream"], &[], &[]];
    for extra in plan {
        let args = [&["--url", url.as_str(), "--text", TEXT][..], extra].concat();
        let v = o.run(0, "a2a_orchestrator.py", &args)?;
        ensure!(
            v["ok"] == true && v["card_name"] == CALLEE_CARD,
            "hop failed ({extra:?}): {v}\n{}",
            o.t.stderr_tail(30)
        );
        ensure!(v["state"] == "TASK_STATE_COMPLETED" && v["answer"].is_string(), "task ({extra:?}): {v}");
    }
    let n = plan.len();
    ensure!(mock.chat_requests()? == n as u64, "the callee did not call its LLM once per hop");

    let edge = [("source", CALLER), ("target", CALLEE_CARD), ("capture", "uprobe")];
    wait_metric(&o.t, "tollgate_a2a_hops_total", &edge, n as f64)?;
    // The callee's LLM calls: the mock's usage (a pure function of the request), per callee.
    let reply = tollgate_e2e::openai::reply_for(&tollgate_e2e::openai::ChatRequest::simple(MODEL, TEXT));
    assert_tokens(&o.t, CALLEE, "llm", &vec![&reply; n])?;
    let m = o.t.metrics()?;
    ensure!(
        m.sum("tollgate_llm_requests_total", &[("agent", CALLEE), ("capture", "uprobe")]) == n as f64
            && m.sum("tollgate_llm_estimated_tokens_total", &[("agent", CALLEE)]) == 0.0
            && m.sum("tollgate_llm_requests_total", &[("agent", CALLER)]) == 0.0
            && m.sum("tollgate_a2a_hops_total", &[("source", CALLEE)]) == 0.0,
        "LLM calls not all observed exactly, or attributed to the wrong agent:\n{}{}",
        m.dump("tollgate_llm"),
        m.dump("tollgate_a2a")
    );
    o.assert_not_intercepted(0, "tollgate_a2a_hops_total", "source")?;
    o.assert_not_intercepted(1, "tollgate_llm_requests_total", "agent")?;
    Ok(())
}
