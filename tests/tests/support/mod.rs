//! Shared pieces of the scenarios: the serial environment (cgroup2 mount, binaries, scratch dir),
//! config builders and assertions on what clients received and tollgate exported.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::cgroup::{Cgroup2, Group};
use tollgate_e2e::client::{curl, CurlOut};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::openai::{self, ChatRequest, Reply};
use tollgate_e2e::prom::Scrape;
use tollgate_e2e::tollgate::{self as tg, base_config, ensure_bpffs, Tollgate};
use tollgate_e2e::{bail, ensure, merge, require_root, wait_for, Result};

pub const MODEL: &str = "gpt-4o-mini";

pub static SERIAL: Mutex<()> = Mutex::new(());

pub struct Env {
    pub _lock: MutexGuard<'static, ()>,
    pub cg: Cgroup2,
    pub mock_bin: PathBuf,
    pub tg_bin: PathBuf,
    pub scratch: tempfile::TempDir,
}

pub fn env() -> Result<Env> {
    let lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root()?;
    ensure_bpffs()?;
    let mock_bin = PathBuf::from(env!("CARGO_BIN_EXE_mock-llm"));
    let tg_bin = tg::tollgate_bin(Some(env!("CARGO_BIN_EXE_mock-llm")));
    ensure!(tg_bin.exists(), "{} missing: build it first (cargo xtask build)", tg_bin.display());
    Ok(Env {
        _lock: lock,
        cg: Cgroup2::mount()?,
        mock_bin,
        tg_bin,
        scratch: tempfile::Builder::new().prefix("tollgate-e2e-").tempdir()?,
    })
}

impl Env {
    pub fn mock(&self, args: &[&str]) -> Result<MockLlm> {
        MockLlm::start(&self.mock_bin, &args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// The mock serving HTTPS on `listen` with `cert` (its own CA's leaf), plain HTTP on a free
    /// port for its stats, and `extra` arguments.
    pub fn mock_tls(&self, listen: &str, cert: &tollgate_e2e::certs::ServerCert, extra: &[&str]) -> Result<MockLlm> {
        let (c, k) = (cert.cert_path.to_string_lossy(), cert.key_path.to_string_lossy());
        let mut args = vec!["--tls-listen", listen, "--listen", "127.0.0.1:0", "--cert", &c, "--key", &k];
        args.extend_from_slice(extra);
        self.mock(&args)
    }

    /// tollgate with the base config plus `patch`, optionally running inside `group`.
    pub fn tollgate(&self, patch: Value, group: Option<&Group>) -> Result<Tollgate> {
        let dir = Tollgate::scratch()?;
        let mut cfg = base_config(&self.cg, dir.path());
        merge(&mut cfg, patch);
        Tollgate::start(&self.tg_bin, dir, cfg, group)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }
}

/// Config that captures `addr` (an `ip:port` the mock listens on) for `scope` and routes it as a
/// plaintext OpenAI-compatible endpoint, naming processes in `agent_group` `agent`.
pub fn plaintext_route(addr: SocketAddr, scope: &[&Group], agent: &str, agent_group: &Group) -> Value {
    let cidr = match addr {
        SocketAddr::V4(a) => format!("{}/32", a.ip()),
        SocketAddr::V6(a) => format!("{}/128", a.ip()),
    };
    json!({
        "capture": {
            "scope": scope.iter().map(|g| g.rel()).collect::<Vec<_>>(),
            "destinations": [{"cidr": cidr, "port": addr.port()}],
        },
        "routes": [{"name": "local-llm", "provider": "openai", "match": {"addresses": [addr.to_string()]}}],
        "agents": [{"name": agent, "match": {"cgroup": agent_group.rel()}}],
    })
}

/// POST a chat request with curl from `group`.
pub fn chat_curl(e: &Env, group: Option<&Group>, url: &str, req: &ChatRequest) -> Result<CurlOut> {
    let body = e.path(&format!("req-{}.json", std::process::id()));
    std::fs::write(&body, serde_json::to_vec(&req.to_json())?)?;
    let data = format!("@{}", body.display());
    curl(
        group,
        None,
        &[
            "-g",
            "-H",
            "Content-Type: application/json",
            "-H",
            "Authorization: Bearer sk-test-e2e",
            "--data-binary",
            &data,
            url,
        ],
    )
}

/// Poll tollgate's `/metrics` until `sum(name{labels})` equals `want`; the error shows the
/// relevant metrics as exposed.
pub fn wait_metric(t: &Tollgate, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
    let mut last = Scrape::default();
    let got = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        last = t.metrics().ok()?;
        (last.sum(name, labels) == want).then_some(())
    });
    if got.is_none() {
        bail!(
            "metric {name}{labels:?}: want {want}, got {}\n--- tollgate metrics ---\n{}{}--- tollgate stderr (tail) ---\n{}",
            last.sum(name, labels),
            last.dump("tollgate_"),
            last.dump("gen_ai_"),
            t.stderr_tail(30)
        );
    }
    Ok(())
}

