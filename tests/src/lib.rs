//! Test support for tollgate's end-to-end scenarios and benchmark.
//!
//! Everything here is real: cgroup2 mounts and groups, network namespaces with veth pairs, the
//! tollgate binary with its eBPF programs, a mock OpenAI upstream, curl and the Python SDKs.
//! Each resource is an RAII guard that puts the machine back the way it was on drop (also when a
//! test panics), so one failing scenario does not poison the next.

pub mod anthropic;
pub mod certs;
pub mod cgroup;
pub mod client;
pub mod gemini;
pub mod kube;
pub mod mock;
pub mod netns;
pub mod oauth;
pub mod openai;
pub mod otlp;
pub mod prom;
pub mod prometheus;
pub mod redis;
pub mod tollgate;
pub mod webhook;
pub mod wire;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use anyhow::{anyhow, bail, ensure, Context, Result};

/// Root of the repository (parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// A unique-per-process tag for names of machine-global resources (cgroups, netns, links), so
/// leftovers of a crashed run never collide with a new one.
pub fn run_tag() -> String {
    format!("tge{}", std::process::id())
}

/// A TCP port that was free on `ip` a moment ago (bind to port 0 and release).
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Poll `f` every `every` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Run a command to completion, failing with its output when it exits non-zero.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program).args(args).output().with_context(|| format!("spawn {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What [`http_request`] returns: status, headers (names lower-cased), body text.
pub type HttpReply = (u16, Vec<(String, String)>, String);

/// Minimal blocking HTTP/1.1 request (admin endpoints, mock control calls): no client library,
/// so a test talks to exactly the socket it names. JSON body when given (or for POST).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpReply> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) =
        text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header from {addr}{path}: {text:?}"))?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line from {addr}{path}: {head:?}"))?;
    let hdrs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = hdrs.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((status, hdrs, body))
}

/// Minimal blocking HTTP/1.1 GET (admin endpoints): `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let (status, _, body) = http_request(addr, "GET", path, &[], None, timeout)?;
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// Deep-merge `patch` into `base` (objects merge key by key; anything else replaces).
pub fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

/// Check that the current process can run the real-kernel scenarios; the error says why not.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the end-to-end scenarios need root (cgroup2 mounts, BPF, netns): run them via `sudo cargo xtask test`");
    }
    Ok(())
}
