//! Runs the `mock-llm` binary as a child process, and drives its control API.
//!
//! The server itself lives in the submodules (`server`, `apis`, `control`), so the binary stays a
//! thin CLI and the tests can reuse its types.
//!
//! Control API (on any listener; never recorded, faulted or authenticated):
//! * `GET /__mock/stats` → counters (`total`, per-API keys such as `openai_chat`, ...);
//!   `DELETE` zeroes them.
//! * `GET /__mock/requests` → the last API requests `{method, path, query, version, headers,
//!   body_json, body_len, peer, api, fault}`; `DELETE` forgets them.
//! * `POST /__mock/fault` `{"status"?, "delay_ms"?, "count"?, "path_contains"?}` installs a fault
//!   (replacing any other); `GET` shows it; `DELETE` clears it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub mod apis;
pub mod control;
pub mod server;

/// A running mock upstream; killed on drop.
pub struct MockLlm {
    child: Child,
    /// Plain HTTP listeners, as bound.
    pub http: Vec<SocketAddr>,
    /// HTTPS listeners, as bound.
    pub https: Vec<SocketAddr>,
}

impl MockLlm {
    /// Start `bin` with `args` (e.g. `--listen 127.0.0.2:8000`) and wait until every listener
    /// is bound.
    pub fn start(bin: &Path, args: &[String]) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let want = args.iter().filter(|a| *a == "--listen" || *a == "--tls-listen").count();
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let (mut http, mut https) = (Vec::new(), Vec::new());
        while http.len() + https.len() < want {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                let st = child.wait()?;
                bail!("mock-llm {args:?} exited before listening: {st}");
            }
            let mut it = line.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some("listening"), Some("http"), Some(a)) => http.push(a.parse()?),
                (Some("listening"), Some("https"), Some(a)) => https.push(a.parse()?),
                _ => return Err(anyhow!("unexpected mock-llm output {line:?}")),
            }
        }
        // Keep draining stdout so the mock never blocks on a full pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        Ok(MockLlm { child, http, https })
    }

    /// Counters from `GET /__mock/stats` on the first plain listener (or `via`).
    pub fn stats(&self, via: Option<SocketAddr>) -> Result<serde_json::Value> {
        let addr = via.or_else(|| self.http.first().copied()).ok_or_else(|| anyhow!("no plain listener"))?;
        let (st, body) = crate::http_get(addr, "/__mock/stats", Duration::from_secs(5))?;
        if st != 200 {
            bail!("mock stats: HTTP {st}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Number of chat completions served.
    pub fn chat_requests(&self) -> Result<u64> {
        self.stats(None)?["chat_requests"].as_u64().ok_or_else(|| anyhow!("no chat_requests"))
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first plain listener (control calls go there).
    pub fn control_addr(&self) -> Result<SocketAddr> {
        self.http.first().copied().ok_or_else(|| anyhow!("mock has no plain listener for control calls"))
    }

    /// One control call: `(status, JSON body)`.
    pub fn control(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let payload = body.map(|b| b.to_string());
        let (st, _, text) = http_call(self.control_addr()?, method, path, &[], payload.as_deref().map(str::as_bytes))?;
        let v = serde_json::from_str(&text).with_context(|| format!("mock {method} {path}: {text:?}"))?;
        Ok((st, v))
    }

    /// Install a fault, e.g. `json!({"status": 503, "count": 1})` or `{"delay_ms": 3000}`.
    pub fn set_fault(&self, fault: Value) -> Result<()> {
        let (st, v) = self.control("POST", "/__mock/fault", Some(&fault))?;
        if st != 200 {
            bail!("mock rejected fault {fault}: {v}");
        }
        Ok(())
    }

    /// Remove the fault.
    pub fn clear_fault(&self) -> Result<()> {
        self.control("DELETE", "/__mock/fault", None).map(|_| ())
    }

    /// The recorded API requests, oldest first.
    pub fn requests(&self) -> Result<Vec<Value>> {
        match self.control("GET", "/__mock/requests", None)? {
            (200, Value::Array(a)) => Ok(a),
            (st, v) => bail!("mock requests: HTTP {st}: {v}"),
        }
    }

    /// Forget the recorded requests.
    pub fn clear_requests(&self) -> Result<()> {
        self.control("DELETE", "/__mock/requests", None).map(|_| ())
    }

    /// Counter `key` from `/__mock/stats` (e.g. `total`, `anthropic_messages`).
    pub fn counter(&self, key: &str) -> Result<u64> {
        self.stats(None)?[key].as_u64().ok_or_else(|| anyhow!("no counter {key:?} in mock stats"))
    }
}

pub use crate::HttpReply;

/// One request to a mock (control calls, tests), 10 s timeout.
pub fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpReply> {
    crate::http_request(addr, method, path, headers, body, Duration::from_secs(10))
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
