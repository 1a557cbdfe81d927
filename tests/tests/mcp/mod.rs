//! MCP scenarios (issue 7): the real Python `mcp` SDK's server (MCPServer over Streamable HTTP)
//! listens on a captured address; two agents in two cgroups run the SDK's real client against
//! it, both in the 2026-07-28 protocol (`server/discover`, JSON responses) and in the legacy
//! handshake mode (`initialize`, `Mcp-Session-Id`, SSE responses). Their tool rules differ, so
//! what each client lists and may call differs; the server's own call log proves a denied call
//! never reached it, and tollgate's metrics, access log and spans show every request.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::{client_script, python, venv_python};
use tollgate_e2e::otlp::OtlpReceiver;
use tollgate_e2e::{anyhow, bail, ensure, free_port, wait_for, Context, Result};

use crate::support::{env, wait_metric, Env};

mod federation;
mod limits;
mod oauth;

const SERVER_IP: &str = "127.0.0.2";
/// The agent's own trace, continued by tollgate's MCP spans.
const TRACE: &str = "4d4350000000000000000000000000c0";
const PARENT: &str = "00000000000000aa";

/// `mcp_server.py` on `addr`, outside every captured cgroup; killed on drop (also used by o1).
pub(crate) struct McpServer {
    child: Child,
    log: std::path::PathBuf,
}

impl McpServer {
    pub(crate) fn start(e: &Env, addr: &str, port: u16, transport: &str) -> Result<Self> {
        Self::start_labeled(e, addr, port, transport, "server")
    }

    /// Like [`McpServer::start`]; `label` names the server in its resource URI and prompt.
    pub(crate) fn start_labeled(e: &Env, addr: &str, port: u16, transport: &str, label: &str) -> Result<Self> {
        Self::start_with(e, addr, port, transport, label, &[])
    }

    /// Like [`McpServer::start_labeled`], with more `mcp_server.py` arguments (e.g. its own TLS
    /// certificate, for the uprobe scenarios).
    pub(crate) fn start_with(
        e: &Env,
        addr: &str,
        port: u16,
        transport: &str,
        label: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let log = e.path(&format!("mcp-calls-{port}.jsonl"));
        let port_s = port.to_string();
        let child = std::process::Command::new(venv_python())
            .arg(client_script("mcp_server.py"))
            .args(["--host", addr, "--port", &port_s, "--transport", transport, "--label", label])
            .args(extra)
            .arg("--log")
            .arg(&log)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", std::env::temp_dir())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn mcp_server.py")?;
        let s = McpServer { child, log };
        let sock: std::net::SocketAddr = format!("{addr}:{port}").parse()?;
        let up = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
            std::net::TcpStream::connect_timeout(&sock, Duration::from_millis(200)).ok()
        });
        ensure!(up.is_some(), "mcp_server.py did not listen on {sock} within 30 s");
        Ok(s)
    }

    /// Every line the server logged: tool calls and the `traceparent` of each request.
    fn log(&self) -> Vec<Value> {
        read_log(&self.log)
    }

    fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    pub(crate) fn tool_calls(&self, tool: &str) -> Vec<Value> {
        self.log().into_iter().filter(|l| l["tool"] == tool).collect()
    }
}

