//! `intercept: auto`: interception only where trust is proven. Agents that trust tollgate's CA
//! are intercepted, the others spliced (and read through the TLS uprobes), so none breaks; a
//! client whose trust tollgate cannot see fails once and is spliced from then on.

use serde_json::{json, Value};
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::venv_python;
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::netns::Netns;
use tollgate_e2e::tollgate::{self as tg, Tollgate};
use tollgate_e2e::{anyhow, ensure, Result};

use crate::support::*;

const HOST: &str = "api.openai.com";

/// Agents in their own cgroups, one netns whose `api.openai.com` is an HTTPS mock with its own
/// CA, behind an `intercept: auto` route; tollgate trusts the mock's CA upstream.
struct Auto {
    t: Tollgate,
    mock: MockLlm,
    ns: Netns,
    groups: Vec<Group>,
    mock_ca: String,
    tollgate_ca: String,
    _e: Env,
}

/// The libssl CPython's `_ssl` links: probed from the start (`capture.uprobes.paths`), as the
/// README advises for short-lived processes (`_ssl` is loaded by dlopen after exec, often after
/// the exec-triggered rescan, and a one-second client can end before the next periodic one).
fn python_libssl() -> Result<String> {
    let py = venv_python();
    let out = std::process::Command::new(&py).args(["-c", "import _ssl; print(_ssl.__file__)"]).output()?;
    let module = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let ldd = std::process::Command::new("ldd").arg(&module).output()?;
    String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("libssl.so").and_then(|r| r.split(" => ").nth(1)))
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no libssl in `ldd {module}`: {}", String::from_utf8_lossy(&ldd.stdout)))
}

fn setup(agents: &[&str], subnet: u8) -> Result<Auto> {
    let e = env()?;
    let libssl = python_libssl()?;
    let groups = agents.iter().map(|a| e.cg.group(a)).collect::<Result<Vec<_>>>()?;
    let ns = Netns::create(agents[0], subnet)?;
    ns.set_hosts(&[(ns.host_addr().to_string(), HOST)])?;
    let ca = TestCa::new(e.scratch.path(), "provider", "tollgate e2e provider CA")?;
    let cert = ca.issue(e.scratch.path(), "provider", &[HOST])?;
    let listen = format!("{}:443", ns.host_addr());
    let mock = e.mock_tls(&listen, &cert, &[])?;
    let t = e.tollgate(
        json!({
            "listen": {"pod_ipv4": ns.host_addr().to_string()},
            "capture": {
                "scope": groups.iter().map(|g| g.rel()).collect::<Vec<_>>(),
                "destinations": [{"cidr": format!("{}/32", ns.host_addr()), "port": 443}],
                "uprobes": {"paths": [libssl]},
            },
            "routes": [{"name": "openai", "provider": "openai", "match": {"hosts": [HOST]}, "intercept": "auto"}],
            "tls": {"extra_roots": [ca.cert_path]},
            "agents": agents.iter().zip(&groups).map(|(a, g)| json!({"name": a, "match": {"cgroup": g.rel()}})).collect::<Vec<_>>(),
        }),
        None,
    )?;
    wait_metric(&t, "tollgate_uprobe_available", &[], 1.0)?;
    let (tollgate_ca, _) = tg::ca(&e.tg_bin, &t.config_path)?;
    Ok(Auto {
        t,
        mock,
        ns,
        groups,
        mock_ca: ca.cert_path.to_string_lossy().into_owned(),
        tollgate_ca: tollgate_ca.to_string_lossy().into_owned(),
        _e: e,
    })
}

