//! Gateway scenarios (issue 3): agents in a captured cgroup call an address nothing listens on;
//! the kernel redirects the connect to tollgate, which serves the call from configured provider
//! targets (mock providers speaking the real wire formats) with its own keys, balancing,
//! failover and translation. Clients are the unmodified `openai` and `anthropic` SDKs or curl.
//!
//! Expected token counts are never taken from tollgate: they are recomputed from the request
//! the mock recorded, with the mock's own deterministic formulas.

mod listener;
mod providers;
mod routing;
mod sdk;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;

use serde_json::{json, Value};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::python;
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, ensure, wait_for, Result};

use crate::support::{env, Env};

/// One gateway scenario: environment, the agent's cgroup, and the virtual address the agent
/// dials (captured; nothing listens there).
pub struct Gw {
    pub e: Env,
    pub g: Group,
    pub agent: String,
    pub vip: SocketAddr,
}

impl Gw {
    /// A scratch environment whose agent `name` dials `127.0.0.2:<port>`.
    pub fn new(name: &str, port: u16) -> Result<Gw> {
        let e = env()?;
        let g = e.cg.group(name)?;
        Ok(Gw { e, g, agent: name.to_string(), vip: SocketAddr::from(([127, 0, 0, 2], port)) })
    }

    /// A plain-HTTP mock provider named `name` that accepts only `keys`.
    pub fn mock(&self, name: &str, keys: &[&str], extra: &[&str]) -> Result<MockLlm> {
        let mut args = vec!["--listen", "127.0.0.1:0", "--name", name];
        for k in keys {
            args.extend(["--require-key", k]);
        }
        args.extend_from_slice(extra);
        self.e.mock(&args)
    }

    /// Write `key` to a fresh key file; returns its path.
    pub fn key_file(&self, name: &str, key: &str) -> Result<PathBuf> {
        let p = self.e.path(&format!("{name}.key"));
        std::fs::write(&p, format!("{key}\n"))?;
        Ok(p)
    }

    /// tollgate capturing `vip` for the agent's cgroup, with `providers` and one route `gw`
    /// (fields of `route` merged in: `targets`, `balance`, ...).
    pub fn tollgate(&self, providers: Value, route: Value) -> Result<Tollgate> {
        let mut r = json!({"name": "gw", "match": {"addresses": [self.vip.to_string()]}});
        tollgate_e2e::merge(&mut r, route);
        self.e.tollgate(
            json!({
                "capture": {
                    "scope": [self.g.rel()],
                    "destinations": [{"cidr": format!("{}/32", self.vip.ip()), "port": self.vip.port()}],
                },
                "providers": providers,
                "routes": [r],
                "agents": [{"name": self.agent, "match": {"cgroup": self.g.rel()}}],
            }),
            None,
        )
    }

    /// `http://<vip>` + `suffix`: the base URL agents are configured with.
    pub fn url(&self, suffix: &str) -> String {
        format!("http://{}{suffix}", self.vip)
    }

    /// Run a client script in the agent's cgroup; its JSON line, or an error with its output.
    pub fn client(&self, script: &str, args: &[&str]) -> Result<Value> {
        let out = python(Some(&self.g), None, script, args, &[])?;
        parse_client(script, &out)
    }
}

/// The client's JSON output line, or an error showing its stdout and stderr.
pub fn parse_client(script: &str, out: &Output) -> Result<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed = text.lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok());
    match parsed {
        Some(v) if out.status.success() => Ok(v),
        _ => Err(anyhow!(
            "{script} failed ({}):\nstdout: {text}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// The access-log lines of LLM calls on route `gw`, waiting until there are `n`.
pub fn llm_lines(t: &Tollgate, n: usize) -> Result<Vec<Value>> {
    let got = wait_for(std::time::Duration::from_secs(5), std::time::Duration::from_millis(50), || {
        let v: Vec<Value> = t.access_log().into_iter().filter(|l| l["kind"] == "llm" && l["route"] == "gw").collect();
        (v.len() >= n).then_some(v)
    });
    got.ok_or_else(|| {
        anyhow!("fewer than {n} llm access-log lines for route gw; stdout:\n{}", t.stdout_lines().join("\n"))
    })
}

/// Assert an access-log line carries exactly these token counts and was not estimated.
pub fn assert_line_tokens(line: &Value, input: u64, output: u64) -> Result<()> {
    ensure!(
        line["input_tokens"] == json!(input) && line["output_tokens"] == json!(output),
        "tollgate counted input={} output={}, the mock reported input={input} output={output}: {line}",
        line["input_tokens"],
        line["output_tokens"]
    );
    ensure!(line["tokens_estimated"] == json!(false), "tokens marked estimated: {line}");
    Ok(())
}

/// The last request the mock recorded, with its body.
pub fn last_request(m: &MockLlm) -> Result<Value> {
    m.requests()?.pop().ok_or_else(|| anyhow!("the mock recorded no request"))
}
