//! L7 without interception: agents that trust only their provider's own CA (here the mock's),
//! whose TLS tollgate splices untouched, are still counted per agent and model from the
//! plaintext the TLS uprobes read inside their OpenSSL.
//!
//! The proof that tollgate is not in the TLS path: the agent is given no tollgate CA at all
//! (`SSL_CERT_FILE` is the mock's CA), so any interception would fail its certificate check.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::netns::Netns;
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, ensure, wait_for, Result};

use crate::support::*;

mod anthropic_sdk;
mod curl_node;
mod late;
mod load;
mod overflow;
mod protocols;

pub(super) const HOST: &str = "api.openai.com";

/// Agents, each in its own cgroup, in one netns whose provider host (`api.openai.com` unless
/// told otherwise) is an HTTPS mock on the node, behind a spliced (not intercepted) route.
pub(super) struct Observed {
    pub(super) t: Tollgate,
    pub(super) mock: MockLlm,
    pub(super) ns: Netns,
    /// The first agent's cgroup.
    pub(super) g: Group,
    /// The mock's CA certificate (PEM file): the only trust root the agents are given.
    pub(super) mock_ca: String,
    /// The agents of [`Opts::more_agents`], each in its own cgroup named after it (same netns).
    pub(super) more: Vec<Group>,
    pub(super) e: Env,
}

/// What the scenarios beyond u1/u2 change in the common setup.
pub(super) struct Opts {
    /// More agents, each in a cgroup of its own, in scope and named after their cgroup.
    pub(super) more_agents: Vec<String>,
    /// More HTTPS ports of the mock on the same address, outside every capture rule.
    pub(super) uncaptured_ports: Vec<u16>,
    /// The mock's delay between streamed events.
    pub(super) chunk_delay_ms: u64,
    /// Merged into `capture.uprobes`.
    pub(super) uprobes: Value,
    /// The provider host the netns resolves to the mock.
    pub(super) host: String,
    /// The route's provider (also its name).
    pub(super) provider: String,
    /// Merged into tollgate's whole config last.
    pub(super) extra: Value,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            more_agents: Vec::new(),
            uncaptured_ports: Vec::new(),
            chunk_delay_ms: 2,
            uprobes: json!({}),
            host: HOST.to_owned(),
            provider: "openai".to_owned(),
            extra: json!({}),
        }
    }
}

fn setup(name: &str, subnet: u8) -> Result<Observed> {
    setup_with(name, subnet, Opts::default())
}

/// [`Observed`] for `agents` (one cgroup each, named after the agent; the netns after the
/// first) whose `host` is the mock, routed as `provider`.
pub(super) fn setup_for(agents: &[&str], subnet: u8, host: &str, provider: &str) -> Result<Observed> {
    let name = *agents.first().ok_or_else(|| anyhow!("no agent"))?;
    let more_agents = agents[1..].iter().map(|a| a.to_string()).collect();
    setup_with(name, subnet, Opts { more_agents, host: host.into(), provider: provider.into(), ..Opts::default() })
}

pub(super) fn setup_with(name: &str, subnet: u8, opts: Opts) -> Result<Observed> {
    let e = env()?;
    let g = e.cg.group(name)?;
    let more = opts.more_agents.iter().map(|n| e.cg.group(n)).collect::<Result<Vec<_>>>()?;
    let host = opts.host.as_str();
    let ns = Netns::create(name, subnet)?;
    ns.set_hosts(&[(ns.host_addr().to_string(), host)])?;
    let ca = TestCa::new(e.scratch.path(), "provider", "tollgate e2e provider CA")?;
    let cert = ca.issue(e.scratch.path(), "provider", &[host])?;
    let listen = format!("{}:443", ns.host_addr());
    let delay = opts.chunk_delay_ms.to_string();
    let (cert_path, key_path) = (cert.cert_path.to_string_lossy(), cert.key_path.to_string_lossy());
    let mut args = vec!["--tls-listen", &listen, "--listen", "127.0.0.1:0", "--cert", &cert_path, "--key", &key_path];
    args.extend(["--chunk-delay-ms", &delay]);
    let uncaptured: Vec<String> = opts.uncaptured_ports.iter().map(|p| format!("{}:{p}", ns.host_addr())).collect();
    for l in &uncaptured {
        args.extend(["--tls-listen", l.as_str()]);
    }
    let mock = e.mock(&args)?;
    let groups: Vec<&Group> = std::iter::once(&g).chain(more.iter()).collect();
    let names = std::iter::once(name).chain(opts.more_agents.iter().map(String::as_str));
    let agents: Vec<Value> =
        names.zip(&groups).map(|(n, g)| json!({"name": n, "match": {"cgroup": g.rel()}})).collect();
    let mut patch = json!({
            "listen": {"pod_ipv4": ns.host_addr().to_string()},
            "capture": {
                "scope": groups.iter().map(|g| g.rel()).collect::<Vec<_>>(),
                "destinations": [{"cidr": format!("{}/32", ns.host_addr()), "port": 443}],
                "uprobes": opts.uprobes,
            },
            // `intercept` left at `auto`: the agents do not trust tollgate's CA, so it splices.
            "routes": [{"name": opts.provider, "provider": opts.provider, "match": {"hosts": [host]}}],
            "agents": agents,
    });
    tollgate_e2e::merge(&mut patch, opts.extra);
    let t = e.tollgate(patch, None)?;
    wait_metric(&t, "tollgate_uprobe_available", &[], 1.0)?;
    let mock_ca = ca.cert_path.to_string_lossy().into_owned();
    Ok(Observed { t, mock, ns, g, mock_ca, more, e })
}

