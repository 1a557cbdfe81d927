//! The DaemonSet's capability list, proven: tollgate runs as root with only the capabilities the
//! manifest grants (bounding set cut with `setpriv`, as a container runtime does). The kernel
//! side needs BPF, NET_ADMIN and PERFMON (each shown to be needed) plus SYS_PTRACE to name
//! other users' executables; SYS_ADMIN is in the manifest for the TLS uprobes (shown: without
//! it they probe nothing), for runtimes whose default seccomp profile allows bpf(2) only to
//! CAP_SYS_ADMIN, and for mounting cgroup2/bpffs/tracefs on hosts that lack them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::cgroup::{command_in, Group};
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::tollgate::{base_config, Tollgate};
use tollgate_e2e::{ensure, merge, wait_for, Result};

use crate::support::*;

/// What the kernel side needs.
const MINIMAL_CAPS: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_PTRACE"];

/// `securityContext.capabilities.add` of the tollgate container in the base DaemonSet.
fn daemonset_caps() -> Result<Vec<String>> {
    let path = tollgate_e2e::repo_root().join("deploy/kubernetes/base/daemonset.yaml");
    let ds: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path)?)?;
    let add = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"];
    let caps: Vec<String> =
        add.as_array().map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect()).unwrap_or_default();
    ensure!(!caps.is_empty(), "no capabilities.add in {}", path.display());
    Ok(caps)
}

