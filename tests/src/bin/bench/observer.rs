//! The tollgate that observes `tollgate-observe`'s HTTPS calls through its TLS uprobes, started
//! only for that target's runs and stopped right after.
//!
//! Why not one tollgate for the whole bench: the uprobes sit on the *file* (the shared
//! `libssl.so.3`), so while any tollgate has them attached every OpenSSL process on the machine
//! traps into them, captured or not. `direct-tls`, the reference, must run without them or the
//! figure would hide the probes' cost (measured: about half of wrk's HTTPS throughput). The main
//! tollgate therefore runs with `capture.uprobes.enabled: false`, and this one exists only while
//! `tollgate-observe` is measured.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::wait_for;

/// Starts and stops the observing tollgate; its pid for CPU accounting while it runs.
pub(crate) struct Observer<'a> {
    bin: PathBuf,
    /// Full config; a fresh scratch dir per start.
    cfg: Box<dyn Fn(&Path) -> Value + 'a>,
    cur: Mutex<Option<Tollgate>>,
    /// Pid of the running instance (0: none), read by the target's `proxy_pids`.
    pub(crate) pid: Arc<AtomicU32>,
}

impl<'a> Observer<'a> {
    /// An observer that starts `bin` with the config `cfg` builds for a scratch dir.
    pub(crate) fn new(bin: &Path, cfg: Box<dyn Fn(&Path) -> Value + 'a>) -> Self {
        Observer { bin: bin.to_path_buf(), cfg, cur: Mutex::new(None), pid: Arc::new(AtomicU32::new(0)) }
    }

    /// Starts it and waits until its uprobes are attached (at least one library file probed).
    pub(crate) fn start(&self) -> Result<()> {
        self.stop();
        let dir = Tollgate::scratch()?;
        let cfg = (self.cfg)(dir.path());
        let t = Tollgate::start(&self.bin, dir, cfg, None)?;
        let up = wait_for(Duration::from_secs(15), Duration::from_millis(50), || {
            let m = t.metrics().ok()?;
            (m.sum("tollgate_uprobe_available", &[]) == 1.0 && m.sum("tollgate_uprobe_attached_files", &[]) >= 1.0)
                .then_some(())
        });
        if up.is_none() {
            bail!("the observing tollgate's TLS uprobes were not attached:\n{}", t.stderr_tail(20));
        }
        self.pid.store(t.pid().ok_or_else(|| anyhow!("observing tollgate not running"))?, Ordering::Relaxed);
        *self.cur.lock().expect("lock") = Some(t);
        Ok(())
    }

    /// Stops it (its probes go with it).
    pub(crate) fn stop(&self) {
        self.pid.store(0, Ordering::Relaxed);
        drop(self.cur.lock().expect("lock").take());
    }

    /// A sum over the running instance's metrics (0 when none runs).
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        match self.cur.lock().expect("lock").as_ref() {
            Some(t) => Ok(t.metrics()?.sum(name, labels)),
            None => Ok(0.0),
        }
    }
}
