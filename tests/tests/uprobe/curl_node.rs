//! u4: curl (OpenSSL as the shared `libssl.so.*`) and Node.js's built-in `fetch` (the machine's
//! `/usr/bin/node`: official builds link OpenSSL statically and export its symbols, and drive
//! it through memory BIOs) each make a non-streamed and a streamed chat completion to the HTTPS
//! mock, trusting only the mock's CA; each is its own agent (cgroup), so each TLS path is
//! checked on its own.
//!
//! Both clients are held (curl reading its config from stdin, node waiting for a line) until
//! tollgate has probed their TLS library: a process's calls before its library file is probed
//! are missed by design (README, "TLS plaintext from uprobes"), and a test that raced the
//! rescan would be measuring that delay, not the counting.

use std::time::Duration;

use object::{Object, ObjectSymbol};
use serde_json::{json, Value};
use tollgate_e2e::cgroup::{command_in, Group};
use tollgate_e2e::client::client_script;
use tollgate_e2e::{anyhow, ensure, wait_for, Result};

use super::{assert_observed, setup_for, wait_attached, Held, Observed};
use crate::support::{wait_metric_at_least, MODEL};

const HOST: &str = "api.openai.com";
const CURL_AGENT: &str = "u4-curl";
const NODE_AGENT: &str = "u4-node";
const NODE: &str = "/usr/bin/node";
const KEY: &str = "sk-agent-own-key";

/// Does the ELF file define `SSL_write` in its dynamic symbol table (OpenSSL linked in and
/// exported, the static-executable path)?
fn exports_ssl_write(path: &str) -> Result<bool> {
    let file = std::fs::File::open(path)?;
    let cache = object::ReadCache::new(file);
    let obj = object::File::parse(&cache).map_err(|e| anyhow!("{path}: {e}"))?;
    Ok(obj.dynamic_symbols().any(|s| s.is_definition() && s.name_bytes().is_ok_and(|n| n == b"SSL_write")))
}

/// A chat request body: `i` makes each call's prompt (and so its usage) differ.
fn chat_body(i: usize, stream: bool) -> Value {
    let mut b = json!({"model": MODEL, "max_tokens": 16,
        "messages": [{"role": "user", "content": format!("Call {i}: name a colour and a number.")}]});
    if stream {
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// The usage a curl response body reported: the JSON body's, or a stream's usage chunk (the
/// stream must end with `[DONE]`).
fn curl_usage(body: &str, stream: bool) -> Result<Value> {
    if !stream {
        let v: Value = serde_json::from_str(body).map_err(|e| anyhow!("{e}: {body}"))?;
        return Ok(v["usage"].clone());
    }
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::trim).collect();
    ensure!(data.last() == Some(&"[DONE]"), "stream did not end with [DONE]: {body}");
    let usage = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .map(|c| c["usage"].clone())
        .rfind(|u| u.is_object())
        .ok_or_else(|| anyhow!("no usage chunk in the stream: {body}"))?;
    Ok(usage)
}

/// curl in the curl agent's cgroup and netns: one process, one connection (kept alive across
/// `next`), a non-streamed then a streamed call. `--http1.1`: the mock offers `h2` by ALPN and
/// curl (built with nghttp2) would take it; tollgate does not parse HTTP/2 from the uprobes.
fn curl_calls(o: &Observed) -> Result<Vec<Value>> {
    let g = &o.g;
    let dir = o.e.scratch.path();
    let mut config = String::new();
    for (i, stream) in [false, true].into_iter().enumerate() {
        let req = dir.join(format!("curl-req-{i}.json"));
        std::fs::write(&req, serde_json::to_vec(&chat_body(i, stream))?)?;
        if i > 0 {
            config.push_str("next\n");
        }
        config.push_str(&format!(
            "url = \"https://{HOST}/v1/chat/completions\"\nhttp1.1\ncacert = \"{}\"\nmax-time = 15\n\
             header = \"Content-Type: application/json\"\nheader = \"Authorization: Bearer {KEY}\"\n\
             data-binary = \"@{}\"\ndump-header = \"{}\"\noutput = \"{}\"\n",
            o.mock_ca,
            req.display(),
            dir.join(format!("curl-head-{i}")).display(),
            dir.join(format!("curl-body-{i}")).display(),
        ));
    }
    let mut cmd = command_in(Some(g), Some(&o.ns), "curl");
    cmd.args(["-sS", "--noproxy", "*", "-K", "-"]);
    let held = Held::spawn(cmd, &[])?;
    held.wait_exec("/usr/bin/curl")?;
    let libs = held.wait_libssl()?;
    let probed = wait_attached(o, "shared", &libs[0])?;
    println!("u4: curl maps {libs:?}; {probed}");
    held.release(config.as_bytes())?;
    let mut calls = Vec::new();
    let mut peers = Vec::new();
    for (i, stream) in [false, true].into_iter().enumerate() {
        let head = std::fs::read_to_string(dir.join(format!("curl-head-{i}")))?;
        let body = std::fs::read_to_string(dir.join(format!("curl-body-{i}")))?;
        ensure!(head.starts_with("HTTP/1.1 200"), "curl call {i} (libssl {libs:?}): {head}\n{body}");
        peers.extend(head.lines().filter_map(|l| l.strip_prefix("x-mock-peer: ")).map(str::to_string));
        calls.push(json!({"stream": stream, "usage": curl_usage(&body, stream)?}));
    }
    // The mock saw curl's own socket, the same for both calls.
    ensure!(peers.len() == 2 && peers[0] == peers[1], "curl did not keep its connection: peers {peers:?}");
    Ok(calls)
}

/// Which OpenSSL Node's `fetch` runs through on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeTls {
    /// Linked into the executable and exported (official builds).
    Static,
    /// A shared `libssl.so*` (distribution builds).
    Shared,
}

