//! Kernel capture: loads the eBPF programs, keeps their maps in sync with config, and answers
//! "who made this connection and where was it going?" for the proxy.
//!
//! Submodules: [`cgroup`] (cgroup2/bpffs mounts, scope ids), [`loader`] (object, programs,
//! links), [`maps`] (typed map handles), [`rules`] (ports, CIDRs, resolved hostnames),
//! [`identity`] (record → agent).

pub mod cgroup;
pub mod heartbeat;
pub mod identity;
pub mod kubernetes;
pub mod loader;
pub mod maps;
pub mod rules;
pub mod scope;
pub mod uprobe;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use gateway_common::COUNTER_SLOTS;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::task::JoinHandle;

pub use gateway_common::CaptureRecord;
pub use identity::{Agent, AgentResolver};

use self::cgroup::CgroupError;
use self::loader::{LoaderError, Pinned};
use self::maps::{Maps, MapsError};
use self::rules::{RuleSync, RulesError};
use self::scope::{ScopeEntry, ScopeOwner};

/// Where the proxy finds the kernel's record of an accepted connection. A trait so the proxy can
/// be exercised without BPF (unit tests) while production uses the eBPF map.
pub trait FlowTable: Send + Sync + 'static {
    /// Remove and return the record for the connection whose agent side is `peer` and whose
    /// proxy side is `local` (as seen by `accept`). `None`: not a captured connection.
    fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<CaptureRecord>;
}

/// Why capture could not start (or a map could not be read); the message names the path,
/// program or map involved.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// `capture.enabled` is false; the caller should not start capture.
    #[error("capture is disabled in config (capture.enabled: false)")]
    Disabled,
    /// Mounting or resolving cgroup2 / bpffs / scope failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Loading, attaching or pinning failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// A map could not be found, typed, read or written.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The static capture rules do not fit the maps.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// Scope entries did not fit the scope map.
    #[error("{failed} capture.scope entries could not be stored (capture.max_scope_cgroups = {max})")]
    ScopeFull {
        /// Entries not stored.
        failed: usize,
        /// Map capacity.
        max: u32,
    },
}

/// The running kernel capture: programs attached to the cgroup root, maps filled, hostname
/// refresher and kernel-log drain running. Dropping it detaches fail-open programs; call
/// [`Capture::shutdown`] to also remove fail-closed pins.
pub struct Capture {
    cgroup_root: PathBuf,
    maps: Maps,
    netns_cookie: u64,
    /// What `TG_CONFIG` holds, to rewrite it only when a reload changes it.
    runtime: parking_lot::Mutex<gateway_common::RuntimeConfig>,
    /// New capture rules for the refresher task that owns the rule maps.
    rules_tx: tokio::sync::mpsc::Sender<crate::config::CaptureConfig>,
    /// Owns the programs (and, in fail-open mode, their links). `None` after shutdown. Behind
    /// a mutex so shutdown works through the `Arc` the proxy and metrics share.
    ebpf: parking_lot::Mutex<Option<Ebpf>>,
    /// Fail-closed links pinned in bpffs.
    pinned: parking_lot::Mutex<Pinned>,
    tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl Capture {
    /// Mount what is missing, load, fill maps, attach. Spawns the hostname refresher and
    /// the aya-log drain task (into `tracing`). Needs a tokio runtime.
    ///
    /// Call it once the proxy listeners are bound: the heartbeat is stamped here, so captured
    /// connects are redirected from this point on.
    pub async fn start(cfg: &crate::config::Config) -> Result<Capture, CaptureError> {
        let c = &cfg.capture;
        if !c.enabled {
            return Err(CaptureError::Disabled);
        }
        let cgroup_root = cgroup::ensure_cgroup_root(c.cgroup_root.as_deref())?;
        // Resolve scope before loading anything: a typo should fail fast and leave no trace.
        let scope = cgroup::resolve_scope(&cgroup_root, &c.scope)?;

        // Pins of an earlier run (fail-closed, or killed before SIGTERM) hold programs whose
        // heartbeat is stale; they would refuse connects alongside ours. Remove them first.
        if c.fail_closed {
            cgroup::ensure_bpffs_dir(&c.bpffs_dir)?;
        }
        if cgroup::is_bpffs(&c.bpffs_dir) {
            let n = loader::remove_stale_pins(&c.bpffs_dir)?;
            if n > 0 {
                tracing::info!(dir = %c.bpffs_dir.display(), removed = n, "removed stale pinned capture links");
            }
        }

        let mut ebpf = loader::load_object(cfg)?;
        // The logger takes the AYA_LOGS ring buffer; keep it alive (in the drain task) for as
        // long as the programs run.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "eBPF logging unavailable");
                None
            }
        };
        let mut maps = Maps::take(&mut ebpf)?;
        let netns_cookie = loader::own_netns_cookie()?;
        let runtime = loader::runtime_config(cfg, netns_cookie);
        maps.set_config(&runtime)?;
        let failed = maps.scope.set(ScopeOwner::Config, scope_entries(&scope));
        if failed > 0 {
            return Err(CaptureError::ScopeFull { failed, max: c.max_scope_cgroups });
        }

        let rule_maps = maps.rules.take().ok_or(MapsError::Missing(gateway_common::maps::PORT_RULES))?;
        let mut sync = RuleSync::new(rule_maps, c);
        sync.install_static()?;
        sync.refresh_hosts().await;
        if sync.installed().is_empty() {
            tracing::warn!("no capture rules (capture.ports/destinations/hosts): nothing will be redirected");
        }

