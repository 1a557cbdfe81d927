//! Live config: the config file (a ConfigMap mount in Kubernetes) is watched; a valid new
//! version is applied without dropping a connection, an invalid one is refused with its
//! `file:line:col` error and a metric while the last good config stays in force.
//!
//! Applying builds the new proxy generation first (providers, key files, upstream client: what
//! most often fails), then updates the kernel's scope and rules in place, then switches to the
//! new generation: new connections take all of it, and the next request on every accepted
//! connection is judged by its policies (routes and the kernel decision stay per connection).
//! Settings bound to sockets, mounts or sinks (listeners, cgroup root, CA, telemetry,
//! Kubernetes) keep their running values until a restart; the reload says which and sets
//! `tollgate_config_restart_required`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::capture::kubernetes::PodStore;
use crate::capture::{AgentResolver, Capture};
use crate::config::{self, Config};
use crate::connection::ProxyHandle;
use crate::telemetry::Telemetry;

/// Why a reload was refused; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not parse or validate (message carries `file:line:col`).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Providers, keys or the upstream client could not be built.
    #[error("proxy: {0}")]
    Proxy(#[from] crate::connection::ProxyError),
    /// Capture scope or rules could not be applied.
    #[error("capture: {0}")]
    Capture(#[from] crate::capture::CaptureError),
    /// The file watcher could not be set up.
    #[error("watching {path}: {source}")]
    Watch {
        /// Directory watched.
        path: String,
        /// notify's reason.
        source: notify::Error,
    },
}

/// Command-line overrides that outlive any config file version.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--pod-ipv4`.
    pub pod_ipv4: Option<Ipv4Addr>,
}

impl Overrides {
    /// Apply to a freshly loaded config.
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(ip) = self.pod_ipv4 {
            cfg.listen.pod_ipv4 = Some(ip);
        }
    }
}

/// Settings a running tollgate cannot change, by config path, that differ between `old` and
/// `new`.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let eq = |a: &dyn erased::Ser, b: &dyn erased::Ser| a.json() == b.json();
    let (oc, nc) = (&old.capture, &new.capture);
    let listeners = |c: &Config| {
        c.routes.iter().map(|r| (r.name.clone(), r.listener)).filter(|(_, l)| l.is_some()).collect::<Vec<_>>()
    };
    let checks: [(&'static str, bool); 15] = [
        ("listen", eq(&old.listen, &new.listen)),
        ("admin", eq(&old.admin, &new.admin)),
        ("capture.enabled", oc.enabled == nc.enabled),
        ("capture.cgroup_root", oc.cgroup_root == nc.cgroup_root),
        ("capture.fail_closed", oc.fail_closed == nc.fail_closed),
        ("capture.bpffs_dir", oc.bpffs_dir == nc.bpffs_dir),
        ("capture.max_records", oc.max_records == nc.max_records),
        (
            "capture.max_rules/max_scope_cgroups",
            oc.max_rules == nc.max_rules && oc.max_scope_cgroups == nc.max_scope_cgroups,
        ),
        ("capture.self_mark", oc.self_mark == nc.self_mark),
        (
            "tls.ca_dir/leaf_validity",
            old.tls.ca_dir == new.tls.ca_dir && old.tls.leaf_validity == new.tls.leaf_validity,
        ),
        ("telemetry", eq(&old.telemetry, &new.telemetry)),
        ("pricing", eq(&old.pricing, &new.pricing)),
        ("kubernetes", old.kubernetes == new.kubernetes),
        (
            "limits.max_connections/cert_cache_size",
            old.limits.max_connections == new.limits.max_connections
                && old.limits.cert_cache_size == new.limits.cert_cache_size,
        ),
        ("routes[].listener", listeners(old) == listeners(new)),
    ];
    checks.into_iter().filter(|(_, same)| !same).map(|(name, _)| name).collect()
}

