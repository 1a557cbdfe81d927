//! Runs the `mock-llm` binary as a child process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

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
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