/// Poll until `sum(name{labels}) >= min`; returns the value.
pub fn wait_metric_at_least(t: &Tollgate, name: &str, labels: &[(&str, &str)], min: f64) -> Result<f64> {
    let mut last = Scrape::default();
    match wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        last = t.metrics().ok()?;
        let v = last.sum(name, labels);
        (v >= min).then_some(v)
    }) {
        Some(v) => Ok(v),
        None => bail!(
            "metric {name}{labels:?}: want >= {min}, got {}\n--- tollgate metrics ---\n{}{}--- tollgate stderr (tail) ---\n{}",
            last.sum(name, labels),
            last.dump("tollgate_"),
            last.dump("gen_ai_"),
            t.stderr_tail(30)
        ),
    }
}

/// Request, token and GenAI histogram metrics after the calls answered with `replies` (all by
/// `agent` on `route`, model [`MODEL`], HTTP 200), starting from zero.
pub fn assert_tokens(t: &Tollgate, agent: &str, route: &str, replies: &[&Reply]) -> Result<()> {
    let requests = replies.len() as f64;
    let sum = |f: fn(&Reply) -> u64| replies.iter().map(|r| f(r)).sum::<u64>() as f64;
    let (input, output) = (sum(|r| r.prompt_tokens), sum(|r| r.completion_tokens));
    let base = [("agent", agent), ("route", route), ("provider", "openai"), ("model", MODEL)];
    let with = |k: &'static str, v: &'static str| {
        let mut l = base.to_vec();
        l.push((k, v));
        l
    };
    wait_metric(t, "tollgate_llm_requests_total", &with("status", "200"), requests)?;
    wait_metric(t, "tollgate_llm_tokens_total", &with("token_type", "input"), input)?;
    wait_metric(t, "tollgate_llm_tokens_total", &with("token_type", "output"), output)?;
    wait_metric(t, "tollgate_llm_tokens_total", &with("token_type", "total"), sum(|r| r.total_tokens()))?;
    // usage.prompt_tokens_details / completion_tokens_details, as the mock reports them.
    wait_metric(t, "tollgate_llm_tokens_total", &with("token_type", "cached_input"), sum(|r| r.cached_tokens))?;
    wait_metric(t, "tollgate_llm_tokens_total", &with("token_type", "reasoning"), sum(|r| r.reasoning_tokens))?;
    // The GenAI semconv histogram: one observation per call and token type, summing to the
    // same numbers.
    let m = t.metrics()?;
    for (ty, want) in [("input", input), ("output", output)] {
        let count =
            m.sum("gen_ai_client_token_usage_bucket", &[("agent", agent), ("gen_ai_token_type", ty), ("le", "+Inf")]);
        let total = m.sum("gen_ai_client_token_usage_sum", &[("agent", agent), ("gen_ai_token_type", ty)]);
        ensure!(
            count == requests && total == want,
            "gen_ai_client_token_usage{{gen_ai_token_type={ty}}}: want count {requests} sum {want}, got count {count} sum {total}\n{}",
            m.dump("gen_ai_")
        );
    }
    Ok(())
}

pub fn assert_proxied(r: &CurlOut) -> Result<()> {
    ensure!(r.mock_peer().is_some(), "no x-mock-peer: the mock did not answer: {}", r.describe());
    ensure!(!r.was_direct(), "mock saw curl's own socket: the connection was NOT proxied: {}", r.describe());
    Ok(())
}

pub fn assert_direct(r: &CurlOut) -> Result<()> {
    ensure!(r.exit == 0 && r.http_code == 200, "request failed: {}", r.describe());
    ensure!(r.was_direct(), "mock did not see curl's own socket: the connection was proxied: {}", r.describe());
    Ok(())
}

pub fn assert_completion(r: &CurlOut, reply: &Reply) -> Result<()> {
    ensure!(r.exit == 0 && r.http_code == 200, "request failed: {}", r.describe());
    let want = openai::completion_body(reply);
    ensure!(
        r.body == want,
        "client body differs from what the mock sent\n got: {}\nwant: {}",
        r.text(),
        String::from_utf8_lossy(&want)
    );
    Ok(())
}

/// An access-log line that names the agent and the model.
pub fn assert_access_log(t: &Tollgate, agent: &str) -> Result<()> {
    let found = wait_for(Duration::from_secs(3), Duration::from_millis(100), || {
        t.access_log().into_iter().find(|l| {
            let s = l.to_string();
            s.contains(&format!("\"{agent}\"")) && s.contains(MODEL)
        })
    });
    ensure!(
        found.is_some(),
        "no JSON access-log line on stdout naming agent {agent:?} and model {MODEL:?}; stdout:\n{}",
        t.stdout_lines().join("\n")
    );
    Ok(())
}

/// Run a Python client script in `group` and `netns` and parse the one JSON document it prints;
/// the error shows its status, stdout and stderr.
pub fn python_json(
    group: Option<&Group>,
    netns: Option<&tollgate_e2e::netns::Netns>,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Value> {
    let out = tollgate_e2e::client::python(group, netns, script, args, env)?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        tollgate_e2e::anyhow!(
            "{script} failed ({}, {e}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