/// The JSON lines of an `mcp_server.py` call log.
fn read_log(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real SDK server over both transports (Streamable HTTP and legacy HTTP+SSE) on captured
/// addresses, as mcp_a and mcp_b use it.
pub(crate) struct Servers {
    pub(crate) server: McpServer,
    pub(crate) legacy: McpServer,
    pub(crate) addr: String,
    pub(crate) legacy_addr: String,
    ports: [u16; 2],
}

impl Servers {
    pub(crate) fn start(e: &Env) -> Result<Self> {
        let port = free_port(SERVER_IP);
        let server = McpServer::start(e, SERVER_IP, port, "streamable-http")?;
        let legacy_port = free_port(SERVER_IP);
        let legacy = McpServer::start(e, SERVER_IP, legacy_port, "sse")?;
        let (addr, legacy_addr) = (format!("{SERVER_IP}:{port}"), format!("{SERVER_IP}:{legacy_port}"));
        Ok(Servers { server, legacy, addr, legacy_addr, ports: [port, legacy_port] })
    }

    /// Config capturing `agents` (name, cgroup) to both servers through route `mcp-tools`,
    /// spans to `otlp`; the scenario adds its policies.
    pub(crate) fn config(&self, agents: &[(&str, &Group)], otlp: &str) -> Value {
        let dests: Vec<Value> =
            self.ports.iter().map(|p| json!({"cidr": format!("{SERVER_IP}/32"), "port": p})).collect();
        json!({
            "capture": {"scope": agents.iter().map(|(_, g)| g.rel()).collect::<Vec<_>>(), "destinations": dests},
            "routes": [{"name": "mcp-tools", "protocol": "mcp", "match": {"addresses": [self.addr, self.legacy_addr]}}],
            "agents": agents.iter().map(|(n, g)| json!({"name": n, "match": {"cgroup": g.rel()}})).collect::<Vec<_>>(),
            "telemetry": {"otlp": {"endpoint": otlp, "protocol": "http_protobuf", "traces": true}},
        })
    }
}

/// Run the SDK client from `group`; its JSON report (`mode` `auto`, `legacy`, `legacy+sse`).
pub(crate) fn client(
    group: &Group,
    url: &str,
    mode: &str,
    calls: &[(&str, Value)],
    traceparent: Option<&str>,
) -> Result<Value> {
    let (mode, sse) = match mode.strip_suffix("+sse") {
        Some(m) => (m, true),
        None => (mode, false),
    };
    let mut args: Vec<String> = vec!["--url".into(), url.into(), "--mode".into(), mode.into()];
    if sse {
        // A lost answer would leave the legacy client waiting on its stream: give up sooner.
        args.extend(["--sse".into(), "--timeout".into(), "15".into()]);
    }
    for (tool, a) in calls {
        args.extend(["--call".into(), tool.to_string(), a.to_string()]);
    }
    if let Some(tp) = traceparent {
        args.extend(["--traceparent".into(), tp.into()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python(Some(group), None, "mcp_client.py", &argv, &[])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "mcp client ({mode}) failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).with_context(|| format!("client output {stdout}"))
}

fn names(v: &Value) -> Vec<&str> {
    v["tools"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// (a) Two agents, two rule sets, one real MCP server, both protocol generations: agent A
/// (group `restricted`: `delete_*` denied) lists only the other tools and its `delete_file`
/// call gets tollgate's JSON-RPC error (-32602, naming the rule) without reaching the server;
/// agent B calls it. Metrics, the audit-backed denial counter, the access log (client/server
/// info, session id) and the spans (`tools/call delete_file`, `execute_tool`, verdict, the
/// agent's trace continued and injected upstream) record every request.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn mcp_a_tool_rules_per_agent_with_the_real_sdk() -> Result<()> {
    let e = env()?;
    let ga = e.cg.group("mcpa-agent")?;
    let gb = e.cg.group("mcpb-agent")?;
    let servers = Servers::start(&e)?;
    let rx = OtlpReceiver::start()?;
    let mut cfg = servers.config(&[("mcp-a", &ga), ("mcp-b", &gb)], &rx.endpoint());
    cfg["agent_groups"] = json!([{"name": "restricted", "members": ["mcp-a"]}]);
    cfg["mcp"] = json!({"tools": [
        {"name": "no-delete", "match": {"group": "restricted"}, "deny": ["delete_*"]},
        {"name": "b-known-tools", "match": {"agent": "mcp-b"}, "allow": ["get_*", "add", "delete_file"]},
    ]});
    let Servers { server, legacy, addr, legacy_addr, .. } = servers;
    let t = e.tollgate(cfg, None)?;
    let url = format!("http://{addr}/mcp");
    let calls = [("get_weather", json!({"city": "Paris"})), ("delete_file", json!({"path": "/tmp/from-a"}))];
    let tp = format!("00-{TRACE}-{PARENT}-01");

    for mode in ["auto", "legacy"] {
        let a = client(&ga, &url, mode, &calls, Some(&tp))?;
        ensure!(names(&a) == ["add", "get_weather"], "agent A ({mode}) must list only allowed tools: {a}");
        let c = &a["calls"];
        ensure!(c[0]["ok"] == true && c[0]["result"] == "Sunny in Paris, 21C", "A's allowed call ({mode}): {a}");
        ensure!(c[1]["ok"] == false && c[1]["error"]["code"] == -32602, "A's denied call ({mode}): {a}");
        let msg = c[1]["error"]["message"].as_str().unwrap_or("");
        ensure!(msg == "tollgate: tool delete_file denied by rule no-delete", "denial message ({mode}): {msg}");
    }
    let b = client(&gb, &url, "legacy", &[("delete_file", json!({"path": "/tmp/from-b"}))], None)?;
    ensure!(names(&b) == ["add", "delete_file", "get_weather"], "agent B lists every tool: {b}");
    ensure!(b["calls"][0]["ok"] == true && b["calls"][0]["result"] == "deleted /tmp/from-b", "B's call: {b}");
    let b2 = client(&gb, &url, "auto", &[("add", json!({"a": 2, "b": 40}))], None)?;
    ensure!(b2["calls"][0]["result"] == "42", "B's add (auto): {b2}");

    // A body tollgate's parser refuses but a lenient server would read (a duplicate key, the
    // last of which Python's json keeps: `delete_file`) is refused for a governed agent, not
    // passed through unchecked.
    let smuggled = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_weather","name":"delete_file","arguments":{"path":"/tmp/smuggled"}}}"#;
    let r = tollgate_e2e::client::curl(
        Some(&ga),
        None,
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            "Accept: application/json, text/event-stream",
            "--data-binary",
            smuggled,
            &url,
        ],
    )?;
    ensure!(
        r.http_code == 400 && r.text().contains("-32700") && r.text().contains("tollgate: request is not JSON-RPC"),
        "smuggled duplicate key: {}",
        r.describe()
    );

    // A governed legacy POST whose session has no stream through tollgate (e.g. opened before
    // a restart) cannot have its tools/list answer filtered: refused, the client reconnects.
    let list = r#"{"jsonrpc":"2.0","id":9,"method":"tools/list"}"#;
    let orphan = format!("http://{legacy_addr}/messages/?session_id=00000000000000000000000000000000");
    let r = tollgate_e2e::client::curl(
        Some(&ga),
        None,
        &["-H", "Content-Type: application/json", "--data-binary", list, &orphan],
    )?;
    ensure!(
        r.http_code == 404 && r.text().contains("was not opened through tollgate"),
        "streamless legacy tools/list: {}",
        r.describe()
    );

    // The server saw B's delete and never A's.
    let deletes = server.tool_calls("delete_file");
    ensure!(
        deletes.len() == 1 && deletes[0]["args"]["path"] == "/tmp/from-b",
        "server's delete_file calls: {deletes:?}"
    );
    ensure!(server.tool_calls("get_weather").len() == 2, "server's get_weather calls: {:?}", server.log());

    // Legacy HTTP+SSE transport (GET /sse, POST /messages/?session_id=, answers on the GET
    // stream): governed on the stream. B's call runs; A's list is filtered on the stream and its
    // denied call is answered there with tollgate's error (the POST gets 202, as from the
    // server) and never reaches the server.
    let sse_url = format!("http://{legacy_addr}/sse");
    let b3 = client(&gb, &sse_url, "legacy+sse", &[("delete_file", json!({"path": "/tmp/b-sse"}))], None)?;
    ensure!(b3["calls"][0]["result"] == "deleted /tmp/b-sse", "B over the legacy transport: {b3}");
    ensure!(names(&b3) == ["add", "delete_file", "get_weather"], "B's legacy list: {b3}");
    let a3 = client(&ga, &sse_url, "legacy+sse", &[("delete_file", json!({"path": "/tmp/a-sse"}))], None)?;
    ensure!(names(&a3) == ["add", "get_weather"], "A's legacy list must be filtered on the stream: {a3}");
    let c = &a3["calls"][0];
    ensure!(
        c["ok"] == false
            && c["error"]["code"] == -32602
            && c["error"]["message"] == "tollgate: tool delete_file denied by rule no-delete",
        "A's legacy denied call: {a3}"
    );
    let deletes = legacy.tool_calls("delete_file");
    ensure!(
        deletes.len() == 1 && deletes[0]["args"]["path"] == "/tmp/b-sse",
        "legacy server's delete_file calls: {deletes:?}"
    );

    let calls_m = "tollgate_mcp_tool_calls_total";
    wait_metric(&t, calls_m, &[("agent", "mcp-a"), ("tool", "delete_file"), ("verdict", "denied")], 3.0)?;
    wait_metric(&t, calls_m, &[("agent", "mcp-a"), ("tool", "get_weather"), ("verdict", "allowed")], 2.0)?;
    wait_metric(&t, calls_m, &[("agent", "mcp-b"), ("tool", "delete_file"), ("verdict", "allowed")], 2.0)?;
    wait_metric(&t, "tollgate_mcp_tools_hidden_total", &[("agent", "mcp-a")], 3.0)?;
    let denials = [("agent", "mcp-a"), ("policy", "mcp_tools"), ("rule", "no-delete")];
    wait_metric(&t, "tollgate_policy_denials_total", &denials, 3.0)?;
    fn req<'a>(m: &'a str, o: &'a str) -> [(&'a str, &'a str); 4] {
        [("agent", "mcp-a"), ("route", "mcp-tools"), ("method", m), ("outcome", o)]
    }
    wait_metric(&t, "tollgate_mcp_requests_total", &req("tools/call", "denied"), 3.0)?;
    wait_metric(&t, "tollgate_mcp_requests_total", &req("tools/list", "ok"), 3.0)?;
    wait_metric(&t, "tollgate_mcp_requests_total", &req("initialize", "ok"), 2.0)?;
    wait_metric(&t, "tollgate_mcp_requests_total", &req("server/discover", "ok"), 1.0)?;
    let dur = [("agent", "mcp-b"), ("mcp_method_name", "tools/call"), ("gen_ai_tool_name", "add"), ("error_type", "")];
    wait_metric(&t, "mcp_client_operation_duration_seconds_count", &dur, 1.0)?;

    // Access log: one line per request, with the session and both implementations.
    let log = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let l: Vec<Value> = t.access_log().into_iter().filter(|l| l["kind"] == "mcp").collect();
        (l.iter().filter(|l| l["verdict"] == "denied").count() == 3).then_some(l)
    })
    .ok_or_else(|| anyhow!("no two denied mcp access-log lines: {:?}", t.access_log()))?;
    let denied: Vec<&Value> = log.iter().filter(|l| l["verdict"] == "denied").collect();
    for d in &denied {
        ensure!(
            d["agent"]["name"] == "mcp-a"
                && d["tool"] == "delete_file"
                && d["rule"] == "no-delete"
                && (d["status"] == 200 || (d["status"] == 202 && d["path"] == "/messages/")),
            "denied line: {d}"
        );
    }
    let init = log
        .iter()
        .find(|l| l["method"] == "initialize" && l["agent"]["name"] == "mcp-b")
        .ok_or_else(|| anyhow!("no initialize line for mcp-b: {log:?}"))?;
    ensure!(
        init["client"].as_str().is_some_and(|c| c.starts_with("mcp"))
            && init["server"] == "tollgate-e2e-tools"
            && init["session_id"].as_str().is_some_and(|s| !s.is_empty())
            && init["protocol_version"].as_str().is_some(),
        "initialize line: {init}"
    );
    let sid = init["session_id"].as_str().unwrap_or("");
    ensure!(
        log.iter().any(|l| l["method"] == "tools/call"
            && l["session_id"] == sid
            && l["tool"] == "delete_file"
            && l["server"] == "tollgate-e2e-tools"
            && l["client"] == init["client"]),
        "B's legacy call carries its session id {sid} and the session's client and server: {log:?}"
    );
    let discover = log.iter().find(|l| l["method"] == "server/discover").ok_or_else(|| anyhow!("no discover line"))?;
    ensure!(discover["server"] == "tollgate-e2e-tools" && discover["protocol_version"].is_string(), "{discover}");

    // Spans: semconv names and attributes, in the agent's trace; the server got tollgate's span
    // as its parent.
    let spans = rx
        .wait_spans(Duration::from_secs(15), |s| s.iter().filter(|s| s.name == "tools/call delete_file").count() >= 3)
        .ok_or_else(|| anyhow!("no tools/call delete_file spans: {:?}", rx.spans()))?;
    let denied_span = spans
        .iter()
        .find(|s| s.name == "tools/call delete_file" && s.attr("tollgate.mcp.verdict") == Some("denied"))
        .ok_or_else(|| anyhow!("no denied span"))?;
    ensure!(denied_span.trace_id == TRACE && denied_span.parent_span_id == PARENT, "{denied_span:?}");
    for (k, v) in [
        ("gen_ai.operation.name", "execute_tool"),
        ("gen_ai.tool.name", "delete_file"),
        ("mcp.method.name", "tools/call"),
        ("gen_ai.agent.name", "mcp-a"),
        ("tollgate.rule", "no-delete"),
        ("error.type", "tool_denied"),
    ] {
        ensure!(denied_span.attr(k) == Some(v), "span attribute {k}: {denied_span:?}");
    }
    ensure!(denied_span.attr("jsonrpc.request.id").is_some(), "{denied_span:?}");
    // Every request the server saw in the agent's trace names a span tollgate exported (the
    // legacy GET stream's span arrives when the stream ends).
    let parents = || -> Vec<String> {
        server
            .log()
            .iter()
            .filter_map(|l| l["traceparent"].as_str().map(str::to_string))
            .filter(|tp| tp.contains(TRACE))
            .map(|tp| tp.split('-').nth(2).unwrap_or("").to_string())
            .collect()
    };
    ensure!(!parents().is_empty(), "server saw no traceparent of the agent's trace: {:?}", server.log());
    let all = rx.wait_spans(Duration::from_secs(15), |s| {
        parents().iter().all(|p| p != PARENT && s.iter().any(|s| s.trace_id == TRACE && &s.span_id == p))
    });
    if all.is_none() {
        let ours: Vec<(String, String)> = rx.spans().into_iter().map(|s| (s.name, s.span_id)).collect();
        bail!("server parents {:?} are not all tollgate spans {ours:?}", parents());
    }
    Ok(())
}