/// `new` with every restart-only setting taken from the running `old`: what actually runs
/// after a reload.
pub fn effective(old: &Config, mut new: Config) -> Config {
    new.listen = old.listen.clone();
    new.admin = old.admin.clone();
    let (oc, nc) = (&old.capture, &mut new.capture);
    nc.enabled = oc.enabled;
    nc.cgroup_root = oc.cgroup_root.clone();
    nc.fail_closed = oc.fail_closed;
    nc.bpffs_dir = oc.bpffs_dir.clone();
    nc.max_records = oc.max_records;
    nc.max_rules = oc.max_rules;
    nc.max_scope_cgroups = oc.max_scope_cgroups;
    nc.self_mark = oc.self_mark;
    new.tls.ca_dir = old.tls.ca_dir.clone();
    new.tls.leaf_validity = old.tls.leaf_validity;
    new.telemetry = old.telemetry.clone();
    new.pricing = old.pricing.clone();
    new.kubernetes = old.kubernetes.clone();
    new.limits.max_connections = old.limits.max_connections;
    new.limits.cert_cache_size = old.limits.cert_cache_size;
    new
}

/// Comparison through serde for config sections that do not implement `PartialEq`.
mod erased {
    /// A serializable section.
    pub trait Ser {
        fn json(&self) -> Option<serde_json::Value>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> Option<serde_json::Value> {
            serde_json::to_value(self).ok()
        }
    }
}

/// Everything a reload touches.
pub struct Reloader {
    /// The config file.
    pub path: PathBuf,
    /// The running config (as effective).
    pub current: Arc<Config>,
    /// CLI overrides.
    pub overrides: Overrides,
    /// Proxy generations.
    pub proxy: ProxyHandle,
    /// Kernel capture, when attached.
    pub capture: Option<Arc<Capture>>,
    /// cgroup2 root for identity lookups.
    pub cgroup_root: Option<PathBuf>,
    /// Pod store, when Kubernetes is on.
    pub pods: Option<Arc<PodStore>>,
    /// Reload metrics.
    pub telemetry: Arc<Telemetry>,
    /// The config the uprobe observation task reads (routes by `Host`), when it runs.
    pub observed: Option<Arc<arc_swap::ArcSwap<Config>>>,
}

/// How long a config file's content must stay the same before a watch or poll reload reads it
/// as final.
const SETTLE: Duration = Duration::from_millis(200);
/// Most settle rounds before the content read last is taken anyway (a file rewritten without
/// pause for this long is not going to settle).
const MAX_SETTLE_ROUNDS: u32 = 25;

/// The file's content once two reads `settle` apart agree: a poll tick or watch event can land
/// between a writer's truncate and its write, and the half-written file must not be applied.
async fn settled_read(path: &Path, settle: Duration) -> Option<Vec<u8>> {
    let mut text = std::fs::read(path).ok();
    for _ in 0..MAX_SETTLE_ROUNDS {
        tokio::time::sleep(settle).await;
        let again = std::fs::read(path).ok();
        if again == text {
            break;
        }
        text = again;
    }
    text
}

/// A config file with nothing but whitespace: as YAML it means "all defaults", which a reload
/// reads only between a writer's truncate and its write.
fn is_blank(text: Option<&[u8]>) -> bool {
    text.is_some_and(|t| t.trim_ascii().is_empty())
}

