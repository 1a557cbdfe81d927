//! MCP federation scenario (issue 7, point 3): one endpoint on a captured address, served by
//! tollgate, federating a real Streamable HTTP `mcp` server and a real stdio `mcp` server that
//! tollgate spawns. The SDK's real client, in two agents' cgroups, lists and calls tools of
//! both; tool rules apply to the federated names; the stdio server is killed and restarted by
//! tollgate, and the HTTP server is restarted under a live client session, which tollgate
//! re-initialises upstream without the client noticing.

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::{client_script, curl, venv_python, CurlOut};
use tollgate_e2e::{anyhow, ensure, free_port, wait_for, Context, Result};

use super::{client, names, read_log, McpServer, SERVER_IP};
use crate::support::{env, wait_metric};

/// Address agents use for the federation: captured, nothing listens there.
const FED_IP: &str = "127.0.0.3";

/// PIDs of processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).replace('\0', " ").contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// One raw JSON-RPC POST from `group` (captured), with an optional session.
fn rpc(group: &Group, url: &str, session: Option<&str>, body: &Value) -> Result<CurlOut> {
    let data = body.to_string();
    let sh = session.map(|s| format!("Mcp-Session-Id: {s}"));
    let mut args = vec![
        "-H",
        "Content-Type: application/json",
        "-H",
        "Accept: application/json, text/event-stream",
        "-H",
        "MCP-Protocol-Version: 2025-11-25",
    ];
    if let Some(h) = &sh {
        args.extend(["-H", h.as_str()]);
    }
    args.extend(["--data-binary", data.as_str(), url]);
    curl(Some(group), None, &args)
}

fn body(r: &CurlOut) -> Result<Value> {
    serde_json::from_slice(&r.body).with_context(|| format!("not JSON: {}", r.describe()))
}

fn call_text(v: &Value) -> &str {
    v.pointer("/result/content/0/text").and_then(Value::as_str).unwrap_or("")
}

