//! A policy change by live reload reaches keep-alive connections: each request is judged by the
//! newest policy generation, not the one its connection was accepted under.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use serde_json::{json, Value};
use tollgate_e2e::cgroup::command_in;
use tollgate_e2e::client::{client_script, venv_python};
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, ensure, Context, Result};

use super::config;
use crate::support::{env, wait_metric, MODEL};

/// `openai_pooled.py` running in a cgroup: one SDK client object, one call per [`Self::call`].
struct PooledAgent {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl PooledAgent {
    fn start(group: &tollgate_e2e::cgroup::Group, base_url: &str) -> Result<PooledAgent> {
        let py = venv_python();
        let mut child = command_in(Some(group), None, &py.to_string_lossy())
            .arg(client_script("openai_pooled.py"))
            .args(["--model", MODEL])
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", std::env::temp_dir())
            .env("LANG", "C.UTF-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("OPENAI_API_KEY", "sk-test-e2e")
            .env("OPENAI_BASE_URL", base_url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn openai_pooled.py")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
        Ok(PooledAgent { child, stdin, stdout })
    }

    /// One chat call on the client's pooled connection; its JSON result.
    fn call(&mut self) -> Result<Value> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("stdin closed"))?;
        stdin.write_all(b"call\n")?;
        stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("client output: {line:?}"))
    }
}

impl Drop for PooledAgent {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Replace the config file by rename (as the kubelet updates a ConfigMap volume).
fn write_config(t: &Tollgate, cfg: &Value) -> Result<()> {
    let tmp = t.config_path.with_extension("yaml.new");
    std::fs::write(&tmp, serde_yaml_ng::to_string(cfg)?)?;
    std::fs::rename(&tmp, &t.config_path)?;
    Ok(())
}

/// (r) The unmodified `openai` SDK keeps one pooled connection; a reload adds a deny rule for
/// it; the very next call on that same connection is refused (403, never reaching the mock).
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn gov_r_reload_reaches_pooled_connection() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("govr-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let cfg = config(&mock, &[(&g, "govr-agent")], json!({}));
    let t = e.tollgate(cfg.clone(), None)?;

    let mut agent = PooledAgent::start(&g, "http://127.0.0.2:8000/v1")?;
    let mut ports = Vec::new();
    for i in 0..3 {
        let r = agent.call()?;
        ensure!(r["ok"] == json!(true), "call {i} before the reload: {r}");
        ports.push(r["port"].clone());
    }
    ensure!(mock.chat_requests()? == 3, "calls before the reload not served by the mock");

    let mut denied = cfg.clone();
    denied["access"] = json!([{"name": "govr-cut-off", "match": {"agent": "govr-agent"}, "deny": {"models": ["*"]}}]);
    write_config(&t, &denied)?;
    wait_metric(&t, "tollgate_config_reloads_total", &[("result", "success")], 1.0)?;

    let r = agent.call()?;
    ports.push(r["port"].clone());
    ensure!(r["status"] == json!(403), "first call after the reload was not refused: {r}");
    ensure!(r["error"].to_string().contains("govr-cut-off"), "refusal does not name the rule: {r}");
    ensure!(mock.chat_requests()? == 3, "the refused call reached the provider");

    // One connection throughout: the SDK's pool reused it, and tollgate accepted only one.
    ensure!(ports[0].is_u64() && ports.iter().all(|p| *p == ports[0]), "calls used several connections: {ports:?}");
    wait_metric(&t, "tollgate_connections_total", &[("agent", "govr-agent")], 1.0)?;
    wait_metric(
        &t,
        "tollgate_policy_denials_total",
        &[("agent", "govr-agent"), ("policy", "access"), ("rule", "govr-cut-off")],
        1.0,
    )?;
    Ok(())
}
