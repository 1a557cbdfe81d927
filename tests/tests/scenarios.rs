//! Real-kernel end-to-end scenarios for tollgate.
//!
//! Each scenario starts the real tollgate binary (eBPF programs attached to a private cgroup2
//! mount), a mock OpenAI upstream, and real clients (curl, the Python `openai` SDK) placed in
//! cgroups and network namespaces, then asserts on what the client received, what the upstream
//! saw (`x-mock-peer`, its request counters) and what tollgate exported (`/metrics`, access log).
//!
//! They need root, BPF and built binaries, so they are `#[ignore]`d for a plain `cargo test`;
//! `cargo xtask test` builds everything and runs them with `--ignored --test-threads=1`. A
//! global lock keeps them serial even without that flag.

mod a2a;
mod bounds;
mod capture_safety;
mod gateway;
mod governance;
mod k8s;
mod mcp;
mod observe;
mod support;
mod trust;
mod uprobe;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::{curl, python};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::netns::Netns;
use tollgate_e2e::openai::{self, ChatRequest, Reply};
use tollgate_e2e::tollgate::{self as tg, base_config, Tollgate};
use tollgate_e2e::{anyhow, bail, ensure, merge, wait_for, Context, Result};

use support::*;

// ---------------------------------------------------------------------------------------------
// 0. Harness baseline, no tollgate: proves the cgroup/netns/curl/SDK plumbing itself works, so a
//    failure in the scenarios below is tollgate's, not the harness's.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s0_harness_baseline_without_tollgate() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s0-agent")?;
    ensure!(g.dir().starts_with(e.cg.root()), "group outside the mount");
    let ns = Netns::create("s0-pod", 20)?;
    ns.set_hosts(&[(ns.host_addr().to_string(), "api.openai.com")])?;
    let ca = TestCa::new(e.scratch.path(), "s0", "tollgate e2e s0 CA")?;
    let host = ns.host_addr().to_string();
    let cert = ca.issue(e.scratch.path(), "s0-upstream", &["api.openai.com", &host])?;
    let tls_addr = format!("{host}:8443");
    let mock = e.mock(&[
        "--tls-listen",
        &tls_addr,
        "--listen",
        "127.0.0.2:8000",
        "--cert",
        &cert.cert_path.to_string_lossy(),
        "--key",
        &cert.key_path.to_string_lossy(),
    ])?;

    // A process started in the group is in the group.
    let out = g.command("cat", None).arg("/proc/self/cgroup").output()?;
    let cg_line = String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with("0::")).map(str::to_string);
    ensure!(cg_line.as_deref() == Some(&*format!("0::{}", g.rel())), "child cgroup {cg_line:?}, want {}", g.rel());

    // curl from the group on the host: direct, and the mock answers what we compute.
    let req = ChatRequest::simple(MODEL, "baseline");
    let r = chat_curl(&e, Some(&g), "http://127.0.0.2:8000/v1/chat/completions", &req)?;
    assert_completion(&r, &openai::reply_for(&req))?;
    assert_direct(&r)?;

    // curl from the pod netns resolves api.openai.com via /etc/netns and reaches the host veth.
    let cacert = ca.cert_path.to_string_lossy().into_owned();
    let r = curl(Some(&g), Some(&ns), &["--cacert", &cacert, "https://api.openai.com:8443/"])?;
    ensure!(r.exit == 0 && r.text() == openai::ORIGIN_BODY, "pod curl: {}", r.describe());
    ensure!(r.local.is_some_and(|l| l.ip() == ns.pod_addr()), "pod curl not from the pod address: {}", r.describe());
    assert_direct(&r)?;

    // The unmodified SDK in the pod trusts exactly what SSL_CERT_FILE says.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "baseline sdk"}]}).to_string();
    let base_url = "https://api.openai.com:8443/v1";
    let env_ok = [("OPENAI_API_KEY", "sk-test-e2e"), ("OPENAI_BASE_URL", base_url), ("SSL_CERT_FILE", cacert.as_str())];
    for stream in [false, true] {
        let mut args = vec!["--request", body.as_str()];
        if stream {
            args.push("--stream");
        }
        let out = python(Some(&g), Some(&ns), "openai_chat.py", &args, &env_ok)?;
        let v: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        check_sdk_result(&out, v, &openai::reply_for(&ChatRequest::simple(MODEL, "baseline sdk")), stream)?;
    }
    let out = python(Some(&g), Some(&ns), "openai_chat.py", &["--request", &body], &env_ok[..2])?;
    ensure!(!out.status.success(), "SDK trusted the test CA without SSL_CERT_FILE");
    ensure!(mock.chat_requests()? == 3, "mock chat requests {}", mock.chat_requests()?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. curl in a captured cgroup -> plaintext OpenAI-compatible endpoint (CIDR + port rule).
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s1_plaintext_curl_is_proxied_and_counted() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s1-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let t = e.tollgate(plaintext_route(mock.http[0], &[&g], "s1-agent", &g), None)?;

    let req = ChatRequest::simple(MODEL, "What is the capital of France? Answer in one word.");
    let reply = openai::reply_for(&req);
    let r = chat_curl(&e, Some(&g), "http://127.0.0.2:8000/v1/chat/completions", &req)?;
    assert_completion(&r, &reply)?;
    assert_proxied(&r)?;
    ensure!(mock.chat_requests()? == 1, "mock served {} chat requests, want 1", mock.chat_requests()?);
    assert_tokens(&t, "s1-agent", "local-llm", &[&reply])?;
    wait_metric_at_least(&t, "tollgate_connections_total", &[("agent", "s1-agent"), ("kind", "http")], 1.0)?;
    wait_metric_at_least(&t, "tollgate_capture_total", &[("event", "redirected")], 1.0)?;
    assert_access_log(&t, "s1-agent")?;
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s1b_plaintext_streaming_curl_is_relayed_and_counted() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s1b-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000", "--chunk-delay-ms", "5"])?;
    let t = e.tollgate(plaintext_route(mock.http[0], &[&g], "s1b-agent", &g), None)?;

    let mut req = ChatRequest::simple(MODEL, "Stream me a short poem about kernels.");
    req.stream = true;
    req.include_usage = true;
    let reply = openai::reply_for(&req);
    let r = chat_curl(&e, Some(&g), "http://127.0.0.2:8000/v1/chat/completions", &req)?;
    ensure!(r.exit == 0 && r.http_code == 200, "request failed: {}", r.describe());
    assert_proxied(&r)?;
    let want = openai::stream_body(&reply, true);
    ensure!(
        r.body == want,
        "streamed body differs from the mock's events\n got: {}\nwant: {}",
        r.text(),
        String::from_utf8_lossy(&want)
    );
    ensure!(
        r.header("content-type").is_some_and(|v| v.starts_with("text/event-stream")),
        "content-type {:?}",
        r.header("content-type")
    );
    assert_tokens(&t, "s1b-agent", "local-llm", &[&reply])?;
    Ok(())
}