impl Reloader {
    /// Load the file and apply it. Returns the restart-only settings that changed (they keep
    /// their running values).
    pub async fn reload(&mut self) -> Result<Vec<&'static str>, ReloadError> {
        let mut next = config::from_path(&self.path)?;
        self.overrides.apply(&mut next);
        let pending = restart_only_changes(&self.current, &next);
        let next = Arc::new(effective(&self.current, next));
        let agents = Arc::new(AgentResolver::new(&next.agents, self.cgroup_root.clone()).with_pods(self.pods.clone()));
        let prepared = self.proxy.prepare(next.clone(), agents).await?;
        if let Some(c) = &self.capture {
            c.apply_config(&next).await?;
        }
        self.proxy.commit(prepared);
        if let Some(o) = &self.observed {
            o.store(next.clone());
        }
        self.current = next;
        Ok(pending)
    }

    /// Reload whenever the file's directory changes (ConfigMap updates swap a symlink there),
    /// on SIGHUP, and every `poll` as a safety net; only changed file contents count. Runs
    /// until `shutdown`.
    pub fn spawn(
        mut self,
        poll: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>, ReloadError> {
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                let _ = tx.try_send(());
            }
        })
        .map_err(|source| ReloadError::Watch { path: dir.display().to_string(), source })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| ReloadError::Watch { path: dir.display().to_string(), source })?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut last = std::fs::read(&self.path).ok();
        Ok(tokio::spawn(async move {
            let _watcher = watcher;
            let mut tick = tokio::time::interval(poll.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let forced = tokio::select! {
                    _ = crate::connection::shutdown_requested(&mut shutdown) => return,
                    Some(()) = rx.recv() => {
                        // Editors and the kubelet write in several steps: let them settle.
                        tokio::time::sleep(SETTLE).await;
                        while rx.try_recv().is_ok() {}
                        false
                    }
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                let text = if forced { std::fs::read(&self.path).ok() } else { settled_read(&self.path, SETTLE).await };
                if !forced && text == last {
                    continue;
                }
                let empty = is_blank(text.as_deref());
                last = text;
                if empty {
                    // A file truncated for rewriting reads empty until the write lands; as a
                    // config it would mean "all defaults" (no capture rules, no policies).
                    tracing::warn!(config = %self.path.display(), "config file is empty (a write in progress?): keeping the running config until it has content");
                    continue;
                }
                self.apply_logged().await;
            }
        }))
    }

    async fn apply_logged(&mut self) {
        match self.reload().await {
            Ok(pending) => {
                self.telemetry.node.reload(true);
                self.telemetry.node.set_restart_required(!pending.is_empty());
                if pending.is_empty() {
                    tracing::info!(config = %self.path.display(), "config reloaded");
                } else {
                    tracing::warn!(config = %self.path.display(), restart_required = ?pending, "config reloaded; these settings keep their running values until a restart");
                }
            }
            Err(e) => {
                self.telemetry.node.reload(false);
                tracing::error!(config = %self.path.display(), error = %e, "config reload refused; keeping the running config");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        config::from_str("t.yaml", yaml).unwrap()
    }

    #[test]
    fn restart_only_settings_are_named_and_kept() {
        let old = cfg("listen: {port: 15001}\ncapture: {ports: [80], cgroup_root: /a}\ntelemetry: {access_log: off}\n");
        let new =
            cfg("listen: {port: 16001}\ncapture: {ports: [81], cgroup_root: /b}\ntelemetry: {access_log: stdout}\n");
        assert_eq!(restart_only_changes(&old, &new), vec!["listen", "capture.cgroup_root", "telemetry"]);
        let eff = effective(&old, new);
        assert_eq!(eff.listen.port, 15001);
        assert_eq!(eff.capture.cgroup_root.as_deref(), Some(Path::new("/a")));
        assert_eq!(eff.capture.ports, vec![81], "rules are reloadable");
        assert_eq!(eff.telemetry.access_log, "off");
        assert!(restart_only_changes(&old, &effective(&old, old.clone())).is_empty());
    }

    #[tokio::test]
    async fn a_file_being_rewritten_is_read_once_its_content_settles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.yaml");
        std::fs::write(&path, "").unwrap();
        let p = path.clone();
        // A writer that truncated the file and writes the content 50 ms later.
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::write(&p, "capture: {ports: [80]}\n").unwrap();
        });
        let text = settled_read(&path, Duration::from_millis(100)).await;
        writer.await.unwrap();
        assert_eq!(text.as_deref(), Some(&b"capture: {ports: [80]}\n"[..]), "read before the write landed");
    }

    #[tokio::test]
    async fn a_stable_file_is_read_after_one_settle_round() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.yaml");
        std::fs::write(&path, "listen: {port: 15001}\n").unwrap();
        let t0 = std::time::Instant::now();
        let text = settled_read(&path, Duration::from_millis(50)).await;
        assert_eq!(text.as_deref(), Some(&b"listen: {port: 15001}\n"[..]));
        assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
        assert_eq!(settled_read(&dir.path().join("missing.yaml"), Duration::from_millis(10)).await, None);
    }

    #[test]
    fn a_blank_file_is_not_a_config_to_reload() {
        assert!(is_blank(Some(b"")));
        assert!(is_blank(Some(b" \n\t\n")));
        assert!(!is_blank(Some(b"{}\n")), "an explicit empty mapping still means defaults");
        assert!(!is_blank(None), "an unreadable file fails the reload with its own error");
    }

    #[test]
    fn overrides_survive_reloads() {
        let mut c = cfg("listen: {pod_ipv4: 10.0.0.1}\n");
        Overrides { pod_ipv4: Some(Ipv4Addr::new(192, 168, 1, 7)) }.apply(&mut c);
        assert_eq!(c.listen.pod_ipv4, Some(Ipv4Addr::new(192, 168, 1, 7)));
    }
}