/// `openai_keepalive.py` with `plan` in cgroup `i`, trusting the CA bundle `cafile`.
fn sdk(a: &Auto, i: usize, plan: &str, cafile: &str) -> Result<Vec<Value>> {
    let env = [("OPENAI_API_KEY", "sk-agent-own-key"), ("SSL_CERT_FILE", cafile)];
    let args = ["--model", MODEL, "--plan", plan];
    let v = python_json(Some(&a.groups[i]), Some(&a.ns), "openai_keepalive.py", &args, &env)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn sum(calls: &[Value], k: &str) -> f64 {
    calls.iter().map(|c| c["usage"][k].as_f64().unwrap_or(f64::NAN)).sum()
}

/// Tokens of `agent` by `capture` path equal what its SDK reported.
fn assert_tokens(a: &Auto, agent: &str, capture: &str, calls: &[Value]) -> Result<()> {
    for (k, tt) in [("prompt_tokens", "input"), ("completion_tokens", "output")] {
        let labels = [("agent", agent), ("capture", capture), ("token_type", tt)];
        wait_metric(&a.t, "tollgate_llm_tokens_total", &labels, sum(calls, k))?;
    }
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn a1_auto_intercepts_the_agent_that_trusts_the_ca_and_splices_the_one_that_does_not() -> Result<()> {
    let a = setup(&["a1-trusting", "a1-plain"], 51)?;
    // Trusts only tollgate's CA: it can only succeed if tollgate terminates its TLS.
    let trusting = sdk(&a, 0, "plain,stream", &a.tollgate_ca)?;
    ensure!(trusting.len() == 2, "the agent that trusts tollgate's CA failed: {trusting:?}");
    // Trusts only the provider's CA, as an agent never given tollgate's CA: it must be spliced.
    let plain = sdk(&a, 1, "plain,stream", &a.mock_ca)?;
    ensure!(plain.len() == 2, "the agent without tollgate's CA failed: {plain:?}");
    ensure!(a.mock.chat_requests()? == 4, "mock stats {}", a.mock.stats(None)?);
    assert_tokens(&a, "a1-trusting", "intercept", &trusting)?;
    assert_tokens(&a, "a1-plain", "uprobe", &plain)?;
    let d = "tollgate_intercept_decisions_total";
    wait_metric_at_least(
        &a.t,
        d,
        &[("agent", "a1-trusting"), ("decision", "intercept"), ("reason", "trust_variable")],
        1.0,
    )?;
    wait_metric_at_least(&a.t, d, &[("agent", "a1-plain"), ("decision", "splice"), ("reason", "not_trusted")], 1.0)?;
    let m = a.t.metrics()?;
    ensure!(m.sum(d, &[("agent", "a1-plain"), ("decision", "intercept")]) == 0.0, "{}", m.dump("tollgate_intercept"));
    ensure!(m.sum(d, &[("agent", "a1-trusting"), ("decision", "splice")]) == 0.0, "{}", m.dump("tollgate_intercept"));
    ensure!(m.sum("tollgate_intercept_handshake_failures_total", &[]) == 0.0, "{}", m.dump("tollgate_intercept"));
    // Each call counted once: the intercepted agent's plaintext, which the uprobes also see, is
    // left to the proxy.
    ensure!(
        m.sum("tollgate_llm_requests_total", &[("agent", "a1-trusting"), ("capture", "uprobe")]) == 0.0,
        "an intercepted call was counted again from the uprobes:\n{}",
        m.dump("tollgate_llm_requests")
    );
    Ok(())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn a2_a_client_with_a_pinned_ca_fails_once_then_is_spliced() -> Result<()> {
    let a = setup(&["a2-pinned"], 52)?;
    // Its environment says it trusts tollgate's CA; the program pins the provider's.
    let run = || -> Result<Value> {
        let env = [("SSL_CERT_FILE", a.tollgate_ca.as_str())];
        let args = ["--cafile", a.mock_ca.as_str(), "--host", HOST, "--model", MODEL];
        python_json(Some(&a.groups[0]), Some(&a.ns), "pinned_https.py", &args, &env)
    };
    let first = run()?;
    ensure!(first["ok"] == false, "the first connection should have been intercepted and refused: {first}");
    ensure!(a.mock.chat_requests()? == 0, "mock reached on the failed attempt");
    let failures = "tollgate_intercept_handshake_failures_total";
    wait_metric(&a.t, failures, &[("agent", "a2-pinned")], 1.0)?;
    let m = a.t.metrics()?;
    let rejected = ["unknown_ca", "bad_certificate", "certificate_unknown", "closed"]
        .iter()
        .map(|r| m.sum(failures, &[("agent", "a2-pinned"), ("reason", r)]))
        .sum::<f64>();
    ensure!(rejected == 1.0, "the failure is not a certificate rejection:\n{}", m.dump("tollgate_intercept"));
    // From the next connection on: spliced, served, observed.
    for i in 0..2 {
        let next = run()?;
        ensure!(next["ok"] == true, "connection {} after the failure was not spliced: {next}", i + 2);
    }
    ensure!(a.mock.chat_requests()? == 2, "mock stats {}", a.mock.stats(None)?);
    let d = "tollgate_intercept_decisions_total";
    wait_metric(&a.t, d, &[("agent", "a2-pinned"), ("decision", "splice"), ("reason", "learned")], 2.0)?;
    wait_metric(&a.t, d, &[("agent", "a2-pinned"), ("decision", "intercept")], 1.0)?;
    wait_metric(&a.t, failures, &[("agent", "a2-pinned")], 1.0)?;
    wait_metric(&a.t, "tollgate_llm_requests_total", &[("agent", "a2-pinned"), ("capture", "uprobe")], 2.0).map_err(
        |e| {
            let m = a.t.metrics().map(|m| m.dump("tollgate_")).unwrap_or_default();
            anyhow!("{e}\n{m}\n{}", a.t.stderr_tail(30))
        },
    )?;
    Ok(())
}