/// Run `openai_keepalive.py` with `plan` in the agent's cgroup and netns.
pub(super) fn sdk_calls(o: &Observed, plan: &str, asynchronous: bool) -> Result<Vec<Value>> {
    let mut args = vec!["--model", MODEL, "--plan", plan];
    if asynchronous {
        args.push("--async");
    }
    let env = [("OPENAI_API_KEY", "sk-agent-own-key"), ("SSL_CERT_FILE", o.mock_ca.as_str())];
    let v = python_json(Some(&o.g), Some(&o.ns), "openai_keepalive.py", &args, &env)?;
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
    let tokens = [("input", input), ("output", output), ("total", total)];
    assert_observed_tokens(o, agent, ("openai", MODEL), calls.len(), &tokens)
}

/// `requests` calls of `agent` to (provider, model) observed through the uprobes (status 200),
/// with exactly these tokens by type, nothing estimated and nothing intercepted.
pub(super) fn assert_observed_tokens(
    o: &Observed,
    agent: &str,
    (provider, model): (&str, &str),
    requests: usize,
    tokens: &[(&'static str, f64)],
) -> Result<()> {
    let base = [("agent", agent), ("capture", "uprobe"), ("provider", provider), ("model", model)];
    let with = |k: &'static str, v: &'static str| {
        let mut l = base.to_vec();
        l.push((k, v));
        l
    };
    wait_metric(&o.t, "tollgate_llm_requests_total", &with("status", "200"), requests as f64)?;
    for (token_type, n) in tokens {
        wait_metric(&o.t, "tollgate_llm_tokens_total", &with("token_type", token_type), *n)?;
    }
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

/// A client process held before its first call; killed if the test ends first.
pub(super) struct Held(Child);

impl Held {
    /// Start `cmd` with piped stdio and a minimal environment plus `env`.
    pub(super) fn spawn(mut cmd: Command, env: &[(&str, &str)]) -> Result<Self> {
        cmd.env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", std::env::temp_dir())
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(Held(cmd.spawn()?))
    }

    /// Wait until the process runs `exe` (`ip netns exec` has exec'd it).
    pub(super) fn wait_exec(&self, exe: &str) -> Result<()> {
        let link = format!("/proc/{}/exe", self.0.id());
        wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
            std::fs::read_link(&link).ok().filter(|p| p == Path::new(exe)).map(drop)
        })
        .ok_or_else(|| anyhow!("process {} never ran {exe}", self.0.id()))
    }

    /// Shared `libssl.so*` files the process maps, once its loader has mapped them.
    pub(super) fn wait_libssl(&self) -> Result<Vec<String>> {
        let maps = format!("/proc/{}/maps", self.0.id());
        wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
            let text = std::fs::read_to_string(&maps).ok()?;
            let mut libs: Vec<String> = text
                .lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .filter(|p| p.rsplit('/').next().is_some_and(|n| n == "libssl.so" || n.starts_with("libssl.so.")))
                .map(str::to_string)
                .collect();
            libs.dedup();
            (!libs.is_empty()).then_some(libs)
        })
        .ok_or_else(|| anyhow!("process {} maps no libssl.so*", self.0.id()))
    }

    /// Write `input` to its stdin, close it, and wait (bounded) for it to exit; its stdout.
    pub(super) fn release(mut self, input: &[u8]) -> Result<Vec<u8>> {
        let mut stdin = self.0.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        stdin.write_all(input)?;
        drop(stdin);
        let status = wait_for(Duration::from_secs(60), Duration::from_millis(50), || self.0.try_wait().ok().flatten())
            .ok_or_else(|| anyhow!("client {} did not finish", self.0.id()))?;
        let (mut out, mut err) = (Vec::new(), String::new());
        if let Some(mut s) = self.0.stdout.take() {
            s.read_to_end(&mut out)?;
        }
        if let Some(mut s) = self.0.stderr.take() {
            s.read_to_string(&mut err)?;
        }
        ensure!(status.success(), "client failed ({status}): stdout {} stderr {err}", String::from_utf8_lossy(&out));
        Ok(out)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Wait until tollgate reports at least one probed TLS library file of `kind` and has logged
/// probing `file` itself: the gauge only counts (and other programs on the node, e.g. a cargo
/// with static OpenSSL, count too), the log names the path it opened, which is compared by
/// device and inode (it is a `/proc/<pid>/...` path of whichever process it was found in).
/// Returns that log line.
pub(super) fn wait_attached(o: &Observed, kind: &str, file: &str) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(file)?;
    let same = |path: &str| std::fs::metadata(path).is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino());
    let kind_field = format!("kind=\"{kind}\"");
    // A library loaded after exec (CPython's `_ssl`) waits for the periodic rescan (2 s).
    let line = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        o.t.stderr_tail(400)
            .lines()
            .filter(|l| l.contains("TLS library probed") && l.contains(&kind_field))
            .find(|l| l.split_whitespace().filter_map(|w| w.strip_prefix("file=")).any(same))
            .map(str::to_string)
    })
    .ok_or_else(|| anyhow!("tollgate never probed {file} ({kind}):\n{}", o.t.stderr_tail(40)))?;
    wait_metric_at_least(&o.t, "tollgate_uprobe_attached_files", &[("kind", kind)], 1.0)?;
    Ok(line)
}
