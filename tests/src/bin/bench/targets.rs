//! The proxies under test and how each is reached: the `Target` description every measurement
//! uses, and the nginx and LiteLLM processes the bench starts (and stops on drop) next to the
//! mock and tollgate.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::{free_port, wait_for};

use crate::{Args, LITELLM_KEY, MODEL, UPSTREAM_KEY};

/// Which path a target's requests take, so validity checks know which tollgate route (if any)
/// must have counted them and which failures are only reported (LiteLLM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Direct,
    Capture,
    Gateway,
    /// The gateway route of the second tollgate, under a Redis-backed token limit.
    GatewayRedis,
    Nginx,
    Litellm,
    /// HTTPS straight to the mock through OpenSSL, outside tollgate's scope: the reference of
    /// `Observe`.
    DirectTls,
    /// The same HTTPS calls from the captured cgroup: spliced by tollgate and observed through
    /// the TLS uprobes (every call must be counted with `capture="uprobe"`).
    Observe,
}

/// One target as every phase sees it: where to send, from which cgroup, with which headers, and
/// whose CPU time is the proxy's.
pub(crate) struct Target<'a> {
    pub(crate) kind: Kind,
    pub(crate) name: &'static str,
    pub(crate) url: String,
    pub(crate) group: Option<&'a Group>,
    pub(crate) headers: Vec<String>,
    pub(crate) lua: PathBuf,
    /// CA the client trusts for an `https://` URL (the mock's own; never tollgate's).
    pub(crate) ca: Option<PathBuf>,
    /// Processes whose CPU time is the proxy's (empty for direct).
    pub(crate) proxy_pids: Box<dyn Fn() -> Vec<u32> + 'a>,
}

/// The LiteLLM proxy, in its own process group (killed with all its workers on drop).
pub(crate) struct LiteLlm {
    pub(crate) child: Child,
    pub(crate) port: u16,
    pub(crate) log: PathBuf,
}

impl LiteLlm {
    /// Starts the LiteLLM proxy with one deployment on the mock (not waiting for it to be ready).
    pub(crate) fn spawn(bin: &Path, dir: &Path, mock: SocketAddr, a: &Args) -> Result<Self> {
        let p = dir.join("litellm");
        std::fs::create_dir_all(&p)?;
        let port = free_port("127.0.0.1");
        // One OpenAI-compatible deployment on the mock; no database, no callbacks, no retries,
        // no message logging; the master key only because LiteLLM refuses to start without one.
        let conf = json!({
            "model_list": [{
                "model_name": MODEL,
                "litellm_params": {
                    "model": format!("openai/{MODEL}"),
                    "api_base": format!("http://{mock}/v1"),
                    "api_key": UPSTREAM_KEY,
                },
            }],
            "litellm_settings": {
                "telemetry": false,
                "set_verbose": false,
                "turn_off_message_logging": true,
                "drop_params": true,
                "num_retries": 0,
                "request_timeout": 30,
                "callbacks": [],
                "success_callback": [],
                "failure_callback": [],
            },
            "general_settings": {
                "master_key": LITELLM_KEY,
                "disable_spend_logs": true,
                "disable_error_logs": true,
            },
        });
        let conf_path = p.join("config.yaml");
        std::fs::write(&conf_path, serde_yaml_ng::to_string(&conf)?)?;
        let log = p.join("litellm.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&conf_path)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--num_workers", &a.litellm_workers.to_string()]);
        match a.litellm_server.as_str() {
            "uvicorn" => {}
            "gunicorn" => {
                cmd.arg("--run_gunicorn");
            }
            "granian" => {
                cmd.arg("--run_granian");
            }
            other => bail!("unknown --litellm-server {other:?} (uvicorn, gunicorn, granian)"),
        }
        // Offline and quiet: the bundled model cost map instead of a download, errors-only
        // logging (this also turns off uvicorn's access log), no .env files, no database.
        cmd.env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_LOG", "ERROR")
            .env("LITELLM_MODE", "PRODUCTION")
            .env_remove("DATABASE_URL")
            .env_remove("LITELLM_MASTER_KEY")
            .current_dir(&p)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().with_context(|| format!("spawn {}", bin.display()))?;
        Ok(LiteLlm { child, port, log })
    }

    /// Poll `/health/readiness`, then make one real completion through it.
    pub(crate) fn wait_ready(&mut self, timeout: Duration, body: &[u8]) -> Result<()> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse()?;
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("litellm exited during startup ({st}); log tail:\n{}", self.log_tail(40));
            }
            if let Ok((200, _)) = tollgate_e2e::http_get(addr, "/health/readiness", Duration::from_secs(5)) {
                break;
            }
            if Instant::now() >= deadline {
                bail!("no 200 from /health/readiness after {timeout:?}; log tail:\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("bench: LiteLLM ready after {:.1} s", t0.elapsed().as_secs_f64());
        // Every worker imports lazily on its first requests: warm each of them up.
        for _ in 0..20 {
            let (st, text) = post(addr, "/v1/chat/completions", LITELLM_KEY, body)?;
            if st != 200 || !text.contains("\"choices\"") {
                bail!("completion through LiteLLM: HTTP {st}: {}", text.chars().take(500).collect::<String>());
            }
        }
        Ok(())
    }

    /// The last `n` lines of LiteLLM's log, for startup errors.
    fn log_tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// LiteLLM's version and settings, printed so a result says exactly what was measured.
    pub(crate) fn describe(&self, a: &Args) -> String {
        format!(
            "{} (server {}, {} workers, master key set, no DB, no callbacks, LITELLM_LOG=ERROR, local cost map)",
            version_of_litellm(a).unwrap_or_else(|| "version unknown".into()),
            a.litellm_server,
            a.litellm_workers
        )
    }
}

