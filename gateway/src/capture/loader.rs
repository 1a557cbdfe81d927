//! Loading the embedded eBPF object and attaching its three programs to the cgroup root.
//!
//! Link ownership decides what happens when tollgate dies:
//! * fail-open (default): the links are owned by this process. `kill -9` closes their fds, the
//!   kernel detaches the programs, and traffic flows directly again.
//! * fail-closed: the links are pinned in bpffs, so the programs outlive the process. The maps
//!   they use are the ones referenced by the loaded programs (a map lives as long as a program
//!   using it), so the surviving connect4/6 programs keep reading the same `TG_HEARTBEAT` map,
//!   which nobody stamps any more: the heartbeat goes stale and captured connects fail with
//!   EPERM. A restarted tollgate removes those pins (detaching the old programs) and attaches
//!   freshly loaded programs with new maps; SIGTERM (`shutdown`) removes the pins itself.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use gateway_common::{
    globals, maps, progs, RuntimeConfig, FLAG_FAIL_CLOSED, FLAG_POD_V4, FLAG_POD_V6, FLAG_SCOPE_ALL, FLAG_UPROBES,
};

use crate::config::Config;

/// The object built by `cargo xtask build`, copied in by `build.rs` (empty when not built).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate-ebpf.o"));

/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc version.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The programs in attach order: sock_ops first, so that by the time connect4/6 start
/// redirecting, every redirected socket is re-keyed for the proxy.
const PROGRAMS: [&str; 3] = [progs::SOCK_OPS, progs::CONNECT4, progs::CONNECT6];