/// The common case: a streaming client that did not ask for usage. tollgate asks upstream for it
/// (the mock must see `include_usage`), counts the tokens, drops the extra usage-only chunk and
/// the `"usage":null` OpenAI then sets on every other chunk: the client gets, byte for byte, the
/// stream the provider sends a client that did not ask for usage.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s1c_streaming_without_usage_gets_usage_injected_and_stripped() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s1c-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000", "--chunk-delay-ms", "5"])?;
    let t = e.tollgate(plaintext_route(mock.http[0], &[&g], "s1c-agent", &g), None)?;

    let mut req = ChatRequest::simple(MODEL, "Stream three words about eBPF.");
    req.stream = true;
    req.include_usage = false;
    let reply = openai::reply_for(&req);
    let r = chat_curl(&e, Some(&g), "http://127.0.0.2:8000/v1/chat/completions", &req)?;
    ensure!(r.exit == 0 && r.http_code == 200, "request failed: {}", r.describe());
    assert_proxied(&r)?;
    // Exactly what the provider sends a client that did not ask for usage: no usage-only chunk
    // and no `"usage":null` member in the other chunks.
    let want = openai::stream_body(&reply, false);
    ensure!(
        r.body == want,
        "client stream differs from the provider's stream without usage\n got: {}\nwant: {}",
        r.text(),
        String::from_utf8_lossy(&want)
    );
    let stats = mock.stats(None)?;
    ensure!(stats["chat_stream_usage_requests"] == 1, "upstream was not asked for usage: {stats}");
    assert_tokens(&t, "s1c-agent", "local-llm", &[&reply])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. The real Python openai SDK in a pod-like netns + cgroup calling https://api.openai.com.
