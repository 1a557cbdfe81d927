//! JSON access log: one line per LLM call or spliced connection. Lines are serialised on the
//! connection task straight into a shared, bounded buffer; one writer thread swaps that buffer
//! out and writes it with a single `write` per batch. The writer wakes on the first line after an
//! idle period and then lets lines gather for a few milliseconds, so under load a batch costs one
//! system call and no per-line thread hand-off. When the buffer already holds [`QUEUE`] lines the
//! new line is dropped and counted, so a slow disk (or reader) never stalls traffic.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::oneshot;

use super::{L4Conn, LlmCall, TelemetryError};
use crate::capture::Agent;

/// Lines buffered before dropping.
const QUEUE: usize = 8192;
/// How long the writer lets lines gather after waking, bounding write latency.
const GATHER: Duration = Duration::from_millis(5);

/// State shared by producers and the writer thread.
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Serialised lines not yet written.
    buf: Vec<u8>,
    /// Lines in `buf`.
    lines: usize,
    /// `flush()` callers waiting for everything before them to be written.
    waiters: Vec<oneshot::Sender<()>>,
    /// The sink was dropped: write what is left and stop.
    closed: bool,
}

/// Access-log sink; `off` makes every call a no-op.
pub struct AccessLog {
    shared: Option<Arc<Shared>>,
    /// `tollgate_telemetry_dropped_total{sink="access_log"}` when built by `Telemetry`.
    dropped: IntCounter,
}

#[derive(Serialize)]
pub(super) struct AgentFields<'a> {
    name: &'a str,
    pid: u32,
    comm: &'a str,
    uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    exe: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    k8s: Option<K8sFields<'a>>,
}

/// Pod facts of an agent in a pod: `pod_uid`/`container_id` from the cgroup path, the rest
/// once the pod watcher knows the pod.
#[derive(Serialize)]
struct K8sFields<'a> {
    pod_uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<String>,
}

impl<'a> From<&'a crate::capture::identity::K8sIdentity> for K8sFields<'a> {
    fn from(k: &'a crate::capture::identity::K8sIdentity) -> Self {
        let p = k.pod.as_deref();
        K8sFields {
            pod_uid: &k.pod_uid,
            container_id: k.container_id.as_deref(),
            namespace: p.map(|p| p.namespace.as_str()),
            pod: p.map(|p| p.name.as_str()),
            workload: p.map(|p| format!("{}/{}", p.workload.kind, p.workload.name)),
        }
    }
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
            k8s: a.k8s.as_ref().map(K8sFields::from),
        }
    }
}

#[derive(Serialize)]
struct L4Line<'a> {
    ts: f64,
    kind: &'static str,
    agent: AgentFields<'a>,
    capture: &'static str,
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
        Self::with_dropped_counter(target, IntCounter::new("access_log_dropped", "Access-log lines dropped")?)
    }

    /// [`AccessLog::new`] counting dropped lines in `dropped` (a metric series).
    pub fn with_dropped_counter(target: &str, dropped: IntCounter) -> Result<Self, TelemetryError> {
        let file = match target {
            "off" => return Ok(AccessLog { shared: None, dropped }),
            "stdout" => {
                use std::os::fd::AsFd;
                // A private handle on fd 1: batches are written whole, bypassing std's
                // line-buffered `Stdout`.
                std::io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map(File::from)
                    .map_err(|source| TelemetryError::AccessLog { path: target.into(), source })?
            }
            path => {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(path)
                    .map_err(|source| TelemetryError::AccessLog { path: path.into(), source })?
            }
        };
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Condvar::new() });
        let writer = shared.clone();
        // A plain blocking writer on its own thread keeps disk (or pipe) latency off the
        // runtime's worker threads.
        std::thread::Builder::new()
            .name("tollgate-access-log".into())
            .spawn(move || write_loop(&writer, file))
            .map_err(|source| TelemetryError::AccessLog { path: target.into(), source })?;
        Ok(AccessLog { shared: Some(shared), dropped })
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Append one line, written by `write` (false: nothing usable was written).
    pub(super) fn push(&self, write: impl FnOnce(&mut Vec<u8>) -> bool) {
        let Some(shared) = &self.shared else { return };
        let mut st = shared.state.lock();
        if st.lines >= QUEUE {
            drop(st);
            self.dropped.inc();
            return;
        }
        let start = st.buf.len();
        if !write(&mut st.buf) {
            st.buf.truncate(start);
            return;
        }
        st.buf.push(b'\n');
        st.lines += 1;
        let first = st.lines == 1;
        drop(st);
        if first {
            shared.wake.notify_one();
        }
    }

    /// Log a finished LLM call.
    pub fn llm(&self, c: &LlmCall) {
        self.push(|buf| {
            write_llm_line(buf, c);
            true
        });
    }

    /// Log a finished spliced connection.
    pub fn l4(&self, c: &L4Conn) {
        if self.shared.is_none() {
            return;
        }
        let line = L4Line {
            ts: epoch_secs(std::time::SystemTime::now() - c.duration),
            kind: "l4",
            agent: AgentFields::from(&*c.agent),
            capture: super::Capture::Splice.as_str(),
            sni: c.sni.as_deref(),
            dst: c.dst.to_string(),
            bytes_up: c.bytes_up,
            bytes_down: c.bytes_down,
            duration_ms: c.duration.as_secs_f64() * 1e3,
            error: c.error.as_deref(),
        };
        self.push(|buf| serde_json::to_writer(buf, &line).is_ok());
    }

    /// Wait until every queued line is written.
    pub async fn flush(&self) {
        let Some(shared) = &self.shared else { return };
        let (done, wait) = oneshot::channel();
        shared.state.lock().waiters.push(done);
        shared.wake.notify_one();
        let _ = wait.await;
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.state.lock().closed = true;
            shared.wake.notify_one();
        }
    }
}

