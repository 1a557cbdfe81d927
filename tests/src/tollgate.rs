//! Runs the real tollgate binary: writes its YAML config, starts `tollgate run --config`, waits
//! for `/readyz`, collects stdout (JSON access-log lines) and stderr, and stops it on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::cgroup::{command_with_procs, Cgroup2, Group};
use crate::prom::Scrape;

/// Path of the tollgate binary: `$TOLLGATE_BIN`, else next to this crate's binaries (same
/// target dir and profile), else `target/debug/tollgate`.
pub fn tollgate_bin(sibling_of: Option<&str>) -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_BIN") {
        return PathBuf::from(p);
    }
    if let Some(s) = sibling_of {
        if let Some(dir) = Path::new(s).parent() {
            return dir.join("tollgate");
        }
    }
    crate::repo_root().join("target/debug/tollgate")
}

/// Make sure a bpffs is mounted at `/sys/fs/bpf`, as systemd does on a real node.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| {
        let f: Vec<_> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    }) {
        return Ok(());
    }
    crate::sh("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).map(|_| ())
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A config with test-private ports, cgroup root, bpffs dir and CA dir; scenarios
/// [`crate::merge`] their own capture rules, routes and agents into it.
pub fn base_config(cg: &Cgroup2, dir: &Path) -> Value {
    json!({
        "listen": {"port": crate::free_port("127.0.0.1"), "ipv4": "127.0.0.1", "ipv6": "::1"},
        "admin": {"listen": format!("127.0.0.1:{}", crate::free_port("127.0.0.1"))},
        "capture": {
            "cgroup_root": cg.root(),
            "bpffs_dir": format!("/sys/fs/bpf/{}-{}", crate::run_tag(), unique()),
        },
        "tls": {"ca_dir": dir.join("ca")},
        "telemetry": {"access_log": "stdout"},
    })
}

/// A tollgate process.
pub struct Tollgate {
    bin: PathBuf,
    child: Option<Child>,
    /// Scratch dir: config, logs, CA.
    pub dir: tempfile::TempDir,
    /// The YAML file passed with `--config`.
    pub config_path: PathBuf,
    /// The config as JSON.
    pub config: Value,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Proxy port.
    pub proxy_port: u16,
    group_procs: Option<PathBuf>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr_path: PathBuf,
    starts: u32,
}

impl Tollgate {
    /// A scratch dir for [`base_config`] and [`Tollgate::start`].
    pub fn scratch() -> Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new().prefix(&format!("{}-tollgate-", crate::run_tag())).tempdir()?)
    }

    /// Write `config` into `dir`, start tollgate (inside `group` when given) and wait for
    /// `/readyz`.
    pub fn start(bin: &Path, dir: tempfile::TempDir, config: Value, group: Option<&Group>) -> Result<Self> {
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, serde_yaml_ng::to_string(&config)?)?;
        let admin: SocketAddr =
            config["admin"]["listen"].as_str().ok_or_else(|| anyhow!("config without admin.listen"))?.parse()?;
        let proxy_port = config["listen"]["port"].as_u64().unwrap_or(15001) as u16;
        let stderr_path = dir.path().join("stderr.log");
        let mut t = Tollgate {
            bin: bin.to_path_buf(),
            child: None,
            dir,
            config_path,
            config,
            admin,
            proxy_port,
            group_procs: group.map(|g| g.dir().join("cgroup.procs")),
            stdout: Arc::new(Mutex::new(Vec::new())),
            stderr_path,
            starts: 0,
        };
        t.spawn()?;
        t.wait_ready(Duration::from_secs(30))?;
        Ok(t)
    }

    fn spawn(&mut self) -> Result<()> {
        if !self.bin.exists() {
            bail!("{} does not exist: build it first (cargo xtask build)", self.bin.display());
        }
        self.starts += 1;
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&self.stderr_path)?;
        writeln!(&stderr, "===== tollgate start #{} =====", self.starts)?;
        let mut cmd = command_with_procs(self.group_procs.as_deref(), None, &self.bin.to_string_lossy());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd.spawn().with_context(|| format!("spawn {}", self.bin.display()))?;
        let out = child.stdout.take().expect("stdout");
        let lines = self.stdout.clone();
        let log_path = self.dir.path().join("stdout.log");
        std::thread::spawn(move || {
            let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).ok();
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "{l}");
                }
                lines.lock().expect("lock").push(l);
            }
        });
        self.child = Some(child);
        Ok(())
    }

    /// Start again with the same config (after [`Tollgate::kill9`] or [`Tollgate::terminate`]),
    /// in the same cgroup as before, and wait for `/readyz`.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("tollgate is still running");
        }
        self.spawn()?;
        self.wait_ready(Duration::from_secs(30))
    }

    /// Poll `/readyz` until 200; fails early (with stderr) if the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("tollgate exited during startup ({st}); stderr:\n{}", self.stderr_tail(60));
            }
            match crate::http_get(self.admin, "/readyz", Duration::from_secs(2)) {
                Ok((200, _)) => return Ok(()),
                Ok((s, b)) => last = format!("HTTP {s}: {}", b.trim()),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                bail!("tollgate not ready after {timeout:?} (last /readyz: {last}); stderr:\n{}", self.stderr_tail(60));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Scrape `/metrics`.
    pub fn metrics(&self) -> Result<Scrape> {
        let (st, body) = crate::http_get(self.admin, "/metrics", Duration::from_secs(5))?;
        if st != 200 {
            bail!("/metrics: HTTP {st}");
        }
        Scrape::parse(&body)
    }

    /// Raw stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("lock").clone()
    }

    /// Stdout lines that are JSON objects (access-log records).
    pub fn access_log(&self) -> Vec<Value> {
        self.stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// Last `n` lines of stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> Result<()> {
        let mut c = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("tollgate did not exit within 10 s of SIGTERM; killing");
        let _ = c.kill();
        c.wait().ok()
    }

    /// `capture.bpffs_dir` of this instance.
    pub fn bpffs_dir(&self) -> Option<PathBuf> {
        self.config["capture"]["bpffs_dir"].as_str().map(PathBuf::from)
    }

    /// Remove anything tollgate pinned (its bpffs dir).
    pub fn remove_pins(&self) {
        if let Some(d) = self.bpffs_dir() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        self.terminate();
        self.remove_pins();
        if std::env::var_os("TOLLGATE_E2E_KEEP").is_some() {
            let p = std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("tempdir")).keep();
            eprintln!("kept tollgate scratch dir {}", p.display());
        }
    }
}

/// `tollgate ca --config FILE`: `(path of the CA certificate, PEM)`.
pub fn ca(bin: &Path, config: &Path) -> Result<(PathBuf, String)> {
    let out = Command::new(bin).arg("ca").arg("--config").arg(config).output()?;
    if !out.status.success() {
        bail!("tollgate ca: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let (first, pem) = text.split_once('\n').ok_or_else(|| anyhow!("tollgate ca printed {text:?}"))?;
    let path = PathBuf::from(first.trim());
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        bail!("tollgate ca printed no PEM after the path: {text:?}");
    }
    Ok((path, pem.to_string()))
}

/// `tollgate check FILE`: `(exit code, stdout, stderr)`.
pub fn check(bin: &Path, file: &Path) -> Result<(i32, String, String)> {
    let out = Command::new(bin).arg("check").arg(file).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