/// `tests/clients/openai_fetch.js` in the node agent's cgroup and netns, trusting the mock's CA
/// through NODE_EXTRA_CA_CERTS. Returns its calls and the TLS path it took.
fn node_calls(o: &Observed, group: &Group) -> Result<(Vec<Value>, NodeTls)> {
    let script = client_script("openai_fetch.js");
    let mut cmd = command_in(Some(group), Some(&o.ns), NODE);
    cmd.arg(&script).arg(MODEL);
    let base = format!("https://{HOST}/v1");
    let env =
        [("OPENAI_BASE_URL", base.as_str()), ("OPENAI_API_KEY", KEY), ("NODE_EXTRA_CA_CERTS", o.mock_ca.as_str())];
    let held = Held::spawn(cmd, &env)?;
    held.wait_exec(NODE)?;
    let path = if exports_ssl_write(NODE)? { NodeTls::Static } else { NodeTls::Shared };
    let probed = match path {
        NodeTls::Static => wait_attached(o, "static", NODE)?,
        NodeTls::Shared => {
            let libs = held.wait_libssl()?;
            println!("u4: {NODE} does not export SSL_write; it maps {libs:?}");
            wait_attached(o, "shared", &libs[0])?
        }
    };
    println!("u4: node TLS path: {path:?}; {probed}");
    let out = held.release(b"go\n")?;
    let v: Value =
        serde_json::from_slice(&out).map_err(|e| anyhow!("node output ({e}): {}", String::from_utf8_lossy(&out)))?;
    let calls = v.as_array().cloned().unwrap_or_default();
    ensure!(calls.len() == 2 && calls[1]["stream"] == true, "node calls {v}");
    Ok((calls, path))
}

/// The access log has `n` llm lines for `agent`, all through the uprobes, one streamed.
fn assert_lines(o: &Observed, agent: &str, n: usize) -> Result<()> {
    let lines = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let l: Vec<Value> =
            o.t.access_log().into_iter().filter(|l| l["kind"] == "llm" && l["agent"]["name"] == agent).collect();
        (l.len() == n).then_some(l)
    })
    .ok_or_else(|| anyhow!("no {n} llm access-log lines for {agent}:\n{}", o.t.stderr_tail(20)))?;
    for l in &lines {
        ensure!(l["capture"] == "uprobe" && l["tokens_estimated"] == false, "access-log line {l}");
    }
    ensure!(lines.iter().filter(|l| l["stream"] == true).count() == 1, "streamed lines of {agent}: {lines:?}");
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u4_curl_shared_libssl_and_node_fetch_static_openssl_observed() -> Result<()> {
    let o = setup_for(&[CURL_AGENT, NODE_AGENT], 54, HOST, "openai")?;
    let node_group = o.more.first().ok_or_else(|| anyhow!("no node agent"))?;

    let curl = curl_calls(&o)?;
    assert_observed(&o, CURL_AGENT, &curl)?;
    assert_lines(&o, CURL_AGENT, 2)?;

    let (node, path) = node_calls(&o, node_group)?;
    let checked = assert_observed(&o, NODE_AGENT, &node).and_then(|()| assert_lines(&o, NODE_AGENT, 2));
    ensure!(checked.is_ok(), "node fetch through {path:?} OpenSSL ({NODE}) not counted exactly: {checked:?}");
    if path == NodeTls::Static {
        wait_metric_at_least(&o.t, "tollgate_uprobe_attached_files", &[("kind", "static")], 1.0)?;
    }
    // Every call reached the mock over the agents' own TLS sessions.
    ensure!(o.mock.chat_requests()? == 4, "mock stats {}", o.mock.stats(None)?);
    Ok(())
}