/// The writer thread: wait for lines, let more gather briefly, write the batch in one go.
fn write_loop(shared: &Shared, mut out: File) {
    let mut batch = Vec::new();
    loop {
        let (waiters, closed) = {
            let mut st = shared.state.lock();
            while st.lines == 0 && st.waiters.is_empty() && !st.closed {
                shared.wake.wait(&mut st);
            }
            if st.waiters.is_empty() && !st.closed {
                // Woken by the first line: one write for everything that arrives meanwhile.
                // A flush or close cuts the wait short.
                shared.wake.wait_for(&mut st, GATHER);
            }
            std::mem::swap(&mut st.buf, &mut batch);
            st.lines = 0;
            (std::mem::take(&mut st.waiters), st.closed)
        };
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
            batch.clear();
        }
        for w in waiters {
            let _ = w.send(());
        }
        if closed {
            return;
        }
    }
}

/// The LLM line, written directly: the same bytes `serde_json` makes of
/// `{"ts":..,"kind":"llm","agent":{..},"route":..,..}` (see the test), without its per-field
/// machinery, since this runs once per call.
fn write_llm_line(buf: &mut Vec<u8>, c: &LlmCall) {
    let a = &*c.agent;
    buf.extend_from_slice(b"{\"ts\":");
    json_f64(buf, epoch_secs(c.start));
    buf.extend_from_slice(b",\"kind\":\"llm\",\"agent\":{\"name\":");
    json_str(buf, &a.name);
    buf.extend_from_slice(b",\"pid\":");
    json_u64(buf, a.pid.into());
    buf.extend_from_slice(b",\"comm\":");
    json_str(buf, &a.comm);
    buf.extend_from_slice(b",\"uid\":");
    json_u64(buf, a.uid.into());
    if let Some(exe) = &a.exe {
        buf.extend_from_slice(b",\"exe\":");
        json_str(buf, exe);
    }
    if let Some(cg) = &a.cgroup_path {
        buf.extend_from_slice(b",\"cgroup\":");
        json_str(buf, cg);
    }
    if let Some(k) = &a.k8s {
        // Rare enough (pods only, once per call) to go through serde.
        buf.extend_from_slice(b",\"k8s\":");
        let _ = serde_json::to_writer(&mut *buf, &K8sFields::from(k));
    }
    buf.extend_from_slice(b"},\"route\":");
    json_str(buf, &c.route);
    buf.extend_from_slice(b",\"capture\":");
    json_str(buf, c.capture.as_str());
    buf.extend_from_slice(b",\"provider\":");
    json_str(buf, c.provider.semconv_name());
    if let Some(t) = &c.target {
        buf.extend_from_slice(b",\"target\":");
        json_str(buf, t);
        buf.extend_from_slice(b",\"attempts\":");
        json_u64(buf, c.attempts.into());
    }
    buf.extend_from_slice(b",\"operation\":");
    json_str(buf, c.operation);
    buf.extend_from_slice(b",\"method\":");
    json_str(buf, &c.method);
    buf.extend_from_slice(b",\"path\":");
    json_str(buf, &c.path);
    buf.extend_from_slice(b",\"status\":");
    json_u64(buf, c.status.into());
    buf.extend_from_slice(if c.stream { b",\"stream\":true" } else { b",\"stream\":false" });
    buf.extend_from_slice(b",\"request_model\":");
    json_opt_str(buf, c.request_model.as_deref());
    buf.extend_from_slice(b",\"response_model\":");
    json_opt_str(buf, c.response_model.as_deref());
    buf.extend_from_slice(b",\"input_tokens\":");
    json_opt_u64(buf, c.usage.map(|u| u.input));
    buf.extend_from_slice(b",\"output_tokens\":");
    json_opt_u64(buf, c.usage.map(|u| u.output));
    buf.extend_from_slice(b",\"total_tokens\":");
    json_opt_u64(buf, c.usage.map(|u| u.total));
    let estimated = c.usage.is_some_and(|u| u.estimated);
    buf.extend_from_slice(if estimated { b",\"tokens_estimated\":true" } else { b",\"tokens_estimated\":false" });
    buf.extend_from_slice(b",\"ttft_ms\":");
    match c.ttft {
        Some(d) => json_f64(buf, d.as_secs_f64() * 1e3),
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"duration_ms\":");
    json_f64(buf, c.duration.as_secs_f64() * 1e3);
    if let Some(e) = &c.error {
        buf.extend_from_slice(b",\"error\":");
        json_str(buf, e);
    }
    if let Some(p) = &c.payload {
        buf.extend_from_slice(b",\"request_body\":");
        json_str(buf, &String::from_utf8_lossy(&p.request));
        buf.extend_from_slice(b",\"response_body\":");
        json_str(buf, &String::from_utf8_lossy(&p.response));
        buf.extend_from_slice(if p.truncated {
            b",\"payload_truncated\":true"
        } else {
            b",\"payload_truncated\":false"
        });
    }
    buf.push(b'}');
}

