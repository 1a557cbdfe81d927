//! Agent-side clients run as real processes in a cgroup (and optionally a netns): curl, and the
//! Python SDK scripts under `tests/clients/`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Output, Stdio};

use anyhow::{bail, Context, Result};

use crate::cgroup::{command_in, Group};
use crate::netns::Netns;

/// What one curl invocation saw.
#[derive(Debug, Clone)]
pub struct CurlOut {
    /// curl's exit code (0 ok, 7 could not connect, 28 timeout, 35/60 TLS, ...).
    pub exit: i32,
    /// Final HTTP status (0 when none).
    pub http_code: u16,
    /// curl's own local address of the connection (`%{local_ip}:%{local_port}`).
    pub local: Option<SocketAddr>,
    /// Response headers of the final response, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
    /// curl's stderr.
    pub stderr: String,
}

impl CurlOut {
    /// First header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// `x-mock-peer`: the TCP peer the mock upstream saw.
    pub fn mock_peer(&self) -> Option<SocketAddr> {
        self.header("x-mock-peer").and_then(|v| v.parse().ok())
    }

    /// Body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Did the mock see curl's own socket (no proxy in between)?
    pub fn was_direct(&self) -> bool {
        matches!((self.mock_peer(), self.local), (Some(p), Some(l)) if p == l)
    }

    /// One-line description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "curl exit={} http={} local={:?} x-mock-peer={:?} stderr={:?} body={:?}",
            self.exit,
            self.http_code,
            self.local,
            self.header("x-mock-peer"),
            self.stderr.trim(),
            String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
        )
    }
}

/// Run curl with `args` (URL included) inside `group`/`netns`.
pub fn curl(group: Option<&Group>, netns: Option<&Netns>, args: &[&str]) -> Result<CurlOut> {
    run_curl(command_in(group, netns, "curl"), args)
}

/// Run curl with `args` inside the cgroup directory `cgroup` (any depth, e.g. a kubelet-style
/// container cgroup) and `netns`.
pub fn curl_in(cgroup: &std::path::Path, netns: Option<&Netns>, args: &[&str]) -> Result<CurlOut> {
    let procs = cgroup.join("cgroup.procs");
    run_curl(crate::cgroup::command_with_procs(Some(&procs), netns.map(Netns::name), "curl"), args)
}

fn run_curl(mut cmd: std::process::Command, args: &[&str]) -> Result<CurlOut> {
    let dir = tempfile::tempdir()?;
    let hfile = dir.path().join("headers");
    let bfile = dir.path().join("body");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "15", "-H", "Expect:"])
        .arg("-D")
        .arg(&hfile)
        .arg("-o")
        .arg(&bfile)
        .args(["-w", "%{local_ip} %{local_port} %{http_code}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .stdin(Stdio::null());
    let out = cmd.output().context("spawn curl")?;
    let w = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut it = w.split_whitespace();
    let ip: Option<IpAddr> = it.next().and_then(|s| s.parse().ok());
    let port: Option<u16> = it.next().and_then(|s| s.parse().ok());
    let http_code = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let raw_headers = std::fs::read_to_string(&hfile).unwrap_or_default();
    // With several header blocks (1xx), keep the last one.
    let last_block = raw_headers.trim_end().rsplit("\r\n\r\n").next().unwrap_or("");
    let headers = last_block
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(CurlOut {
        exit: out.status.code().unwrap_or(-1),
        http_code,
        local: ip.zip(port).filter(|(_, p)| *p != 0).map(|(i, p)| SocketAddr::new(i, p)),
        headers,
        body: std::fs::read(&bfile).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The Python interpreter of the test venv: `$TOLLGATE_E2E_PYTHON` or `<repo>/.venv/bin/python`.
pub fn venv_python() -> PathBuf {
    std::env::var_os("TOLLGATE_E2E_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join(".venv/bin/python"))
}

/// A script under `tests/clients/`.
pub fn client_script(name: &str) -> PathBuf {
    crate::repo_root().join("tests/clients").join(name)
}

/// Run `tests/clients/<script>` with the venv's Python inside `group`/`netns`, with a clean
/// environment plus `env`. Returns the raw output; fails only if it could not be spawned.
pub fn python(
    group: Option<&Group>,
    netns: Option<&Netns>,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Output> {
    let py = venv_python();
    if !py.exists() {
        bail!("{} missing: run `cargo xtask setup`", py.display());
    }
    let mut cmd = command_in(group, netns, &py.to_string_lossy());
    cmd.arg(client_script(script))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", std::env::temp_dir())
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().context("spawn python client")
}
