//! JSON access log: one line per LLM call or spliced connection. Lines are serialised on the
//! connection task (small) and written by one writer task through a bounded queue; when the
//! queue is full the line is dropped and counted, so a slow disk never stalls traffic.

use std::io::Write;
use std::time::UNIX_EPOCH;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use super::{L4Conn, LlmCall, TelemetryError};
use crate::capture::Agent;

/// Lines buffered before dropping.
const QUEUE: usize = 8192;

enum Msg {
    Line(Vec<u8>),
    Flush(oneshot::Sender<()>),
}

/// Access-log sink; `off` makes every call a no-op.
pub struct AccessLog {
    tx: Option<mpsc::Sender<Msg>>,
    dropped: std::sync::atomic::AtomicU64,
}

#[derive(Serialize)]
struct AgentFields<'a> {
    name: &'a str,
    pid: u32,
    comm: &'a str,
    uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    exe: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
}

impl<'a> From<&'a Agent> for AgentFields<'a> {
    fn from(a: &'a Agent) -> Self {
        AgentFields {
            name: &a.name,
            pid: a.pid,
            comm: &a.comm,
            uid: a.uid,
            exe: a.exe.as_deref(),
            cgroup: a.cgroup_path.as_deref(),
        }
    }
}

#[derive(Serialize)]
struct LlmLine<'a> {
    ts: f64,
    kind: &'static str,
    agent: AgentFields<'a>,
    route: &'a str,
    provider: &'static str,
    operation: &'static str,
    method: &'a str,
    path: &'a str,
    status: u16,
    stream: bool,
    request_model: Option<&'a str>,
    response_model: Option<&'a str>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    tokens_estimated: bool,
    ttft_ms: Option<f64>,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct L4Line<'a> {
    ts: f64,
    kind: &'static str,
    agent: AgentFields<'a>,
    sni: Option<&'a str>,
    dst: String,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl AccessLog {
    /// `target`: `stdout`, `off`, or a file path (appended, created mode 0640).
    pub fn new(target: &str) -> Result<Self, TelemetryError> {
        let (tx, mut rx) = mpsc::channel::<Msg>(QUEUE);
        match target {
            "off" => return Ok(AccessLog { tx: None, dropped: Default::default() }),
            "stdout" => {
                tokio::spawn(async move {
                    let mut out = tokio::io::stdout();
                    while let Some(m) = rx.recv().await {
                        match m {
                            Msg::Line(l) => {
                                let _ = out.write_all(&l).await;
                            }
                            Msg::Flush(done) => {
                                let _ = out.flush().await;
                                let _ = done.send(());
                            }
                        }
                    }
                });
            }
            path => {
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(path)
                    .map_err(|source| TelemetryError::AccessLog { path: path.into(), source })?;
                // A plain blocking writer on its own thread: file appends are short, and this
                // keeps disk latency off the runtime's worker threads.
                std::thread::Builder::new()
                    .name("tollgate-access-log".into())
                    .spawn(move || {
                        let mut w = std::io::BufWriter::new(file);
                        while let Some(m) = rx.blocking_recv() {
                            match m {
                                Msg::Line(l) => {
                                    let _ = w.write_all(&l);
                                    if rx.is_empty() {
                                        let _ = w.flush();
                                    }
                                }
                                Msg::Flush(done) => {
                                    let _ = w.flush();
                                    let _ = done.send(());
                                }
                            }
                        }
                    })
                    .map_err(|source| TelemetryError::AccessLog { path: path.into(), source })?;
            }
        }
        Ok(AccessLog { tx: Some(tx), dropped: Default::default() })
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn send<T: Serialize>(&self, line: &T) {
        let Some(tx) = &self.tx else { return };
        let mut buf = Vec::with_capacity(512);
        if serde_json::to_writer(&mut buf, line).is_err() {
            return;
        }
        buf.push(b'\n');
        if tx.try_send(Msg::Line(buf)).is_err() {
            self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Log a finished LLM call.
    pub fn llm(&self, c: &LlmCall) {
        if self.tx.is_none() {
            return;
        }
        self.send(&LlmLine {
            ts: epoch_secs(c.start),
            kind: "llm",
            agent: AgentFields::from(&*c.agent),
            route: &c.route,
            provider: c.provider.semconv_name(),
            operation: c.operation,
            method: &c.method,
            path: &c.path,
            status: c.status,
            stream: c.stream,
            request_model: c.request_model.as_deref(),
            response_model: c.response_model.as_deref(),
            input_tokens: c.usage.map(|u| u.input),
            output_tokens: c.usage.map(|u| u.output),
            total_tokens: c.usage.map(|u| u.total),
            tokens_estimated: c.usage.is_some_and(|u| u.estimated),
            ttft_ms: c.ttft.map(|d| d.as_secs_f64() * 1e3),
            duration_ms: c.duration.as_secs_f64() * 1e3,
            error: c.error.as_deref(),
        });
    }

    /// Log a finished spliced connection.
    pub fn l4(&self, c: &L4Conn) {
        if self.tx.is_none() {
            return;
        }
        self.send(&L4Line {
            ts: epoch_secs(std::time::SystemTime::now() - c.duration),
            kind: "l4",
            agent: AgentFields::from(&*c.agent),
            sni: c.sni.as_deref(),
            dst: c.dst.to_string(),
            bytes_up: c.bytes_up,
            bytes_down: c.bytes_down,
            duration_ms: c.duration.as_secs_f64() * 1e3,
            error: c.error.as_deref(),
        });
    }

    /// Wait until every queued line is written.
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

fn epoch_secs(t: std::time::SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_sink_writes_one_json_line_per_call() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("access.log");
        let log = AccessLog::new(p.to_str().unwrap()).unwrap();
        let c = crate::telemetry::metrics::tests::call("billing", "gpt-4o");
        log.llm(&c);
        log.llm(&c);
        log.flush().await;
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["agent"]["name"], "billing");
        assert_eq!(lines[0]["input_tokens"], 12);
        assert_eq!(lines[0]["response_model"], "gpt-4o-2024");
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn bad_path_names_the_file() {
        let err = AccessLog::new("/nonexistent-dir/x.log").err().unwrap().to_string();
        assert!(err.contains("/nonexistent-dir/x.log"), "{err}");
    }
}
