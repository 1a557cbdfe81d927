//! A stdio MCP server spawned and supervised by tollgate: newline-delimited JSON-RPC on the
//! child's stdin/stdout, its stderr logged, answers matched to requests by tollgate's own ids.
//! When the process exits it is restarted with a doubling backoff and initialised again before
//! any request is sent to it, so client sessions survive a crash (requests in flight at the
//! crash fail). The process is killed when the last config generation using it is dropped.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

use super::upstream::{result_of, CallError, InitInfo, SUPPORTED_VERSIONS};
use crate::config::federation::FederatedServer;
use crate::telemetry::federation::FederationMetrics;

/// Messages queued for one process's stdin at most; a full queue fails the request rather
/// than letting a stuck server grow memory.
const WRITE_QUEUE: usize = 256;
/// Requests awaiting an answer at most.
const MAX_PENDING: usize = 4096;
/// A process up this long resets the restart backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Longest stderr line logged.
const MAX_LOG_LINE: usize = 2048;

/// Readiness of the current process.
#[derive(Clone, Default)]
struct Ready {
    /// `initialize` answer of the running process; `None` while (re)starting.
    info: Option<InitInfo>,
}

struct Shared {
    name: String,
    federation: Arc<str>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    writer: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    ready: watch::Sender<Ready>,
    timeout: Duration,
    max_line: usize,
    metrics: Arc<FederationMetrics>,
}

/// A supervised stdio server.
pub struct StdioServer {
    shared: Arc<Shared>,
    /// Dropped with the server: the supervisor kills the process and ends.
    _stop: oneshot::Sender<()>,
}

impl StdioServer {
    /// Spawn the process and its supervisor (on the current runtime).
    pub fn start(
        federation: Arc<str>,
        cfg: &FederatedServer,
        timeout: Duration,
        max_line: usize,
        metrics: Arc<FederationMetrics>,
    ) -> Arc<StdioServer> {
        let (ready, _) = watch::channel(Ready::default());
        let shared = Arc::new(Shared {
            name: cfg.name.clone(),
            federation,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            writer: Mutex::new(None),
            ready,
            timeout,
            max_line,
            metrics,
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(supervise(shared.clone(), cfg.clone(), stop_rx));
        Arc::new(StdioServer { shared, _stop: stop_tx })
    }

    /// Server name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Wait (up to the request timeout) for a running, initialised process.
    pub async fn wait_ready(&self) -> Result<InitInfo, CallError> {
        let mut rx = self.shared.ready.subscribe();
        let t = self.shared.timeout;
        let waited = tokio::time::timeout(t, async {
            match rx.wait_for(|r| r.info.is_some()).await {
                Ok(r) => r.info.clone().ok_or_else(|| CallError::Unavailable("not running".into())),
                Err(_) => Err(CallError::Unavailable("supervisor stopped".into())),
            }
        })
        .await;
        waited.unwrap_or_else(|_| Err(CallError::Unavailable(format!("process not running (waited {t:?})"))))
    }

    /// A request to the running process.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, CallError> {
        self.wait_ready().await?;
        self.shared.request(method, params).await
    }

    /// A notification to the running process (dropped while it is down).
    pub async fn notify(&self, method: &str, params: Value) {
        if self.shared.ready.borrow().info.is_some() {
            self.shared.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
        }
    }
}

impl Shared {
    fn send(&self, msg: &Value) -> bool {
        let Ok(mut line) = serde_json::to_vec(msg) else { return false };
        line.push(b'\n');
        let w = self.writer.lock().clone();
        w.is_some_and(|w| w.try_send(line).is_ok())
    }

    async fn request(&self, method: &str, params: Value) -> Result<Value, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock();
            if p.len() >= MAX_PENDING {
                return Err(CallError::Unavailable("too many requests in flight".into()));
            }
            p.insert(id, tx);
        }
        // Whatever ends the wait (answer, timeout, or the caller dropping this future when its
        // client goes away), the id leaves the pending table.
        let _forget = Forget { shared: self, id };
        if !self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})) {
            return Err(CallError::Unavailable("process not accepting input".into()));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(answer)) => result_of(answer),
            Ok(Err(_)) => Err(CallError::Unavailable("process exited before answering".into())),
            Err(_) => Err(CallError::Timeout(self.timeout)),
        }
    }

    /// A line from stdout: an answer to a pending request, a server request (answered: `ping`
    /// works, anything else is refused since no client is attached), or a notification.
    fn dispatch(&self, line: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            tracing::debug!(server = %self.name, "stdio server wrote a non-JSON line");
            return;
        };
        let method = v.get("method").and_then(Value::as_str);
        match (v.get("id"), method) {
            (Some(id), None) => {
                if let Some(tx) = id.as_u64().and_then(|id| self.pending.lock().remove(&id)) {
                    let _ = tx.send(v);
                }
            }
            (Some(_), Some(_)) => {
                self.send(&super::http_server::server_request_reply(&v));
            }
            (None, Some(m)) => tracing::debug!(server = %self.name, method = m, "stdio server notification"),
            (None, None) => {}
        }
    }
}