/// A wrapper that execs tollgate with the bounding set cut to `caps`.
fn wrapper(dir: &Path, tollgate: &Path, caps: &[&str]) -> Result<PathBuf> {
    let list: String = caps.iter().map(|c| format!(",+{}", c.to_ascii_lowercase())).collect();
    let path = dir.join(format!("tollgate-caps{}", caps.len()));
    let script =
        format!("#!/bin/sh\nexec setpriv --bounding-set -all{list} --inh-caps -all -- {} \"$@\"\n", tollgate.display());
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

fn start(e: &Env, caps: &[&str], patch: Value) -> Result<Tollgate> {
    let bin = wrapper(e.scratch.path(), &e.tg_bin, caps)?;
    let dir = Tollgate::scratch()?;
    let mut cfg = base_config(&e.cg, dir.path());
    merge(&mut cfg, patch);
    Tollgate::start(&bin, dir, cfg, None)
}

/// A chat call by an unprivileged user (uid 1000) in `g`: the agent process is not tollgate's
/// uid, which is what makes `/proc/<pid>/exe` need CAP_SYS_PTRACE.
fn call_as_user(e: &Env, g: &Group, url: &str, text: &str) -> Result<()> {
    let req = ChatRequest::simple(MODEL, text);
    let body = e.path("k4.json");
    std::fs::write(&body, serde_json::to_vec(&req.to_json())?)?;
    std::fs::set_permissions(&body, std::fs::Permissions::from_mode(0o644))?;
    let out = command_in(Some(g), None, "setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "curl", "-sS", "--max-time", "10"])
        .args(["-H", "Content-Type: application/json", "-H", "Authorization: Bearer sk-e2e"])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(url)
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    ensure!(
        out.status.success() && v["choices"][0]["message"]["content"] == openai::reply_for(&req).content,
        "call as uid 1000 failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The HTTPS provider of k4 (spliced, observed through the uprobes).
const K4_HOST: &str = "k4-provider.test";
const K4_TLS: &str = "127.0.0.3:8443";

/// `patch` plus a spliced route for [`K4_HOST`] at [`K4_TLS`].
fn with_tls_route(mut patch: Value) -> Value {
    if let Some(d) = patch["capture"]["destinations"].as_array_mut() {
        d.push(json!({"cidr": "127.0.0.3/32", "port": 8443}));
    }
    if let Some(r) = patch["routes"].as_array_mut() {
        r.push(json!({"name": "k4-tls", "provider": "openai", "match": {"hosts": [K4_HOST]}}));
    }
    patch
}

/// A chat call over HTTPS by uid 1000 in `g`, trusting only the provider's CA.
fn tls_call_as_user(g: &Group, cacert: &Path, text: &str) -> Result<()> {
    let req = ChatRequest::simple(MODEL, text);
    let resolve = format!("{K4_HOST}:8443:127.0.0.3");
    let out = command_in(Some(g), None, "setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "curl", "-sS", "--max-time", "10"])
        // The observed path reads HTTP/1.1 (HTTP/2 is counted, not parsed: README).
        .arg("--http1.1")
        .arg("--cacert")
        .arg(cacert)
        .args(["--resolve", &resolve, "-H", "Content-Type: application/json", "-H", "Authorization: Bearer sk-e2e"])
        .args(["--data-binary", &serde_json::to_string(&req.to_json())?])
        .arg(format!("https://{K4_HOST}:8443/v1/chat/completions"))
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    ensure!(
        out.status.success() && v["choices"][0]["message"]["content"] == openai::reply_for(&req).content,
        "TLS call as uid 1000 failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The `libssl.so` file curl loads, from `ldd`.
fn curl_libssl() -> Result<PathBuf> {
    let out = std::process::Command::new("ldd").arg("/usr/bin/curl").output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("libssl.so"))
        .find_map(|l| l.split("=>").nth(1)?.split_whitespace().next().map(PathBuf::from))
        .ok_or_else(|| tollgate_e2e::anyhow!("no libssl in `ldd /usr/bin/curl`"))
}

fn llm_line(t: &Tollgate, n: usize) -> Result<Value> {
    wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        t.access_log().into_iter().filter(|l| l["kind"] == "llm").nth(n)
    })
    .ok_or_else(|| tollgate_e2e::anyhow!("no access-log line #{n}:\n{}", t.stderr_tail(20)))
}

// ---------------------------------------------------------------------------------------------
// k4. Least capabilities: the manifest's set captures and names agents; each one is needed.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn k4_daemonset_capabilities_are_enough_and_each_is_needed() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("k4-agent")?;
    // The agent (uid 1000) must be able to enter its cgroup dir and read the request body.
    std::fs::set_permissions(e.scratch.path(), std::fs::Permissions::from_mode(0o755))?;
    let mock = e.mock(&["--listen", "127.0.0.2:0"])?;
    let addr = mock.http[0];
    let url = format!("http://{addr}/v1/chat/completions");
    let patch = plaintext_route(addr, &[&g], "k4", &g);

    // An HTTPS provider the agent trusts by its own CA, spliced: the TLS uprobes observe it.
    let ca = TestCa::new(e.scratch.path(), "k4-provider", "tollgate e2e k4 provider CA")?;
    std::fs::set_permissions(&ca.cert_path, std::fs::Permissions::from_mode(0o644))?;
    let cert = ca.issue(e.scratch.path(), "k4-provider", &[K4_HOST])?;
    let tls_mock = e.mock_tls(K4_TLS, &cert, &[])?;
    // curl is short-lived: its libssl is probed from start (capture.uprobes.paths), not found
    // by the rescan after its exec.
    let mut patch = with_tls_route(patch);
    patch["capture"]["uprobes"] = json!({"paths": [curl_libssl()?]});

    // The DaemonSet's set as written, then the kernel's minimum for capture: captured, counted
    // and the agent's executable known with both. The TLS uprobes need the manifest's
    // SYS_ADMIN on top (perf_event_open of a uprobe is refused without it on this kernel, and
    // it mounts tracefs): with the minimum they probe nothing and spliced TLS stays L4-only.
    let manifest = daemonset_caps()?;
    let manifest: Vec<&str> = manifest.iter().map(String::as_str).collect();
    ensure!(
        manifest.iter().filter(|c| !MINIMAL_CAPS.contains(c)).eq(["SYS_ADMIN"].iter()),
        "the manifest adds more than SYS_ADMIN to the minimum: {manifest:?}"
    );
    for (i, caps) in [manifest.as_slice(), &MINIMAL_CAPS[..]].into_iter().enumerate() {
        let t = start(&e, caps, patch.clone())?;
        call_as_user(&e, &g, &url, &format!("caps {i}"))?;
        wait_metric(&t, "tollgate_llm_requests_total", &[("agent", "k4")], 1.0)?;
        let line = llm_line(&t, 0)?;
        let a = &line["agent"];
        ensure!(
            a["uid"] == 1000 && a["exe"].as_str().is_some_and(|x| x.ends_with("/curl")),
            "caps {caps:?}: agent facts {a}"
        );
        let observed = [("agent", "k4"), ("capture", "uprobe")];
        if i == 0 {
            wait_metric(&t, "tollgate_uprobe_available", &[], 1.0)?;
            wait_metric(&t, "tollgate_uprobe_attached_files", &[("kind", "shared")], 1.0)?;
            tls_call_as_user(&g, &ca.cert_path, "manifest caps over TLS")?;
            wait_metric(&t, "tollgate_llm_requests_total", &observed, 1.0)?;
        } else {
            tls_call_as_user(&g, &ca.cert_path, "minimal caps over TLS")?;
            wait_metric(&t, "tollgate_connections_total", &[("agent", "k4"), ("kind", "spliced")], 1.0)?;
            let m = t.metrics()?;
            ensure!(
                m.sum("tollgate_uprobe_attached_files", &[]) == 0.0
                    && m.sum("tollgate_llm_requests_total", &observed) == 0.0,
                "uprobes probed without CAP_SYS_ADMIN:\n{}",
                m.dump("tollgate_uprobe")
            );
        }
    }
    ensure!(tls_mock.chat_requests()? == 2, "TLS mock stats {}", tls_mock.stats(None)?);

    // Without SYS_PTRACE: still captured, but another user's executable cannot be read.
    let t = start(&e, &["BPF", "NET_ADMIN", "PERFMON"], patch.clone())?;
    call_as_user(&e, &g, &url, "no ptrace")?;
    let line = llm_line(&t, 0)?;
    ensure!(line["agent"]["uid"] == 1000 && line["agent"]["exe"].is_null(), "exe read without SYS_PTRACE: {line}");
    drop(t);

    // Without BPF, NET_ADMIN or PERFMON the programs do not load: tollgate refuses to start.
    for missing in ["BPF", "NET_ADMIN", "PERFMON"] {
        let caps: Vec<&str> = MINIMAL_CAPS.iter().copied().filter(|c| *c != missing).collect();
        match start(&e, &caps, patch.clone()) {
            Ok(_) => tollgate_e2e::bail!("tollgate started without CAP_{missing}"),
            Err(err) => {
                let msg = format!("{err:#}");
                ensure!(
                    msg.contains("Operation not permitted") || msg.contains("Permission denied"),
                    "without CAP_{missing}: unexpected failure: {msg}"
                );
            }
        }
    }
    Ok(())
}
