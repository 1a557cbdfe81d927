//! u8: processes started after tollgate. One whose OpenSSL file is already probed (listed in
//! `capture.uprobes.paths`) is observed from its very first call; one that loads a library
//! *file* nobody had mapped (a copy of libssl under a new path, through `LD_LIBRARY_PATH`) is
//! observed once the exec-triggered rescan has probed that file: the delay from exec to
//! `tollgate_uprobe_attached_files` growing is measured, and every call after it is exact.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::cgroup::{command_in, Group};
use tollgate_e2e::{anyhow, bail, ensure, wait_for, Context, Result};

use super::{setup_with, Observed, Opts, HOST};
use crate::support::*;

/// The libssl file the machine's curl loads (`ldd`), canonical.
fn system_libssl() -> Result<PathBuf> {
    let out = std::process::Command::new("ldd").arg("/usr/bin/curl").output().context("ldd curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("libssl.so.3 => ").and_then(|r| r.split_whitespace().next()))
        .ok_or_else(|| anyhow!("curl does not link libssl.so.3:\n{text}"))?;
    Ok(std::fs::canonicalize(path)?)
}

/// curl reading its whole config from stdin (`-K -`) before it starts any transfer: started,
/// it has mapped its libraries (exec) and waits.
fn spawn_curl(o: &Observed, g: &Group, lib_dir: Option<&Path>) -> Result<Child> {
    let mut cmd = command_in(Some(g), Some(&o.ns), "curl");
    cmd.args(["-K", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for k in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        cmd.env_remove(k);
    }
    if let Some(d) = lib_dir {
        cmd.env("LD_LIBRARY_PATH", d);
    }
    cmd.spawn().context("spawn curl")
}

/// Give `child` a config of `n` chat calls (one keep-alive connection, HTTP/1.1, the mock's CA
/// only) and wait for it; returns the usage objects the agent received.
fn run_calls(o: &Observed, mut child: Child, tag: &str, n: usize) -> Result<Vec<Value>> {
    let mut cfg = String::new();
    let mut outs = Vec::new();
    for i in 0..n {
        let req = o.e.path(&format!("{tag}-req-{i}.json"));
        let body = json!({"model": MODEL, "max_tokens": 12,
            "messages": [{"role": "user", "content": format!("{tag} call {i}: name a colour.")}]});
        std::fs::write(&req, body.to_string())?;
        let out = o.e.path(&format!("{tag}-out-{i}.json"));
        if i > 0 {
            cfg.push_str("next\n");
        }
        cfg.push_str(&format!(
            "http1.1\nsilent\nshow-error\nfail\nnoproxy = \"*\"\ncacert = \"{ca}\"\n\
             header = \"Content-Type: application/json\"\nheader = \"Authorization: Bearer sk-agent-own-key\"\n\
             header = \"Expect:\"\ndata-binary = \"@{req}\"\noutput = \"{out}\"\n\
             url = \"https://{HOST}/v1/chat/completions\"\n",
            ca = o.mock_ca,
            req = req.display(),
            out = out.display()
        ));
        outs.push(out);
    }
    {
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("curl stdin"))?;
        stdin.write_all(cfg.as_bytes())?;
    }
    let res = child.wait_with_output()?;
    ensure!(res.status.success(), "curl failed ({}): {}", res.status, String::from_utf8_lossy(&res.stderr));
    outs.iter()
        .map(|p| {
            let v: Value = serde_json::from_slice(&std::fs::read(p)?)?;
            ensure!(v["usage"]["prompt_tokens"].as_f64().is_some(), "no usage in {v}");
            Ok(v["usage"].clone())
        })
        .collect()
}

/// Tokens and requests of `agent` equal the usage its calls received, none estimated.
fn assert_exact(o: &Observed, agent: &str, usages: &[Value]) -> Result<()> {
    let f = |k: &str| usages.iter().map(|u| u[k].as_f64().unwrap_or(f64::NAN)).sum::<f64>();
    let base = [("agent", agent), ("capture", "uprobe"), ("model", MODEL)];
    let with = |k: &'static str, v: &'static str| {
        let mut l = base.to_vec();
        l.push((k, v));
        l
    };
    wait_metric(&o.t, "tollgate_llm_requests_total", &with("status", "200"), usages.len() as f64)?;
    wait_metric(&o.t, "tollgate_llm_tokens_total", &with("token_type", "input"), f("prompt_tokens"))?;
    wait_metric(&o.t, "tollgate_llm_tokens_total", &with("token_type", "output"), f("completion_tokens"))?;
    wait_metric(&o.t, "tollgate_llm_tokens_total", &with("token_type", "total"), f("total_tokens"))?;
    let m = o.t.metrics()?;
    ensure!(
        m.sum("tollgate_llm_estimated_tokens_total", &[("agent", agent)]) == 0.0,
        "estimated usage for {agent}:\n{}",
        m.dump("tollgate_llm")
    );
    Ok(())
}

fn attached(o: &Observed) -> Result<f64> {
    Ok(o.t.metrics()?.sum("tollgate_uprobe_attached_files", &[("kind", "shared")]))
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn u8_late_process_known_library_from_first_call_new_library_after_exec_rescan() -> Result<()> {
    let libssl = system_libssl()?;
    let o = setup_with(
        "u8-known",
        48,
        Opts {
            more_agents: vec!["u8-late".into()],
            // Periodic scans out of the way: only the exec-triggered one can find a new file.
            uprobes: json!({"paths": [libssl.to_string_lossy()], "rescan_interval": "60s", "rescan_on_exec": true}),
            ..Opts::default()
        },
    )?;
    let late_group = &o.more[0];

    // Known library: a curl started now calls at once (well before any rescan could run) and
    // its very first call is counted, without any new file being probed.
    let n0 = attached(&o)?;
    ensure!(n0 >= 1.0, "{} not probed at start", libssl.display());
    let child = spawn_curl(&o, &o.g, None)?;
    let usages = run_calls(&o, child, "known", 1)?;
    assert_exact(&o, "u8-known", &usages)?;
    ensure!(attached(&o)? == n0, "a new file was probed for a curl using the known library");

    // New library file: a copy of libssl under a path no process has mapped.
    let dir = o.e.path("late-lib");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&libssl, dir.join("libssl.so.3"))?;
    let n1 = attached(&o)?;
    let t0 = Instant::now();
    let child = spawn_curl(&o, late_group, Some(&dir))?;
    let pid = child.id();
    let copy = dir.join("libssl.so.3").to_string_lossy().into_owned();
    let mapped = wait_for(Duration::from_secs(5), Duration::from_millis(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/maps")).ok().filter(|m| m.contains(&copy)).map(|_| ())
    });
    if mapped.is_none() {
        bail!("curl (pid {pid}) never mapped {copy}");
    }
    // The gauge grew and the file probed is this copy (not another process's new library).
    let grew = wait_for(Duration::from_secs(10), Duration::from_millis(10), || {
        let n = attached(&o).ok().filter(|n| *n > n1)?;
        let logged = o.t.stderr_tail(400).lines().any(|l| l.contains("TLS library probed") && l.contains(&copy));
        logged.then(|| (n, t0.elapsed()))
    });
    let Some((_, delay)) = grew else {
        bail!("the new libssl file was not probed within 10 s of exec:\n{}", o.t.stderr_tail(30));
    };
    println!(
        "u8: new library file probed {:.0} ms after exec (rescan_on_exec, periodic rescan 60 s)",
        delay.as_secs_f64() * 1e3
    );
    let usages = run_calls(&o, child, "late", 3)?;
    assert_exact(&o, "u8-late", &usages)?;
    Ok(())
}