/// Errors loading or attaching; each names the object, program, map or path involved.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// `build.rs` found no object to embed.
    #[error("eBPF object not embedded: run `cargo xtask build`")]
    NotEmbedded,
    /// aya could not parse or create the object's maps.
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    /// The object lacks a program the loader expects.
    #[error("eBPF program {0} not found in the object")]
    MissingProgram(&'static str),
    /// A program has another type than expected.
    #[error("eBPF program {name} has an unexpected type: {source}")]
    ProgramType {
        /// Program name.
        name: &'static str,
        /// aya's reason.
        source: ProgramError,
    },
    /// The verifier rejected a program (its log is in the message).
    #[error("eBPF program {name} failed to load: {source}")]
    ProgramLoad {
        /// Program name.
        name: &'static str,
        /// aya's reason, with the verifier log.
        source: ProgramError,
    },
    /// Attaching to the cgroup failed.
    #[error("cannot attach eBPF program {name} to cgroup {cgroup}: {source}")]
    Attach {
        /// Program name.
        name: &'static str,
        /// Cgroup directory.
        cgroup: PathBuf,
        /// aya's reason.
        source: ProgramError,
    },
    /// The cgroup directory could not be opened.
    #[error("cannot open cgroup directory {path}: {source}")]
    OpenCgroup {
        /// Cgroup directory.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Pinning a link for fail-closed mode failed.
    #[error("cannot pin the link of eBPF program {name} at {path}: {reason}")]
    Pin {
        /// Program name.
        name: &'static str,
        /// Pin path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Removing a stale pin from an earlier run failed.
    #[error("cannot remove stale pinned link {path}: {source}")]
    Unpin {
        /// Pin path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Reading the netns cookie of the host netns failed.
    #[error("cannot read SO_NETNS_COOKIE (needs Linux 5.14+): {0}")]
    NetnsCookie(#[source] io::Error),
}

/// Where a link of program `name` is pinned in fail-closed mode.
pub fn pin_path(bpffs_dir: &Path, name: &str) -> PathBuf {
    bpffs_dir.join(format!("{name}_link"))
}

/// Remove link pins left by an earlier run (which detaches its programs once nothing else holds
/// them). Missing files are fine.
pub fn remove_stale_pins(bpffs_dir: &Path) -> Result<usize, LoaderError> {
    let mut removed = 0;
    for name in PROGRAMS {
        let path = pin_path(bpffs_dir, name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(LoaderError::Unpin { path, source }),
        }
    }
    Ok(removed)
}

/// Load the embedded object with map sizes from config. Programs are not loaded yet, so the
/// caller can take the log map and fill the maps first.
pub fn load_object(cfg: &Config) -> Result<Ebpf, LoaderError> {
    if OBJECT.is_empty() {
        return Err(LoaderError::NotEmbedded);
    }
    let c = &cfg.capture;
    // Kernel-side logs only cost ring-buffer writes when someone will print them.
    let log_level: u8 = if tracing::level_filters::LevelFilter::current() >= tracing::Level::DEBUG {
        aya_log::Level::Debug as u8
    } else {
        aya_log::Level::Info as u8
    };
    // TLS uprobes off: the maps exist (the object declares them) at their smallest, and their
    // programs are never loaded.
    let u = &c.uprobes;
    let (ring, conns) =
        if u.enabled { (u32::try_from(u.ring_buffer_bytes).unwrap_or(1 << 30), u.max_connections) } else { (4096, 1) };
    let max_call = u.max_bytes_per_call;
    EbpfLoader::new()
        .map_max_entries(maps::TLS_EVENTS, ring)
        .map_max_entries(maps::TLS_CONNS, conns.max(1))
        .map_max_entries(maps::TLS_CONNECTING, conns.max(1))
        .map_max_entries(maps::TLS_ACTIVE, conns.max(1))
        .map_max_entries(maps::TLS_SSL_FD, conns.max(1))
        .map_max_entries(maps::TLS_LAST_RECV, conns.max(1))
        .override_global(globals::TLS_MAX_CALL_BYTES, &max_call, false)
        .map_max_entries(maps::BY_COOKIE, c.max_records.max(1))
        .map_max_entries(maps::BY_FLOW, c.max_records.max(1))
        .map_max_entries(maps::PORT_RULES, c.max_rules.max(1))
        .map_max_entries(maps::CIDR4_RULES, c.max_rules.max(1))
        .map_max_entries(maps::CIDR6_RULES, c.max_rules.max(1))
        .map_max_entries(maps::SCOPE, c.max_scope_cgroups.max(1))
        .override_global(aya_log::LEVEL, &log_level, false)
        .load(OBJECT)
        .map_err(LoaderError::Load)
}

/// The netns cookie of tollgate's own netns (where the proxy listens).
pub fn own_netns_cookie() -> Result<u64, LoaderError> {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).map_err(LoaderError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd; `cookie`/`len` are a writable u64 and its size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(LoaderError::NetnsCookie(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// The kernel-side knobs derived from config.
pub fn runtime_config(cfg: &Config, host_netns_cookie: u64) -> RuntimeConfig {
    let (l, c) = (&cfg.listen, &cfg.capture);
    let mut flags = 0;
    if c.fail_closed {
        flags |= FLAG_FAIL_CLOSED;
    }
    // With Kubernetes on, pods are scoped by the pod syncer: an empty `capture.scope` then means
    // "no host cgroups", not "everything".
    if c.scope.is_empty() && !cfg.kubernetes.enabled {
        flags |= FLAG_SCOPE_ALL;
    }
    if c.uprobes.enabled {
        flags |= FLAG_UPROBES;
    }
    if l.pod_ipv4.is_some() {
        flags |= FLAG_POD_V4;
    }
    if l.pod_ipv6.is_some() {
        flags |= FLAG_POD_V6;
    }
    RuntimeConfig {
        proxy_v4: l.ipv4.octets(),
        pod_proxy_v4: l.pod_ipv4.map(|a| a.octets()).unwrap_or_default(),
        // All-zero (unspecified) tells the kernel IPv6 capture is off.
        proxy_v6: l.ipv6.map(|a| a.octets()).unwrap_or_default(),
        pod_proxy_v6: l.pod_ipv6.map(|a| a.octets()).unwrap_or_default(),
        proxy_port: l.port,
        _pad0: 0,
        flags,
        host_netns_cookie,
        heartbeat_timeout_ns: u64::try_from(c.heartbeat_timeout.as_nanos()).unwrap_or(u64::MAX),
        self_mark: c.self_mark,
        // getpid() is the tgid in tollgate's pid namespace; in a container that is not what the
        // kernel reports, and the SO_MARK check in the programs covers that case.
        self_tgid: std::process::id(),
    }
}

/// Links that outlive the process (fail-closed), removed by [`unpin_links`].
pub type Pinned = Vec<PinnedLink>;

/// Load the three programs and attach them to `cgroup_root`. With `pin_dir`, the links are
/// pinned there instead of being owned by `ebpf`.
pub fn attach_all(ebpf: &mut Ebpf, cgroup_root: &Path, pin_dir: Option<&Path>) -> Result<Pinned, LoaderError> {
    let cgroup =
        File::open(cgroup_root).map_err(|source| LoaderError::OpenCgroup { path: cgroup_root.to_owned(), source })?;
    // bpf_link-based cgroup attachments (5.7+) always coexist with other programs and reject
    // the ALLOW_MULTI flag; the legacy prog_attach path needs it to not evict other agents.
    let links_supported = KernelVersion::current().map(|v| v >= KernelVersion::new(5, 7, 0)).unwrap_or(true);
    let mode = if links_supported { CgroupAttachMode::Single } else { CgroupAttachMode::AllowMultiple };

    let mut pinned = Vec::new();
    for name in PROGRAMS {
        match attach_one(ebpf, name, &cgroup, cgroup_root, mode, pin_dir) {
            Ok(p) => pinned.extend(p),
            Err(e) => {
                // Do not leave half of a fail-closed setup pinned behind.
                unpin_links(pinned);
                return Err(e);
            }
        }
        tracing::debug!(program = name, cgroup = %cgroup_root.display(), pinned = pin_dir.is_some(), "eBPF program attached");
    }
    Ok(pinned)
}

fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    cgroup_root: &Path,
    mode: CgroupAttachMode,
    pin_dir: Option<&Path>,
) -> Result<Option<PinnedLink>, LoaderError> {
    let prog = ebpf.program_mut(name).ok_or(LoaderError::MissingProgram(name))?;
    let attach_err = |source| LoaderError::Attach { name, cgroup: cgroup_root.to_owned(), source };
    let type_err = |source| LoaderError::ProgramType { name, source };
    let load_err = |source| LoaderError::ProgramLoad { name, source };
    let fd_link: Option<FdLink> = if name == progs::SOCK_OPS {
        let p: &mut SockOps = prog.try_into().map_err(type_err)?;
        p.load().map_err(load_err)?;
        let id = p.attach(cgroup, mode).map_err(attach_err)?;
        match pin_dir {
            Some(_) => Some(p.take_link(id).map_err(attach_err)?.try_into().map_err(|e| pin_err(name, pin_dir, e))?),
            None => None,
        }
    } else {
        let p: &mut CgroupSockAddr = prog.try_into().map_err(type_err)?;
        p.load().map_err(load_err)?;
        let id = p.attach(cgroup, mode).map_err(attach_err)?;
        match pin_dir {
            Some(_) => Some(p.take_link(id).map_err(attach_err)?.try_into().map_err(|e| pin_err(name, pin_dir, e))?),
            None => None,
        }
    };
    match (fd_link, pin_dir) {
        (Some(link), Some(dir)) => {
            let path = pin_path(dir, name);
            Ok(Some(link.pin(&path).map_err(|e| pin_err(name, pin_dir, e))?))
        }
        _ => Ok(None),
    }
}

fn pin_err(name: &'static str, dir: Option<&Path>, e: impl std::fmt::Display) -> LoaderError {
    LoaderError::Pin { name, path: pin_path(dir.unwrap_or(Path::new("")), name), reason: e.to_string() }
}

/// Detach the three cgroup programs (fail-open mode: their links are owned by `ebpf`) before
/// anything else of the object is dropped. Dropping the whole object detaches them too, but in
/// no set order, and tearing down the TLS uprobes can take a while (every probed file, every
/// tracepoint): new connects must go direct from the first moment of a shutdown, not keep
/// reaching a proxy that is about to stop accepting.
pub fn detach_cgroup_programs(ebpf: &mut Ebpf) {
    for name in PROGRAMS {
        let Some(prog) = ebpf.program_mut(name) else { continue };
        let r = if name == progs::SOCK_OPS {
            <&mut SockOps>::try_from(prog).map(|p| p.unload())
        } else {
            <&mut CgroupSockAddr>::try_from(prog).map(|p| p.unload())
        };
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(program = name, error = %e, "detaching eBPF program failed"),
            Err(e) => tracing::warn!(program = name, error = %e, "eBPF program of an unexpected type"),
        }
    }
}

/// Remove the pins (the links detach when the returned fds close, i.e. right away).
pub fn unpin_links(pinned: Pinned) {
    for link in pinned {
        match link.unpin() {
            Ok(fd_link) => drop(fd_link),
            Err(e) => tracing::warn!(error = %e, "cannot remove pinned link"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uprobe_flag_follows_config() {
        let mut cfg = Config::default();
        assert_ne!(runtime_config(&cfg, 1).flags & FLAG_UPROBES, 0, "on by default");
        cfg.capture.uprobes.enabled = false;
        assert_eq!(runtime_config(&cfg, 1).flags & FLAG_UPROBES, 0, "off: connect4/6 never touch the TLS maps");
    }
}
