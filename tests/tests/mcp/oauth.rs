//! MCP OAuth scenario (issue 7, point 4): the federation endpoint on an explicit listener is an
//! OAuth protected resource. A test authorization server publishes a JWKS and mints tokens;
//! tollgate checks them as the MCP authorization spec asks (401 with `resource_metadata` for no
//! or a bad token, 403 `insufficient_scope` for missing scopes), maps scopes to tools, names the
//! caller from the token, follows a key rotation, and calls the upstream server with a token it
//! obtained by RFC 8693 exchange — never with the client's own.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tollgate_e2e::client::{curl, python, CurlOut};
use tollgate_e2e::oauth::AuthServer;
use tollgate_e2e::{anyhow, ensure, free_port, Context, Result};

use super::{read_log, McpServer, SERVER_IP};
use crate::support::{env, wait_metric};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// POST one JSON-RPC message with a bearer token (or none), from outside every cgroup.
fn post(url: &str, token: Option<&str>, session: Option<&str>, body: &Value) -> Result<CurlOut> {
    let data = body.to_string();
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let sh = session.map(|s| format!("Mcp-Session-Id: {s}"));
    let mut args = vec!["-H", "Content-Type: application/json", "-H", "Accept: application/json, text/event-stream"];
    for h in [&auth, &sh].into_iter().flatten() {
        args.extend(["-H", h.as_str()]);
    }
    args.extend(["--data-binary", data.as_str(), url]);
    curl(None, None, &args)
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}"#;