/// (c) Federation of two real MCP servers, one of them stdio, with the real SDK client.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn mcp_c_federation_of_http_and_stdio_servers_with_the_real_sdk() -> Result<()> {
    let e = env()?;
    let ga = e.cg.group("feda-agent")?;
    let gb = e.cg.group("fedb-agent")?;
    let port = free_port(SERVER_IP);
    let web = McpServer::start_labeled(&e, SERVER_IP, port, "streamable-http", "web")?;
    let fed_port = free_port(FED_IP);
    let fed_addr = format!("{FED_IP}:{fed_port}");
    let stdio_log = e.path("fed-stdio-calls.jsonl");
    let stdio_log_s = stdio_log.display().to_string();
    let command = json!([
        venv_python().display().to_string(),
        client_script("mcp_server.py").display().to_string(),
        "--transport",
        "stdio",
        "--label",
        "local",
        "--log",
        stdio_log_s,
    ]);
    let cfg = json!({
        "capture": {
            "scope": [ga.rel(), gb.rel()],
            "destinations": [{"cidr": format!("{FED_IP}/32"), "port": fed_port}],
        },
        "routes": [{"name": "fed-tools", "protocol": "mcp", "federation": "tools", "match": {"addresses": [fed_addr]}}],
        "agents": [
            {"name": "fed-a", "match": {"cgroup": ga.rel()}},
            {"name": "fed-b", "match": {"cgroup": gb.rel()}},
        ],
        "mcp": {
            "tools": [{"name": "a-no-delete", "match": {"agent": "fed-a"}, "deny": ["*__delete_file"]}],
            "tool_limits": [{"name": "b-weather", "match": {"agent": "fed-b"}, "tools": ["web__get_weather"], "limit": 1, "window": "1m"}],
            "federations": [{
                "name": "tools",
                "servers": [
                    {"name": "web", "url": format!("http://{SERVER_IP}:{port}/mcp")},
                    {"name": "local", "command": command, "env": {"PYTHONDONTWRITEBYTECODE": "1"}},
                ],
            }],
        },
    });
    let t = e.tollgate(cfg, None)?;
    let up = |server: &str, v: f64| {
        wait_metric(&t, "tollgate_mcp_upstream_up", &[("federation", "tools"), ("server", server)], v)
    };
    // The stdio server is spawned and initialised at start.
    wait_for(Duration::from_secs(20), Duration::from_millis(200), || up("local", 1.0).ok())
        .ok_or_else(|| anyhow!("stdio server never became ready: {}", t.stderr_tail(30)))?;
    let url = format!("http://{fed_addr}/mcp");

    // Agent A: tools of both servers, prefixed; its rule hides and refuses both deletes.
    let calls = [
        ("web__get_weather", json!({"city": "Oslo"})),
        ("local__add", json!({"a": 2, "b": 3})),
        ("local__delete_file", json!({"path": "/tmp/fed-a"})),
    ];
    let a = client(&ga, &url, "legacy", &calls, None)?;
    ensure!(
        names(&a) == ["local__add", "local__get_weather", "web__add", "web__get_weather"],
        "agent A's federated list: {a}"
    );
    let c = &a["calls"];
    ensure!(c[0]["ok"] == true && c[0]["result"] == "Sunny in Oslo, 21C", "web tool via the federation: {a}");
    ensure!(c[1]["ok"] == true && c[1]["result"] == "5", "stdio tool via the federation: {a}");
    ensure!(
        c[2]["ok"] == false
            && c[2]["error"]["code"] == -32602
            && c[2]["error"]["message"] == "tollgate: tool local__delete_file denied by rule a-no-delete",
        "A's denied federated call: {a}"
    );
    ensure!(a["server"]["name"] == "tollgate-federation-tools", "server info: {a}");
    // Agent B (the SDK's default mode probes server/discover, then falls back) sees all six.
    // B's call-rate limit (one get_weather a minute) applies to the federated name.
    let weather = ("web__get_weather", json!({"city": "Lima"}));
    let calls = [("web__delete_file", json!({"path": "/tmp/fed-b"})), weather.clone(), weather];
    let b = client(&gb, &url, "auto", &calls, None)?;
    ensure!(names(&b).len() == 6, "agent B's federated list: {b}");
    ensure!(b["calls"][0]["result"] == "deleted /tmp/fed-b", "B's delete: {b}");
    ensure!(b["calls"][1]["result"] == "Sunny in Lima, 21C", "B's first weather call: {b}");
    ensure!(
        b["calls"][2]["error"]["code"] == -32029 && b["calls"][2]["error"]["data"]["rule"] == "b-weather",
        "B's second weather call is over its limit: {b}"
    );
    let stdio_calls = |tool: &str| read_log(&stdio_log).into_iter().filter(|l| l["tool"] == tool).count();
    ensure!(stdio_calls("add") == 1 && stdio_calls("delete_file") == 0, "stdio log: {:?}", read_log(&stdio_log));
    ensure!(web.tool_calls("get_weather").len() == 2, "web log (A's and B's first): {:?}", web.log());
    let deletes = web.tool_calls("delete_file");
    ensure!(deletes.len() == 1 && deletes[0]["args"]["path"] == "/tmp/fed-b", "web deletes: {deletes:?}");

    // The stdio server dies: tollgate restarts and re-initialises it; the next session works.
    let pids = pids_with(&stdio_log_s);
    ensure!(pids.len() == 1, "one stdio server process expected, found {pids:?}");
    let st = std::process::Command::new("kill").args(["-9", &pids[0].to_string()]).status()?;
    ensure!(st.success(), "kill -9 {}", pids[0]);
    wait_metric(&t, "tollgate_mcp_upstream_restarts_total", &[("server", "local")], 1.0)?;
    wait_for(Duration::from_secs(20), Duration::from_millis(200), || up("local", 1.0).ok())
        .ok_or_else(|| anyhow!("stdio server not back: {}", t.stderr_tail(30)))?;
    let again = client(&ga, &url, "legacy", &[("local__add", json!({"a": 40, "b": 2}))], None)?;
    ensure!(again["calls"][0]["result"] == "42", "stdio tool after the restart: {again}");
    ensure!(pids_with(&stdio_log_s).iter().all(|p| !pids.contains(p)), "a new process serves");

    // A live session across an HTTP server restart: tollgate initialises the upstream session
    // again and the client's session carries on.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "curl-client", "version": "1"}}});
    let r = rpc(&ga, &url, None, &init)?;
    let sid = r.header("mcp-session-id").map(str::to_string).ok_or_else(|| anyhow!("no session: {}", r.describe()))?;
    ensure!(body(&r)?["result"]["protocolVersion"] == "2025-11-25", "{}", r.describe());
    let r = rpc(&ga, &url, Some(&sid), &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
    ensure!(r.http_code == 202, "initialized: {}", r.describe());
    let add = |id: u64, a: i64| json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "web__add", "arguments": {"a": a, "b": a}}});
    let r = rpc(&ga, &url, Some(&sid), &add(2, 1))?;
    ensure!(call_text(&body(&r)?) == "2", "web__add before the restart: {}", r.describe());
    drop(web);
    let web = McpServer::start_labeled(&e, SERVER_IP, port, "streamable-http", "web")?;
    let r = rpc(&ga, &url, Some(&sid), &add(3, 2))?;
    ensure!(call_text(&body(&r)?) == "4", "web__add after the restart: {}", r.describe());
    wait_metric(&t, "tollgate_mcp_upstream_reinitializations_total", &[("server", "web")], 1.0)?;
    ensure!(web.tool_calls("add").len() == 2, "the restarted server ran the call: {:?}", web.log());

    // Prompts and resources are federated too.
    let r = rpc(&ga, &url, Some(&sid), &json!({"jsonrpc": "2.0", "id": 4, "method": "prompts/list"}))?;
    let prompts: Vec<String> = body(&r)?["result"]["prompts"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    ensure!(prompts == ["web__greet", "local__greet"], "prompts: {}", r.describe());
    let get = json!({"jsonrpc": "2.0", "id": 5, "method": "prompts/get", "params": {"name": "local__greet", "arguments": {"name": "Ada"}}});
    let r = rpc(&ga, &url, Some(&sid), &get)?;
    let text = body(&r)?.pointer("/result/messages/0/content/text").and_then(Value::as_str).map(str::to_string);
    ensure!(text.as_deref() == Some("Hello Ada, from local"), "prompts/get: {}", r.describe());
    let r = rpc(&ga, &url, Some(&sid), &json!({"jsonrpc": "2.0", "id": 6, "method": "resources/list"}))?;
    let uris: Vec<String> = body(&r)?["result"]["resources"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["uri"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    ensure!(uris == ["tollgate://web/motd", "tollgate://local/motd"], "resources: {}", r.describe());
    let read =
        json!({"jsonrpc": "2.0", "id": 7, "method": "resources/read", "params": {"uri": "tollgate://local/motd"}});
    let r = rpc(&ga, &url, Some(&sid), &read)?;
    let text = body(&r)?.pointer("/result/contents/0/text").and_then(Value::as_str).map(str::to_string);
    ensure!(text.as_deref() == Some("motd of local"), "resources/read: {}", r.describe());

    // Sessions belong to their agent, end with DELETE, and the endpoint offers no GET stream.
    let r = rpc(&gb, &url, Some(&sid), &add(8, 3))?;
    ensure!(r.http_code == 404, "another agent's use of the session: {}", r.describe());
    let r = rpc(&ga, &url, None, &add(9, 3))?;
    ensure!(r.http_code == 400, "a request without a session: {}", r.describe());
    // A browser origin (DNS rebinding of a web page onto the endpoint) is refused.
    let init_s = init.to_string();
    let evil =
        ["-H", "Origin: http://evil.example", "-H", "Content-Type: application/json", "--data-binary", &init_s, &url];
    let r = curl(Some(&ga), None, &evil)?;
    ensure!(r.http_code == 403 && r.text().contains("origin not allowed"), "browser origin: {}", r.describe());
    let r = curl(Some(&ga), None, &["-H", "Accept: text/event-stream", &url])?;
    ensure!(r.http_code == 405 && r.header("allow") == Some("POST, DELETE"), "GET: {}", r.describe());
    let sh = format!("Mcp-Session-Id: {sid}");
    let r = curl(Some(&ga), None, &["-X", "DELETE", "-H", &sh, &url])?;
    ensure!(r.http_code == 200, "DELETE: {}", r.describe());
    let r = rpc(&ga, &url, Some(&sid), &add(10, 3))?;
    ensure!(r.http_code == 404, "the ended session: {}", r.describe());

    let calls_m = "tollgate_mcp_tool_calls_total";
    wait_metric(&t, calls_m, &[("agent", "fed-a"), ("tool", "local__delete_file"), ("verdict", "denied")], 1.0)?;
    wait_metric(&t, calls_m, &[("agent", "fed-b"), ("tool", "web__delete_file"), ("verdict", "allowed")], 1.0)?;
    wait_metric(&t, calls_m, &[("agent", "fed-b"), ("tool", "web__get_weather"), ("verdict", "rate_limited")], 1.0)?;
    wait_metric(&t, "tollgate_mcp_tools_hidden_total", &[("agent", "fed-a")], 4.0)?;
    wait_metric(&t, "tollgate_mcp_federation_sessions", &[("federation", "tools")], 0.0)?;
    Ok(())
}