/// Removes a request's id from the pending table when the request ends in any way.
struct Forget<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.id);
    }
}

/// Environment passed to the process: a few basics of tollgate's own plus the configured one.
fn command(cfg: &FederatedServer) -> Option<Command> {
    let (prog, args) = cfg.command.split_first()?;
    let mut c = Command::new(prog);
    c.args(args).env_clear();
    for k in ["PATH", "HOME", "LANG"] {
        if let Some(v) = std::env::var_os(k) {
            c.env(k, v);
        }
    }
    c.envs(&cfg.env);
    if let Some(d) = &cfg.cwd {
        c.current_dir(d);
    }
    // Its own process group: launchers (`npx`, `uvx`, shell wrappers) start the real server as
    // a grandchild, and the whole group is killed with it.
    c.process_group(0);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    Some(c)
}

async fn supervise(shared: Arc<Shared>, cfg: FederatedServer, mut stop: oneshot::Receiver<()>) {
    let mut backoff = cfg.min_backoff;
    let mut first = true;
    loop {
        if !first {
            shared.metrics.restarted(&shared.federation, &shared.name);
        }
        first = false;
        let started = Instant::now();
        let run = async {
            let Some(mut cmd) = command(&cfg) else { return };
            match cmd.spawn() {
                Ok(child) => run_process(&shared, child).await,
                Err(e) => {
                    tracing::warn!(server = %shared.name, program = %cfg.command[0], error = %e, "cannot start stdio MCP server")
                }
            }
        };
        tokio::select! {
            _ = run => {}
            _ = &mut stop => return,
        }
        shared.ready.send_replace(Ready::default());
        shared.metrics.set_up(&shared.federation, &shared.name, false);
        *shared.writer.lock() = None;
        shared.pending.lock().clear();
        if started.elapsed() >= STABLE_AFTER {
            backoff = cfg.min_backoff;
        }
        tracing::warn!(server = %shared.name, restart_in = ?backoff, "stdio MCP server exited");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => return,
        }
        backoff = (backoff * 2).min(cfg.max_backoff);
    }
}

