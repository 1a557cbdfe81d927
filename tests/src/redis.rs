//! A real `redis-server` for the shared-counter tests: started on a free loopback port with no
//! persistence (`--save "" --appendonly no`), killed on drop, and killable/restartable on the
//! same port so a test can stage an outage and the recovery after it.
//!
//! The binary is `redis-server` from `PATH` (Debian package `redis-server`), or the path in
//! `TOLLGATE_REDIS_SERVER`. Test code talks to it with [`RedisServer::command`], a minimal RESP
//! client, so the tests need neither `redis-cli` nor a client crate of their own.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{anyhow, bail, free_port, wait_for, Context, Result};

/// A reply of the RESP protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`-style status.
    Status(String),
    /// `:n` integer.
    Int(i64),
    /// `$n` bulk string (`None`: nil).
    Bulk(Option<String>),
    /// `*n` array (`None`: nil).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as an integer: an integer reply, or a bulk string holding one (nil: 0).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            Reply::Bulk(None) => Some(0),
            Reply::Bulk(Some(s)) | Reply::Status(s) => s.parse().ok(),
            Reply::Array(_) => None,
        }
    }

    /// The reply as a list of strings (array of bulk strings; nil entries skipped).
    pub fn as_strings(&self) -> Vec<String> {
        match self {
            Reply::Array(Some(items)) => items
                .iter()
                .filter_map(|r| match r {
                    Reply::Bulk(Some(s)) | Reply::Status(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// RAII guard of one `redis-server` process.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir().context("temp dir for redis-server")?;
        let mut server = Self { port: free_port("127.0.0.1"), dir, child: None };
        server.spawn()?;
        Ok(server)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's port (stable across [`Self::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL, no shutdown save): an outage as abrupt as a crashed node.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (with an empty dataset) and waits for PING.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Sends one command and reads its reply; a Redis error reply is an `Err`.
    pub fn command(&self, args: &[&str]) -> Result<Reply> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        read_reply(&mut BufReader::new(s))
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = std::env::var("TOLLGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = self.port.to_string();
        let child = Command::new(&bin)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {bin} (Debian package redis-server; or set TOLLGATE_REDIS_SERVER)"))?;
        self.child = Some(child);
        let up = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
            matches!(self.command(&["PING"]), Ok(Reply::Status(ref s)) if s == "PONG").then_some(())
        });
        if up.is_none() {
            self.kill();
            bail!("redis-server on port {} did not answer PING within 10 s", self.port);
        }
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("redis closed the connection");
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_reply(r: &mut impl BufRead) -> Result<Reply> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(line.len().min(1));
    let int = |s: &str| s.parse::<i64>().map_err(|e| anyhow!("bad RESP length {s:?}: {e}"));
    match kind {
        "+" => Ok(Reply::Status(rest.to_string())),
        "-" => bail!("redis error: {rest}"),
        ":" => Ok(Reply::Int(int(rest)?)),
        "$" => {
            let Ok(n) = usize::try_from(int(rest)?) else { return Ok(Reply::Bulk(None)) };
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(n);
            Ok(Reply::Bulk(Some(String::from_utf8_lossy(&buf).into_owned())))
        }
        "*" => {
            let Ok(n) = usize::try_from(int(rest)?) else { return Ok(Reply::Array(None)) };
            (0..n).map(|_| read_reply(r)).collect::<Result<Vec<_>>>().map(|v| Reply::Array(Some(v)))
        }
        _ => bail!("unexpected RESP line {line:?}"),
    }
}