/// (d) OAuth on the federation endpoint, with the real SDK client and a JWKS server.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn mcp_d_federation_oauth_with_jwks_and_token_exchange() -> Result<()> {
    let e = env()?;
    let port = free_port(SERVER_IP);
    let web = McpServer::start_labeled(&e, SERVER_IP, port, "streamable-http", "web")?;
    let as_port = free_port("127.0.0.1");
    let auth = AuthServer::start(format!("127.0.0.1:{as_port}").parse()?, "tollgate", "s3cret")?;
    let secret = e.path("client-secret");
    std::fs::write(&secret, "s3cret\n")?;
    let lport = free_port("127.0.0.1");
    let url = format!("http://127.0.0.1:{lport}/mcp");
    let cfg = json!({
        "routes": [{"name": "fed-oauth", "protocol": "mcp", "federation": "secure", "listener": format!("127.0.0.1:{lport}")}],
        "mcp": {"federations": [{
            "name": "secure",
            "servers": [{
                "name": "web",
                "url": format!("http://{SERVER_IP}:{port}/mcp"),
                "token_audience": "http://web.internal/mcp",
                "token_scope": "tools",
            }, {
                // Same server under another name, with a scope the callers do not hold: its
                // exchange fails, and only requests to it fail.
                "name": "vault",
                "url": format!("http://{SERVER_IP}:{port}/mcp"),
                "token_audience": "http://vault.internal/mcp",
                "token_scope": "vault.admin",
            }],
            "auth": {
                "issuer": auth.issuer(),
                "jwks_url": auth.jwks_url(),
                "audience": url,
                "scopes_supported": ["mcp", "weather.read", "tools.admin"],
                "required_scopes": ["mcp"],
                "tool_scopes": [
                    {"scope": "weather.read", "tools": ["web__get_weather"]},
                    {"scope": "tools.admin", "tools": ["web__*", "vault__*"]},
                ],
                "agent_claim": "azp",
                "jwks_min_refetch": "1s",
                "token_exchange": {"endpoint": auth.token_url(), "client_id": "tollgate", "client_secret": {"file": secret}},
            },
        }]},
    });
    let t = e.tollgate(cfg, None)?;
    let meta_url = format!("http://127.0.0.1:{lport}/.well-known/oauth-protected-resource/mcp");
    let token = |aud: &str, scope: &str, exp: u64| {
        auth.mint(json!({"sub": "user-7", "azp": "planner-bot", "aud": aud, "scope": scope, "exp": exp}))
    };
    let good = token(&url, "mcp weather.read tools", now() + 300);
    let init: Value = serde_json::from_str(INIT)?;

    // No token: 401 naming the metadata; the metadata names the authorization server.
    let r = post(&url, None, None, &init)?;
    let want = format!("Bearer resource_metadata=\"{meta_url}\", scope=\"mcp\"");
    ensure!(r.http_code == 401 && r.header("www-authenticate") == Some(want.as_str()), "no token: {}", r.describe());
    let m = curl(None, None, &[&meta_url])?;
    let meta: Value = serde_json::from_slice(&m.body).context("metadata JSON")?;
    ensure!(
        m.http_code == 200
            && meta["resource"] == url.as_str()
            && meta["authorization_servers"][0] == auth.issuer().as_str(),
        "metadata: {}",
        m.describe()
    );
    // Wrong audience, expired, missing scope.
    for (what, tok) in [
        ("wrong audience", token("http://other.example/mcp", "mcp", now() + 300)),
        ("expired", token(&url, "mcp", now() - 600)),
    ] {
        let r = post(&url, Some(&tok), None, &init)?;
        let h = r.header("www-authenticate").unwrap_or("");
        ensure!(
            r.http_code == 401 && h.starts_with("Bearer error=\"invalid_token\"") && h.contains(&meta_url),
            "{what}: {}",
            r.describe()
        );
    }
    let r = post(&url, Some(&token(&url, "weather.read", now() + 300)), None, &init)?;
    let h = r.header("www-authenticate").unwrap_or("");
    ensure!(
        r.http_code == 403 && h.contains("error=\"insufficient_scope\"") && h.contains("scope=\"mcp\""),
        "scope: {}",
        r.describe()
    );

    // The real SDK client with a good token: scopes decide the tools it sees and calls.
    let args =
        ["--url", &url, "--mode", "legacy", "--bearer", &good, "--call", "web__get_weather", r#"{"city": "Rome"}"#];
    let out = python(None, None, "mcp_client.py", &args, &[])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "sdk client: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(stdout.trim())?;
    ensure!(v["tools"] == json!(["web__get_weather"]), "tools the token grants: {v}");
    ensure!(v["calls"][0]["result"] == "Sunny in Rome, 21C", "granted call: {v}");

    // A tool outside the token's scopes: step-up 403 before anything reaches the server.
    let r = post(&url, Some(&good), None, &init)?;
    let sid = r.header("mcp-session-id").map(str::to_string).ok_or_else(|| anyhow!("{}", r.describe()))?;
    let add = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "web__add", "arguments": {"a": 1, "b": 2}}});
    let r = post(&url, Some(&good), Some(&sid), &add)?;
    let h = r.header("www-authenticate").unwrap_or("");
    ensure!(
        r.http_code == 403 && h.contains("insufficient_scope") && h.contains("tools.admin"),
        "add: {}",
        r.describe()
    );
    ensure!(web.tool_calls("add").is_empty(), "the refused call reached the server: {:?}", web.log());

    // Upstream got an exchanged token, never the client's.
    let ex = auth.exchanges();
    let issued: Vec<String> = ex.iter().filter_map(|x| x.issued.clone()).collect();
    let web_ex = |x: &&tollgate_e2e::oauth::Exchange| x.field("audience") == Some("http://web.internal/mcp");
    ensure!(
        !issued.is_empty()
            && ex.iter().all(|x| x.client_authenticated)
            && ex.iter().filter(web_ex).all(|x| x.issued.is_some())
            && ex.iter().any(|x| !web_ex(&x))
            && ex.iter().filter(|x| !web_ex(x)).all(|x| x.issued.is_none() && x.status >= 400),
        "exchanges (web issued, vault refused): {ex:?}"
    );
    let seen: Vec<String> =
        read_log(web.log_path()).into_iter().filter_map(|l| l["authorization"].as_str().map(str::to_string)).collect();
    ensure!(!seen.is_empty(), "the upstream saw no token");
    ensure!(
        seen.iter().all(|a| issued.iter().any(|i| a == &format!("Bearer {i}")) && !a.contains(&good)),
        "upstream tokens {seen:?} must be exchanged ones {issued:?}"
    );

    // The failed exchange fails only the vault's requests (the web calls above were served).
    let admin = token(&url, "mcp weather.read tools tools.admin", now() + 300);
    let r = post(&url, Some(&admin), None, &init)?;
    let sid2 = r.header("mcp-session-id").map(str::to_string).ok_or_else(|| anyhow!("{}", r.describe()))?;
    let vcall = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "vault__get_weather", "arguments": {"city": "x"}}});
    let r = post(&url, Some(&admin), Some(&sid2), &vcall)?;
    let v: Value = serde_json::from_slice(&r.body).context("vault call JSON")?;
    ensure!(
        v["error"]["code"] == -32603 && v["error"]["message"].as_str().is_some_and(|m| m.contains("token exchange")),
        "vault call: {}",
        r.describe()
    );

    // Key rotation: a token signed by the new key is accepted (one JWKS refetch); the old
    // key is gone, so tokens it signed are refused.
    let fetches = auth.jwks_fetches();
    auth.rotate(false)?;
    // Unknown key ids trigger at most one JWKS fetch per `jwks_min_refetch` (1 s here).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let rotated = token(&url, "mcp weather.read tools", now() + 300);
    let r = post(&url, Some(&rotated), None, &init)?;
    ensure!(r.http_code == 200, "token of the new key: {}", r.describe());
    ensure!(auth.jwks_fetches() == fetches + 1, "one refetch on the new kid: {} -> {}", fetches, auth.jwks_fetches());
    let r = post(&url, Some(&good), None, &init)?;
    ensure!(r.http_code == 401, "token of the removed key: {}", r.describe());

    // The caller is named by the token's azp (an explicit listener has no kernel identity).
    let labels = [("agent", "planner-bot"), ("tool", "web__get_weather"), ("verdict", "allowed")];
    wait_metric(&t, "tollgate_mcp_tool_calls_total", &labels, 1.0)?;
    for (reason, n) in
        [("missing", 1.0), ("audience", 1.0), ("expired", 1.0), ("insufficient_scope", 1.0), ("tool_scope", 1.0)]
    {
        wait_metric(&t, "tollgate_mcp_auth_refusals_total", &[("federation", "secure"), ("reason", reason)], n)?;
    }
    Ok(())
}