/// A JSON string; strings needing no escape (nearly all) are copied as is, others are escaped
/// by `serde_json` itself.
fn json_str(buf: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, s);
        return;
    }
    buf.reserve(s.len() + 2);
    buf.push(b'"');
    buf.extend_from_slice(s.as_bytes());
    buf.push(b'"');
}

/// Any `"`, `\` or control character in `s`? Eight bytes at a time (the test `serde_json`
/// uses to find them; borrows only ever flag bytes after a real match, so "none" is exact).
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::MAX / 255;
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let ctrl = w.wrapping_sub(ONES * 0x20) & !w;
        let q = w ^ (ONES * u64::from(b'"'));
        let b = w ^ (ONES * u64::from(b'\\'));
        if (ctrl | (q.wrapping_sub(ONES) & !q) | (b.wrapping_sub(ONES) & !b)) & (ONES << 7) != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

fn json_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(buf, s),
        None => buf.extend_from_slice(b"null"),
    }
}

fn json_u64(buf: &mut Vec<u8>, v: u64) {
    let _ = serde_json::to_writer(&mut *buf, &v);
}

fn json_opt_u64(buf: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => json_u64(buf, v),
        None => buf.extend_from_slice(b"null"),
    }
}

/// Same formatting as `serde_json` (shortest round-trip; `null` when not finite).
fn json_f64(buf: &mut Vec<u8>, v: f64) {
    let _ = serde_json::to_writer(&mut *buf, &v);
}

pub(super) fn epoch_secs(t: std::time::SystemTime) -> f64 {
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

    /// The line as it was defined before it was written by hand: the reference format.
    #[derive(Serialize)]
    struct LlmLine<'a> {
        ts: f64,
        kind: &'static str,
        agent: AgentFields<'a>,
        route: &'a str,
        capture: &'static str,
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

    fn reference(c: &LlmCall) -> String {
        serde_json::to_string(&LlmLine {
            ts: epoch_secs(c.start),
            kind: "llm",
            agent: AgentFields::from(&*c.agent),
            route: &c.route,
            capture: c.capture.as_str(),
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
        })
        .unwrap()
    }

    #[test]
    fn escape_detection_is_exact() {
        let base = "abcdefghij\u{7f}\u{e9}klmnopq/'";
        assert!(!needs_escape(base.as_bytes()));
        for special in ['"', '\\', '\u{0}', '\n', '\u{1f}'] {
            for at in 0..base.len() {
                let mut s = base.as_bytes().to_vec();
                s[at] = special as u8;
                assert!(needs_escape(&s), "{special:?} at {at}");
            }
        }
    }

    #[test]
    fn llm_line_matches_serde_format() {
        use std::sync::Arc;
        use std::time::{Duration, SystemTime};
        let base = crate::telemetry::metrics::tests::call("billing", "gpt-4o");
        let mut odd = base.clone();
        let mut agent = Agent::unknown("we\"ird\\name\u{1}\n");
        agent.pid = 4242;
        agent.uid = 1000;
        agent.comm = "py\tthon".into();
        agent.exe = Some("/usr/bin/pyth\u{e9}n3".into());
        agent.cgroup_path = Some("/kubepods.slice/x".into());
        odd.agent = Arc::new(agent);
        odd.request_model = None;
        odd.response_model = Some("m\u{7f}\u{1f}".into());
        odd.usage = None;
        odd.ttft = None;
        odd.stream = false;
        odd.status = 502;
        odd.error = Some("upstream: \"refused\"\r\n".into());
        odd.path = "/v1/chat/completions?x=\u{2028}".into();
        odd.start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        odd.duration = Duration::from_nanos(1);
        let mut est = base.clone();
        est.usage = est.usage.map(|u| crate::telemetry::Usage { estimated: true, ..u });
        est.start = SystemTime::UNIX_EPOCH;
        est.duration = Duration::from_secs(12345);
        for c in [&base, &odd, &est] {
            let mut buf = Vec::new();
            write_llm_line(&mut buf, c);
            assert_eq!(String::from_utf8(buf).unwrap(), reference(c));
        }
    }

    #[test]
    fn bad_path_names_the_file() {
        let err = AccessLog::new("/nonexistent-dir/x.log").err().unwrap().to_string();
        assert!(err.contains("/nonexistent-dir/x.log"), "{err}");
    }
}
