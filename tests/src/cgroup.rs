//! A private cgroup2 mount and groups in it.
//!
//! The machine's `/sys/fs/cgroup` may be cgroup v1; cgroup2 is a single hierarchy that can be
//! mounted any number of times, so each test mounts it in a temp dir, creates uniquely named
//! groups, and hands that mount to tollgate as `capture.cgroup_root`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

struct MountInner {
    dir: PathBuf,
}

impl Drop for MountInner {
    fn drop(&mut self) {
        let c = CString::new(self.dir.as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A cgroup2 mount in a temp dir; unmounted (lazily) on drop, after every [`Group`] is gone.
#[derive(Clone)]
pub struct Cgroup2 {
    inner: Arc<MountInner>,
}

impl Cgroup2 {
    /// Mount cgroup2 at a fresh temp dir.
    pub fn mount() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-cgroup2-{}", crate::run_tag(), unique()));
        std::fs::create_dir_all(&dir)?;
        let src = CString::new("none").expect("cstr");
        let fstype = CString::new("cgroup2").expect("cstr");
        let target = CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated strings, null data.
        let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            bail!("mount -t cgroup2 none {}: {e}", dir.display());
        }
        Ok(Cgroup2 { inner: Arc::new(MountInner { dir }) })
    }

    /// Mount point (pass as `capture.cgroup_root`).
    pub fn root(&self) -> &Path {
        &self.inner.dir
    }

    /// Create the group `name` (a single path segment, made unique per run) under the root.
    pub fn group(&self, name: &str) -> Result<Group> {
        let rel = format!("/{}-{}", crate::run_tag(), name);
        let dir = self.inner.dir.join(&rel[1..]);
        if dir.exists() {
            let _ = drain_and_remove(&self.inner.dir, &dir);
        }
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(Group { mount: self.inner.clone(), dir, rel })
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A cgroup under a [`Cgroup2`] mount. On drop its processes move to the root and it is removed.
pub struct Group {
    mount: Arc<MountInner>,
    dir: PathBuf,
    rel: String,
}

impl Group {
    /// Path relative to the cgroup2 root, e.g. `/tge123-agent` (for `capture.scope` and agent
    /// selectors).
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// Directory of the group.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pids currently in the group.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Move an existing process into the group.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("move pid {pid} into {}", self.dir.display()))
    }

    /// A command that runs `program` inside this group (and inside `netns` when given): the
    /// child moves itself into the group between fork and exec, so every process it starts is
    /// in the group from its first instruction.
    pub fn command(&self, program: &str, netns: Option<&Netns>) -> Command {
        command_in(Some(self), netns, program)
    }
}

/// `program` as a [`Command`], optionally started inside `group` and `netns`.
pub fn command_in(group: Option<&Group>, netns: Option<&Netns>, program: &str) -> Command {
    let procs = group.map(|g| g.dir.join("cgroup.procs"));
    command_with_procs(procs.as_deref(), netns.map(Netns::name), program)
}

/// `program` as a [`Command`] that moves itself into the cgroup whose `cgroup.procs` file is
/// `procs` before exec, run through `ip netns exec <netns>` when given.
pub fn command_with_procs(procs: Option<&Path>, netns: Option<&str>, program: &str) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    };
    if let Some(p) = procs {
        let procs = CString::new(p.as_os_str().as_bytes()).expect("path");
        // SAFETY: the closure only calls async-signal-safe libc functions on memory allocated
        // before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
    cmd
}

fn drain_and_remove(root: &Path, dir: &Path) -> Result<()> {
    let mut last = None;
    for _ in 0..100 {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(root.join("cgroup.procs"), pid.trim());
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("rmdir {}: {:?}", dir.display(), last)
}

/// Every directory below `dir`, deepest first (so each can be removed in order).
fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(e.path());
                stack.push(e.path());
            }
        }
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

impl Group {
    /// Create nested cgroups `rel` (e.g. kubelet-style `kubepods.slice/.../cri-containerd-ID.scope`)
    /// below this group; removed with it. Returns the directory.
    pub fn mkdirs(&self, rel: &str) -> Result<PathBuf> {
        let dir = self.dir.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir -p {}", dir.display()))?;
        Ok(dir)
    }

    /// Remove a nested cgroup made by [`Group::mkdirs`] (and anything below it), moving its
    /// processes to the root first.
    pub fn remove_nested(&self, dir: &Path) -> Result<()> {
        for d in subdirs_deepest_first(dir) {
            drain_and_remove(&self.mount.dir, &d)?;
        }
        drain_and_remove(&self.mount.dir, dir)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for d in subdirs_deepest_first(&self.dir) {
            if let Err(e) = drain_and_remove(&self.mount.dir, &d) {
                eprintln!("cleanup: {e:#}");
            }
        }
        if let Err(e) = drain_and_remove(&self.mount.dir, &self.dir) {
            eprintln!("cleanup: {e:#}");
        }
    }
}