// ---------------------------------------------------------------------------------------------

/// Fields drop in declaration order: tollgate first, the environment (cgroup mount, lock) last.
struct Pod {
    t: Tollgate,
    mock: MockLlm,
    ns: Netns,
    g: Group,
    ca: PathBuf,
    _e: Env,
}

fn pod_setup(name: &str, subnet: u8) -> Result<Pod> {
    let e = env()?;
    let g = e.cg.group(name)?;
    let ns = Netns::create(name, subnet)?;
    ns.set_hosts(&[(ns.host_addr().to_string(), "api.openai.com")])?;
    let mock_ca = TestCa::new(e.scratch.path(), "mock", "tollgate e2e mock upstream CA")?;
    let cert = mock_ca.issue(e.scratch.path(), "mock-upstream", &["localhost", "127.0.0.1"])?;
    let mock = e.mock_tls("127.0.0.1:0", &cert, &["--chunk-delay-ms", "5"])?;
    let upstream = format!("https://127.0.0.1:{}", mock.https[0].port());
    let t = e.tollgate(
        json!({
            "listen": {"pod_ipv4": ns.host_addr().to_string()},
            "capture": {
                "scope": [g.rel()],
                "destinations": [{"cidr": format!("{}/32", ns.host_addr()), "port": 443}],
            },
            "routes": [{
                "name": "openai",
                "provider": "openai",
                "intercept": true,
                "match": {"hosts": ["api.openai.com"]},
                "upstream": upstream,
            }],
            "tls": {"extra_roots": [mock_ca.cert_path]},
            "agents": [{"name": name, "match": {"cgroup": g.rel()}}],
        }),
        None,
    )?;
    let (ca, pem) = tg::ca(&e.tg_bin, &t.config_path)?;
    ensure!(ca.is_file(), "tollgate ca printed {} which is not a file", ca.display());
    ensure!(
        std::fs::read_to_string(&ca)? == pem || std::fs::read_to_string(&ca)?.trim() == pem.trim(),
        "PEM printed by `tollgate ca` differs from {}",
        ca.display()
    );
    Ok(Pod { t, mock, ns, g, ca, _e: e })
}

fn sdk_call(p: &Pod, req: &ChatRequest, stream: bool, with_ca: bool) -> Result<(std::process::Output, Option<Value>)> {
    let mut body = json!({"model": req.model, "messages": req.to_json()["messages"]});
    if let Some(n) = req.max_tokens {
        body["max_tokens"] = json!(n);
    }
    let body = body.to_string();
    let mut args = vec!["--request", body.as_str()];
    if stream {
        args.push("--stream");
    }
    let ca = p.ca.to_string_lossy().into_owned();
    let mut env = vec![("OPENAI_API_KEY", "sk-test-e2e")];
    if with_ca {
        env.push(("SSL_CERT_FILE", ca.as_str()));
    }
    let out = python(Some(&p.g), Some(&p.ns), "openai_chat.py", &args, &env)?;
    let parsed = serde_json::from_slice::<Value>(&out.stdout).ok();
    Ok((out, parsed))
}