        maps.stamp_heartbeat()?;
        let pin_dir = c.fail_closed.then_some(c.bpffs_dir.as_path());
        let pinned = loader::attach_all(&mut ebpf, &cgroup_root, pin_dir)?;
        tracing::info!(
            cgroup = %cgroup_root.display(),
            fail_closed = c.fail_closed,
            rules = sync.installed().len(),
            scope = c.scope.len(),
            "kernel capture attached"
        );

        let (rules_tx, rules_rx) = tokio::sync::mpsc::channel(4);
        let mut tasks = vec![sync.spawn_refresher(c.resolve_interval, rules_rx)];
        // Forward kernel log records to the `log` facade (bridged into `tracing` by the
        // subscriber) whenever the ring buffer becomes readable.
        if let Some(logger) = logger {
            // SAFETY: the logger owns its ring buffer map fd, which stays open and unchanged
            // until the logger (moved into the AsyncFd) is dropped together with it.
            match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
                Ok(mut fd) => tasks.push(tokio::spawn(async move {
                    loop {
                        match fd.readable_mut().await {
                            Ok(mut guard) => {
                                guard.get_inner_mut().flush();
                                guard.clear_ready();
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "eBPF log drain stopped");
                                return;
                            }
                        }
                    }
                })),
                Err(e) => tracing::warn!(error = %e, "cannot poll the eBPF log ring buffer"),
            }
        }
        Ok(Capture {
            cgroup_root,
            maps,
            netns_cookie,
            runtime: parking_lot::Mutex::new(runtime),
            rules_tx,
            ebpf: parking_lot::Mutex::new(Some(ebpf)),
            pinned: parking_lot::Mutex::new(pinned),
            tasks: parking_lot::Mutex::new(tasks),
        })
    }

    /// Apply a reloaded config in place: scope entries, rules (resolved again) and kernel knobs.
    /// Settings that need a restart (cgroup root, listeners' addresses, fail-closed pinning, map
    /// sizes) are the caller's to refuse. An unresolvable scope entry fails the reload and
    /// leaves everything as it was.
    pub async fn apply_config(&self, cfg: &crate::config::Config) -> Result<(), CaptureError> {
        let scope = cgroup::resolve_scope(&self.cgroup_root, &cfg.capture.scope)?;
        let failed = self.maps.scope.set(ScopeOwner::Config, scope_entries(&scope));
        if failed > 0 {
            return Err(CaptureError::ScopeFull { failed, max: cfg.capture.max_scope_cgroups });
        }
        let runtime = loader::runtime_config(cfg, self.netns_cookie);
        if *self.runtime.lock() != runtime {
            self.maps.set_config(&runtime)?;
            *self.runtime.lock() = runtime;
        }
        if self.rules_tx.send(cfg.capture.clone()).await.is_err() {
            tracing::warn!("capture rule refresher is gone; rules not updated");
        }
        Ok(())
    }

    /// The scope map, for the Kubernetes pod syncer.
    pub fn scope(&self) -> &scope::ScopeTable {
        &self.maps.scope
    }

    /// Stamp the heartbeat now. In `tollgate run` the [`heartbeat::Heartbeat`] thread calls it
    /// while the proxy is accepting.
    pub fn heartbeat(&self) {
        if let Err(e) = self.maps.stamp_heartbeat() {
            tracing::warn!(error = %e, "capture heartbeat failed");
        }
    }

    /// Summed per-CPU counters, indexed like gateway_common::Counter::ALL.
    pub fn counters(&self) -> Result<[u64; COUNTER_SLOTS as usize], CaptureError> {
        Ok(self.maps.counters()?)
    }

    /// The cgroup2 root the programs are attached to (for AgentResolver).
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Run `f` on the loaded object (programs, and the maps not taken by [`Maps::take`]); `None`
    /// after [`Capture::shutdown`]. The TLS uprobes load and attach their programs through it,
    /// so their links live and die with the capture's programs.
    pub fn with_ebpf<R>(&self, f: impl FnOnce(&mut Ebpf) -> R) -> Option<R> {
        self.ebpf.lock().as_mut().map(f)
    }

    /// Detach and unpin (SIGTERM path). Idempotent; the record maps stay readable so
    /// connections accepted before the detach still find their identity.
    pub fn shutdown(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        loader::unpin_links(std::mem::take(&mut *self.pinned.lock()));
        let mut ebpf = self.ebpf.lock().take();
        // Connects go direct first; then the rest (TLS uprobes, maps) is dropped, which closes
        // the program fds and the links the object owns.
        if let Some(e) = ebpf.as_mut() {
            loader::detach_cgroup_programs(e);
        }
        tracing::info!(cgroup = %self.cgroup_root.display(), "kernel capture programs detached");
        drop(ebpf);
        tracing::info!(cgroup = %self.cgroup_root.display(), "kernel capture detached");
    }
}

fn scope_entries(scope: &[(String, u64)]) -> std::collections::HashMap<u64, ScopeEntry> {
    scope.iter().map(|(_, id)| (*id, ScopeEntry::Include)).collect()
}

impl Drop for Capture {
    fn drop(&mut self) {
        // Pinned links deliberately survive a plain drop (fail-closed); only shutdown() unpins.
        for t in self.tasks.get_mut().drain(..) {
            t.abort();
        }
    }
}

impl FlowTable for Capture {
    fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<CaptureRecord> {
        self.maps.take_flow(peer, local)
    }
}