/// Serve one process until it exits: pipes, the initialise handshake, readiness.
/// Kills a server's process group when its run ends in any way (exit, restart, shutdown).
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            if pid > 0 {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

async fn run_process(shared: &Arc<Shared>, mut child: Child) {
    let pid = child.id().unwrap_or(0);
    let _group = Group(pid);
    let (Some(mut stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return;
    };
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    *shared.writer.lock() = Some(tx);
    let writer = async move {
        while let Some(line) = rx.recv().await {
            if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                break;
            }
        }
    };
    let reader = {
        let shared = shared.clone();
        async move {
            let mut r = BufReader::new(stdout);
            let mut line = Vec::new();
            while read_line(&mut r, &mut line, shared.max_line).await {
                if !line.is_empty() {
                    shared.dispatch(&line);
                }
            }
        }
    };
    let name = shared.name.clone();
    let logger = async move {
        let mut r = BufReader::new(stderr);
        let mut line = Vec::new();
        while read_line(&mut r, &mut line, MAX_LOG_LINE).await {
            tracing::info!(target: "mcp_stdio", server = %name, "{}", String::from_utf8_lossy(&line));
        }
        // A server that closes its stderr is not done: keep serving it.
        std::future::pending::<()>().await
    };
    let init = async {
        let params = json!({
            "protocolVersion": SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1],
            "capabilities": {},
            "clientInfo": {"name": "tollgate-federation", "version": env!("CARGO_PKG_VERSION")},
        });
        match shared.request("initialize", params).await {
            Ok(r) => {
                shared.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
                let info = InitInfo::from_result(&r);
                tracing::info!(server = %shared.name, pid, upstream = %info.server, "stdio MCP server ready");
                shared.metrics.set_up(&shared.federation, &shared.name, true);
                shared.ready.send_replace(Ready { info: Some(info) });
            }
            Err(e) => {
                // A server that cannot initialise is useless: end it, the supervisor restarts
                // it with backoff.
                tracing::warn!(server = %shared.name, pid, error = %e, "stdio MCP server did not initialise; restarting it");
                return;
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = child.wait() => {}
        // stdout closed or stdin broken: the process cannot serve any more.
        _ = reader => {}
        _ = writer => {}
        _ = init => {}
        _ = logger => {}
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Read one `\n`-terminated line into `buf` (without the terminator), keeping at most `max`
/// bytes of it (a longer line is cut: it will not parse and is dropped). False at EOF.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> bool {
    buf.clear();
    let mut any = false;
    loop {
        let chunk = match r.fill_buf().await {
            Ok([]) => return any,
            Ok(c) => c,
            Err(_) => return false,
        };
        any = true;
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        r.consume(if done { take + 1 } else { take });
        if done {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PIDs whose argv (NUL-separated) satisfies `want`.
    fn pids(want: impl Fn(&[&str]) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmd);
            let argv: Vec<&str> = text.split('\0').filter(|a| !a.is_empty()).collect();
            if want(&argv) {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out
    }

    /// A minimal stdio server in sh that starts a grandchild: initialised, restarted after a
    /// crash, and its whole process group killed when the server is dropped.
    #[tokio::test]
    async fn supervised_initialised_restarted_and_killed_with_its_group() {
        let marker = format!("{}", 400_000 + u32::from(rand::random::<u16>()));
        let answer = r#"{"jsonrpc":"2.0","id":ID,"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"sh","version":"1"}}}"#;
        // Answers the first request (tollgate's initialize, whatever its id) and ignores the rest.
        let script = format!(
            "sleep {marker} & read l; id=$(echo \"$l\" | sed 's/.*\"id\":\\([0-9]*\\).*/\\1/'); echo '{}' | sed \"s/ID/$id/\"; while read l; do :; done",
            answer
        );
        let cfg: FederatedServer = serde_yaml_ng::from_str(&format!(
            "{{name: sh, command: [sh, -c, {script:?}], min_backoff: 50ms, max_backoff: 100ms}}"
        ))
        .expect("config");
        let metrics = Arc::new(FederationMetrics::register(&prometheus::Registry::new()).expect("metrics"));
        let s = StdioServer::start(Arc::from("f"), &cfg, Duration::from_secs(5), 1 << 16, metrics);
        let info = s.wait_ready().await.expect("initialised");
        assert_eq!(info.server, "sh/1");
        assert!(info.has("tools"));
        let sleeps = || pids(|a| a == ["sleep", marker.as_str()]);
        // The grandchild's exec may trail the answer a little.
        let m = marker.as_str();
        let settle = |want: usize| async move {
            for _ in 0..40 {
                if pids(|a| a == ["sleep", m]).len() == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        };
        assert!(settle(1).await, "grandchild running: {:?}", sleeps());
        // The server crashes: the supervisor restarts and initialises it again.
        for p in pids(|a| a.first() == Some(&"sh") && a.iter().any(|x| x.contains(marker.as_str()))) {
            let _ = std::process::Command::new("kill").args(["-9", &p]).status();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(s.wait_ready().await.is_ok(), "back after the crash");
        assert!(settle(1).await, "the crashed run's group is gone, the new one runs: {:?}", sleeps());
        drop(s);
        assert!(settle(0).await, "the server's process group was killed with it: {:?}", sleeps());
    }

    #[tokio::test]
    async fn lines_are_split_and_bounded() {
        let data: &[u8] = b"{\"a\":1}\r\nxxxxxxxxxx\nlast";
        let mut r = BufReader::with_capacity(3, data);
        let mut buf = Vec::new();
        assert!(read_line(&mut r, &mut buf, 100).await);
        assert_eq!(buf, b"{\"a\":1}");
        assert!(read_line(&mut r, &mut buf, 4).await);
        assert_eq!(buf, b"xxxx");
        assert!(read_line(&mut r, &mut buf, 100).await);
        assert_eq!(buf, b"last");
        assert!(!read_line(&mut r, &mut buf, 100).await);
    }
}