/// The installed LiteLLM version, asked from the bench venv's python next to `litellm`.
fn version_of_litellm(a: &Args) -> Option<String> {
    let py = a.litellm.as_ref()?.parent()?.join("python");
    let out = Command::new(py)
        .args(["-c", "import importlib.metadata as m; print('litellm ' + m.version('litellm'))"])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Drop for LiteLlm {
    fn drop(&mut self) {
        let pg = self.child.id() as i32;
        // SAFETY: kill(2) on the process group we created for our own child.
        unsafe { libc::kill(-pg, libc::SIGTERM) };
        for _ in 0..150 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; whatever of the group is left (workers) goes too.
        unsafe { libc::kill(-pg, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Minimal blocking HTTP/1.1 POST with a JSON body: `(status, body)`.
fn post(addr: SocketAddr, path: &str, key: &str, body: &[u8]) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header: {text:?}"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, rest.to_string()))
}

/// nginx as a reverse proxy in front of the mock, the baseline for "a plain proxy" (graceful stop
/// on drop).
pub(crate) struct Nginx {
    pub(crate) child: Child,
}

impl Nginx {
    /// Starts nginx on 127.0.0.1:`port` proxying to `upstream` and waits until it listens.
    pub(crate) fn start(dir: &Path, port: u16, upstream: SocketAddr) -> Result<Self> {
        let p = dir.join("nginx");
        for sub in ["", "logs", "tmp"] {
            std::fs::create_dir_all(p.join(sub))?;
        }
        // `proxy_buffering off`: streamed events go to the client as they arrive.
        let conf = format!(
            r#"worker_processes auto;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {p}/logs/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    upstream mock {{
        server {upstream};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#,
            p = p.display()
        );
        let conf_path = p.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(&p)
            .arg("-e")
            .arg(p.join("logs/error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn nginx")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        if wait_for(Duration::from_secs(10), Duration::from_millis(50), || TcpStream::connect(addr).ok()).is_none() {
            let _ = child.kill();
            let err = child
                .stderr
                .take()
                .map(|e| BufReader::new(e).lines().map_while(Result::ok).collect::<Vec<_>>().join("\n"));
            bail!("nginx did not listen on {addr}: {err:?}");
        }
        Ok(Nginx { child })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; SIGQUIT is nginx's graceful stop.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