fn check_sdk_result(out: &std::process::Output, v: Option<Value>, reply: &Reply, stream: bool) -> Result<()> {
    let v = v.ok_or_else(|| {
        anyhow!(
            "openai SDK call failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(v["content"] == json!(reply.content), "SDK got content {:?}, mock sent {:?}", v["content"], reply.content);
    ensure!(v["id"] == json!(reply.id), "SDK got id {:?}, mock sent {:?}", v["id"], reply.id);
    ensure!(v["finish_reason"] == json!("stop"), "finish_reason {:?}", v["finish_reason"]);
    let u = &v["usage"];
    ensure!(
        u["prompt_tokens"] == json!(reply.prompt_tokens)
            && u["completion_tokens"] == json!(reply.completion_tokens)
            && u["total_tokens"] == json!(reply.total_tokens()),
        "SDK got usage {u}, mock sent prompt={} completion={}",
        reply.prompt_tokens,
        reply.completion_tokens
    );
    if stream {
        // role chunk + one per word + finish chunk + usage chunk
        let want = reply.words.len() as u64 + 3;
        ensure!(v["chunks"] == json!(want), "SDK saw {} chunks, mock sent {want}", v["chunks"]);
    }
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s2a_openai_sdk_in_pod_netns_intercepted() -> Result<()> {
    let p = pod_setup("s2a-pod", 21)?;
    let mut req = ChatRequest::simple(MODEL, "Say hello to the kernel.");
    req.messages.insert(0, ("system".into(), "You are terse.".into()));
    let reply = openai::reply_for(&req);

    // Negative control: without tollgate's CA the unmodified SDK must refuse the connection,
    // which proves it is talking TLS to tollgate (minted cert), not to anything it trusts.
    let (out, v) = sdk_call(&p, &req, false, false)?;
    ensure!(
        v.is_none() && !out.status.success(),
        "SDK call without SSL_CERT_FILE succeeded: tollgate's cert should not be trusted by default: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("CERTIFICATE_VERIFY_FAILED") || err.contains("certificate verify failed"),
        "SDK without the CA failed, but not on certificate verification:\n{err}"
    );
    ensure!(p.mock.chat_requests()? == 0, "mock was reached by a client that did not trust tollgate");

    let (out, v) = sdk_call(&p, &req, false, true)?;
    check_sdk_result(&out, v, &reply, false)?;
    ensure!(p.mock.chat_requests()? == 1, "mock served {} chat requests, want 1", p.mock.chat_requests()?);
    assert_tokens(&p.t, "s2a-pod", "openai", &[&reply])?;
    wait_metric_at_least(&p.t, "tollgate_connections_total", &[("agent", "s2a-pod"), ("kind", "intercepted")], 1.0)?;
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s2b_openai_sdk_in_pod_netns_streaming() -> Result<()> {
    let p = pod_setup("s2b-pod", 22)?;
    let mut req = ChatRequest::simple(MODEL, "Stream three words about eBPF.");
    req.max_tokens = Some(24);
    let reply = openai::reply_for(&req);
    let (out, v) = sdk_call(&p, &req, true, true)?;
    check_sdk_result(&out, v, &reply, true)?;
    let stats = p.mock.stats(None)?;
    ensure!(stats["chat_stream_requests"] == json!(1), "mock stats {stats}");
    assert_tokens(&p.t, "s2b-pod", "openai", &[&reply])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. HTTPS to a non-AI host is spliced (origin certificate reaches the client untouched).
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s3_https_to_non_ai_host_is_spliced() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s3-agent")?;
    let origin_ca = TestCa::new(e.scratch.path(), "origin", "tollgate e2e origin CA")?;
    let cert = origin_ca.issue(e.scratch.path(), "origin", &["origin.test"])?;
    let mock = e.mock_tls("127.0.0.3:8443", &cert, &[])?;
    let t = e.tollgate(
        json!({
            "capture": {"scope": [g.rel()], "destinations": [{"cidr": "127.0.0.3/32", "port": 8443}]},
            // An intercepted AI route exists, but not for this host.
            "routes": [{"name": "openai", "provider": "openai", "intercept": true, "match": {"hosts": ["api.openai.com"]}}],
            "agents": [{"name": "s3-agent", "match": {"cgroup": g.rel()}}],
        }),
        None,
    )?;
    let sni = [("sni", "origin.test")];
    let before = t.metrics()?;
    ensure!(before.sum("tollgate_l4_bytes_total", &sni) == 0.0, "l4 bytes for origin.test before any traffic");

    let cacert = origin_ca.cert_path.to_string_lossy().into_owned();
    let r = curl(
        Some(&g),
        None,
        &["--cacert", &cacert, "--resolve", "origin.test:8443:127.0.0.3", "https://origin.test:8443/"],
    )?;
    ensure!(
        r.exit == 0 && r.http_code == 200,
        "curl verifying the origin's own certificate failed (intercepted instead of spliced?): {}",
        r.describe()
    );
    ensure!(r.text() == openai::ORIGIN_BODY, "body {:?}", r.text());
    assert_proxied(&r)?;
    let stats = mock.stats(None)?;
    ensure!(stats["origin_requests"] == json!(1), "origin stats {stats}");
    let up = wait_metric_at_least(&t, "tollgate_l4_bytes_total", &[("sni", "origin.test"), ("direction", "up")], 1.0)?;
    // Down carries at least the certificate and the body.
    let down = wait_metric_at_least(
        &t,
        "tollgate_l4_bytes_total",
        &[("sni", "origin.test"), ("direction", "down")],
        (openai::ORIGIN_BODY.len() + 300) as f64,
    )?;
    wait_metric_at_least(&t, "tollgate_connections_total", &[("agent", "s3-agent"), ("kind", "spliced")], 1.0)?;
    eprintln!("s3: spliced {up} bytes up, {down} bytes down");
    ensure!(
        t.metrics()?.sum("tollgate_llm_requests_total", &[]) == 0.0,
        "a spliced connection was counted as an LLM request"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. A process outside the capture scope is not redirected.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s4_process_outside_scope_is_not_redirected() -> Result<()> {
    let e = env()?;
    let inside = e.cg.group("s4-in")?;
    let outside = e.cg.group("s4-out")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let t = e.tollgate(plaintext_route(mock.http[0], &[&inside], "s4-in", &inside), None)?;
    let url = "http://127.0.0.2:8000/v1/chat/completions";
    let req = ChatRequest::simple(MODEL, "outside scope?");

    let r = chat_curl(&e, Some(&outside), url, &req)?;
    assert_direct(&r)?;
    // The test process's own cgroup (outside every test group) too.
    let r = chat_curl(&e, None, url, &req)?;
    assert_direct(&r)?;
    // The kernel decided both connects (counted as out of scope) before they went direct, so
    // tollgate cannot see them later: once both are counted, nothing may have been served.
    wait_metric_at_least(&t, "tollgate_capture_total", &[("event", "skipped_scope")], 2.0)?;
    let m = t.metrics()?;
    ensure!(
        m.sum("tollgate_llm_requests_total", &[]) == 0.0 && m.sum("tollgate_connections_total", &[]) == 0.0,
        "tollgate saw traffic from outside the scope:\n{}",
        m.dump("tollgate_")
    );

    // Control: the same request from inside the scope is proxied and counted.
    let r = chat_curl(&e, Some(&inside), url, &req)?;
    assert_completion(&r, &openai::reply_for(&req))?;
    assert_proxied(&r)?;
    wait_metric(&t, "tollgate_llm_requests_total", &[], 1.0)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. kill -9: fail open (direct within 1 s) or, with fail_closed, refuse until restart.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s5a_kill9_fails_open_within_1s() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s5a-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let mut t = e.tollgate(plaintext_route(mock.http[0], &[&g], "s5a-agent", &g), None)?;
    let url = "http://127.0.0.2:8000/v1/chat/completions";
    let req = ChatRequest::simple(MODEL, "before the crash");
    let r = chat_curl(&e, Some(&g), url, &req)?;
    assert_completion(&r, &openai::reply_for(&req))?;
    assert_proxied(&r)?;

    t.kill9()?;
    let killed = Instant::now();
    let mut attempts = Vec::new();
    let first_direct = loop {
        let r = chat_curl(&e, Some(&g), url, &req)?;
        let at = killed.elapsed();
        let direct = r.exit == 0 && r.was_direct();
        attempts.push(format!("{:>5} ms: {}", at.as_millis(), if direct { "direct".into() } else { r.describe() }));
        if direct {
            break Some(at);
        }
        if at > Duration::from_secs(5) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(at) = first_direct else {
        bail!("captured connections never went direct after kill -9:\n{}", attempts.join("\n"));
    };
    eprintln!("s5a: first direct connection {} ms after kill -9", at.as_millis());
    // 1 s budget plus one poll interval and a curl start.
    ensure!(
        at <= Duration::from_millis(1200),
        "first direct connection only {} ms after kill -9 (budget 1 s):\n{}",
        at.as_millis(),
        attempts.join("\n")
    );
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s5b_kill9_with_fail_closed_refuses_until_restart() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s5b-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let mut patch = plaintext_route(mock.http[0], &[&g], "s5b-agent", &g);
    merge(&mut patch, json!({"capture": {"fail_closed": true}}));
    let mut t = e.tollgate(patch, None)?;
    let url = "http://127.0.0.2:8000/v1/chat/completions";
    let req = ChatRequest::simple(MODEL, "fail closed");
    let r = chat_curl(&e, Some(&g), url, &req)?;
    assert_completion(&r, &openai::reply_for(&req))?;
    assert_proxied(&r)?;
    let served = mock.chat_requests()?;

    t.kill9()?;
    let killed = Instant::now();
    // Refused throughout, probing back to back: right after the crash and until well past the
    // heartbeat timeout (1 s).
    let mut probes = 0;
    while killed.elapsed() < Duration::from_millis(2500) || probes < 4 {
        probes += 1;
        let r = chat_curl(&e, Some(&g), url, &req)?;
        ensure!(
            r.exit != 0 && r.mock_peer().is_none(),
            "{} ms after kill -9 with fail_closed a captured connection was not refused: {}",
            killed.elapsed().as_millis(),
            r.describe()
        );
    }
    ensure!(mock.chat_requests()? == served, "the mock was reached while tollgate was down with fail_closed");
    // Uncaptured processes are unaffected.
    assert_direct(&chat_curl(&e, None, url, &req)?)?;

    // Restart: tollgate takes over the pinned state and captured traffic flows again.
    t.restart()?;
    let r = chat_curl(&e, Some(&g), url, &req)?;
    assert_completion(&r, &openai::reply_for(&req))
        .with_context(|| format!("after restart; tollgate stderr:\n{}", t.stderr_tail(30)))?;
    assert_proxied(&r)?;

    // Clean up: stop it and remove its pins; connections must then go direct.
    t.terminate();
    t.remove_pins();
    let mut last = None;
    let ok = wait_for(Duration::from_secs(3), Duration::from_millis(100), || {
        let r = chat_curl(&e, Some(&g), url, &req).ok()?;
        let d = r.exit == 0 && r.was_direct();
        last = Some(r);
        d.then_some(())
    });
    ensure!(
        ok.is_some(),
        "after stopping tollgate and removing its pins ({:?}) captured connections still do not go direct: {}",
        t.bpffs_dir(),
        last.map(|r| r.describe()).unwrap_or_default()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. A direct connection to the proxy port (no capture record) is closed without a response.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s6_direct_connection_to_proxy_is_closed_without_response() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s6-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let t = e.tollgate(plaintext_route(mock.http[0], &[&g], "s6-agent", &g), None)?;
    let body = serde_json::to_string(&ChatRequest::simple(MODEL, "open proxy?").to_json())?;
    for ip in ["127.0.0.1", "[::1]"] {
        let addr: SocketAddr = format!("{ip}:{}", t.proxy_port).parse()?;
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let msg = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.2:8000\r\nAuthorization: Bearer sk-x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // The write may already fail if tollgate closed first; that is fine.
        let _ = s.write_all(msg.as_bytes());
        let mut buf = [0u8; 4096];
        let started = Instant::now();
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => bail!(
                "{addr}: tollgate answered a connection without a capture record: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(err) if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                bail!("{addr}: connection without a capture record still open after {:?}", started.elapsed())
            }
            Err(err) => bail!("{addr}: unexpected read error {err}"),
        }
    }
    ensure!(mock.chat_requests()? == 0, "a request without a capture record reached the upstream");
    wait_metric_at_least(&t, "tollgate_connections_total", &[("kind", "no_record")], 2.0)?;
    ensure!(t.metrics()?.sum("tollgate_llm_requests_total", &[]) == 0.0, "counted as an LLM request");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. tollgate inside a captured cgroup does not capture its own upstream connections.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s7_tollgate_in_scope_skips_its_own_connections() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s7-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let t = e.tollgate(plaintext_route(mock.http[0], &[&g], "s7-agent", &g), Some(&g))?;
    let pid = t.pid().ok_or_else(|| anyhow!("tollgate not running"))?;
    ensure!(g.pids().contains(&pid), "tollgate (pid {pid}) is not in {} ({:?})", g.rel(), g.pids());
    let self_before = t.metrics()?.sum("tollgate_capture_total", &[("event", "skipped_self")]);

    let req = ChatRequest::simple(MODEL, "no loops please");
    let reply = openai::reply_for(&req);
    let r = chat_curl(&e, Some(&g), "http://127.0.0.2:8000/v1/chat/completions", &req)?;
    assert_completion(&r, &reply)?;
    assert_proxied(&r)?;
    ensure!(mock.chat_requests()? == 1, "mock served {} chat requests, want 1", mock.chat_requests()?);
    assert_tokens(&t, "s7-agent", "local-llm", &[&reply])?;
    wait_metric_at_least(&t, "tollgate_capture_total", &[("event", "skipped_self")], self_before + 1.0)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. IPv6 destination.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s8_ipv6_destination_is_captured() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s8-agent")?;
    let mock = e.mock(&["--listen", "[::1]:8000", "--listen", "127.0.0.1:0"])?;
    let t = e.tollgate(plaintext_route(mock.http[0], &[&g], "s8-agent", &g), None)?;
    let req = ChatRequest::simple(MODEL, "IPv6 works?");
    let reply = openai::reply_for(&req);
    let r = chat_curl(&e, Some(&g), "http://[::1]:8000/v1/chat/completions", &req)?;
    assert_completion(&r, &reply)?;
    assert_proxied(&r)?;
    ensure!(r.local.is_some_and(|l| l.is_ipv6()), "curl did not use IPv6: {}", r.describe());
    assert_tokens(&t, "s8-agent", "local-llm", &[&reply])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 9. `tollgate check` reports a typo with file:line:col.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s9_check_reports_typo_position() -> Result<()> {
    let e = env()?;
    let cases = [
        ("top.yaml", "listen:\n  port: 15001\ncapture:\n  portz: [443]\n", 4, 3, "portz"),
        (
            "route.yaml",
            "routes:\n  - name: openai\n    provider: openai\n    match: { hosts: [api.openai.com] }\n    intercpt: true\n",
            5,
            5,
            "intercpt",
        ),
    ];
    for (file, text, line, col, field) in cases {
        let path = e.path(file);
        std::fs::write(&path, text)?;
        let (code, out, err) = tg::check(&e.tg_bin, &path)?;
        let all = format!("{out}{err}");
        let prefix = format!("{}:{line}:{col}: ", path.display());
        ensure!(code == 1, "tollgate check {file}: exit {code}, want 1; output:\n{all}");
        ensure!(
            all.lines().any(|l| l.starts_with(&prefix) && l.contains(field)),
            "tollgate check {file}: no line starting with {prefix:?} naming {field:?}; output:\n{all}"
        );
    }
    let good = e.path("good.yaml");
    std::fs::write(&good, "listen:\n  port: 15001\ncapture:\n  ports: [443]\n")?;
    let (code, out, err) = tg::check(&e.tg_bin, &good)?;
    let first = out.lines().next().unwrap_or_default();
    ensure!(
        code == 0 && first == format!("{}: ok", good.display()),
        "valid config: exit {code}, stdout {out:?}, stderr {err:?}"
    );
    // Then what this host's kernel offers the TLS uprobes: this machine has it all.
    ensure!(out.trim_end().ends_with("(tollgate_uprobe_available 1)"), "uprobe verdict on this host: {out}");
    ensure!(out.lines().any(|l| l.starts_with("uprobes: ok uprobe PMU:")), "no PMU line: {out}");
    // Without CAP_SYS_ADMIN (dropped from the bounding set) the verdict says L4 only, and why;
    // the config is still valid.
    let o = std::process::Command::new("setpriv")
        .args(["--bounding-set", "-sys_admin"])
        .arg(&e.tg_bin)
        .arg("check")
        .arg(&good)
        .output()?;
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(o.status.success(), "check without CAP_SYS_ADMIN: {o:?}");
    ensure!(
        out.lines().any(|l| l.starts_with("uprobes: MISSING capabilities") && l.contains("CAP_SYS_ADMIN"))
            && out.trim_end().ends_with("L4 only (tollgate_uprobe_available 0)"),
        "check without CAP_SYS_ADMIN: {out}"
    );
    // Disabled in config: said so.
    std::fs::write(&good, "capture:\n  uprobes: { enabled: false }\n")?;
    let (code, out, _) = tg::check(&e.tg_bin, &good)?;
    ensure!(code == 0 && out.contains("uprobes: disabled in config"), "disabled: {out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 10. No cgroup2 mounted (as on this repo's cgroup v1 hosts): tollgate mounts one itself.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn s10_mounts_cgroup2_when_none_is_mounted() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("s10-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    // tollgate runs in a private mount namespace with every cgroup2 mount removed, so its
    // auto-detection finds none and must mount its own (the hierarchy is the same one).
    let wrapper = e.path("tollgate-without-cgroup2.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec unshare --mount --propagation private sh -c \
             'for m in $(findmnt -rn -t cgroup2 -o TARGET); do umount -l \"$m\"; done; \
             if findmnt -rn -t cgroup2 >/dev/null; then echo cgroup2 still mounted >&2; exit 97; fi; \
             exec \"$0\" \"$@\"' {} \"$@\"\n",
            e.tg_bin.display()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let dir = Tollgate::scratch()?;
    let mut cfg = base_config(&e.cg, dir.path());
    merge(&mut cfg, plaintext_route(mock.http[0], &[&g], "s10-agent", &g));
    merge(&mut cfg, json!({"capture": {"cgroup_root": null}}));
    let t = Tollgate::start(&wrapper, dir, cfg, None)?;
    let log = t.stderr_tail(200);
    ensure!(log.contains("no cgroup2 mount found; mounting one"), "tollgate did not mount cgroup2 itself:\n{log}");
    ensure!(log.contains("/run/tollgate/cgroup2"), "attach point is not the own mount:\n{log}");

    let req = ChatRequest::simple(MODEL, "Name a prime number.");
    let reply = openai::reply_for(&req);
    let r = chat_curl(&e, Some(&g), "http://127.0.0.2:8000/v1/chat/completions", &req)?;
    assert_completion(&r, &reply)?;
    assert_proxied(&r)?;
    assert_tokens(&t, "s10-agent", "local-llm", &[&reply])?;
    Ok(())
}
