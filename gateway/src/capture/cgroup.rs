//! Finding (or mounting) the cgroup2 hierarchy and bpffs, and turning scope paths into the
//! cgroup ids the kernel programs compare against.
//!
//! A cgroup v2 id is the inode number of the cgroup's directory in the cgroup2 filesystem, which
//! is what `bpf_get_current_ancestor_cgroup_id` returns, so no BPF helper is needed to resolve
//! a path.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Where tollgate mounts cgroup2 itself when the host has none (cgroup v1-only hosts).
pub const DEFAULT_CGROUP2_DIR: &str = "/run/tollgate/cgroup2";
/// Conventional bpffs mount point, mounted when no bpffs covers the pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Errors from mount discovery, mounting and scope resolution; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[source] io::Error),
    /// Creating a mount point directory failed.
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        /// Directory that could not be created.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// `mount(2)` failed.
    #[error("cannot mount {fstype} at {path}: {source}")]
    Mount {
        /// Filesystem type (`cgroup2`, `bpf`).
        fstype: &'static str,
        /// Mount point.
        path: PathBuf,
        /// Underlying error.
        source: nix::Error,
    },
    /// The configured cgroup root is not a directory of a cgroup2 filesystem.
    #[error("cgroup root {0} is not a directory on a cgroup2 filesystem")]
    NotCgroup2(PathBuf),
    /// The configured bpffs directory is not on a bpf filesystem.
    #[error("{0} is not on a bpf filesystem (bpffs)")]
    NotBpffs(PathBuf),
    /// A `capture.scope` entry does not exist under the cgroup root.
    #[error("capture.scope entry {entry:?}: cgroup directory {path} does not exist or is unreadable: {source}")]
    ScopeMissing {
        /// The entry as written in config.
        entry: String,
        /// The directory it resolved to.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// A `capture.scope` entry tries to leave the cgroup root (`..`).
    #[error("capture.scope entry {0:?} must stay below the cgroup root (no `..`)")]
    ScopeEscapes(String),
    /// A `capture.scope` entry names something that is not a directory.
    #[error("capture.scope entry {entry:?}: {path} is not a cgroup directory")]
    ScopeNotDir {
        /// The entry as written in config.
        entry: String,
        /// The path it resolved to.
        path: PathBuf,
    },
}

/// One line of `/proc/self/mountinfo`, reduced to what we need.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    mount_point: PathBuf,
    fstype: String,
}

/// Undo the octal escaping mountinfo applies to spaces, tabs, newlines and backslashes.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            // `id parent maj:min root mount_point opts [optional...] - fstype source superopts`
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some(MountEntry { mount_point: PathBuf::from(unescape(mount_point)), fstype: fstype.to_owned() })
        })
        .collect()
}

fn mounts() -> Result<Vec<MountEntry>, CgroupError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    Ok(parse_mountinfo(&text))
}

/// The first cgroup2 mount point, if the host has one.
pub fn find_cgroup2_mount() -> Result<Option<PathBuf>, CgroupError> {
    Ok(mounts()?.into_iter().find(|m| m.fstype == "cgroup2").map(|m| m.mount_point))
}

fn mount_fs(fstype: &'static str, path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::CreateDir { path: path.to_owned(), source })?;
    nix::mount::mount(Some("none"), path, Some(fstype), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|source| CgroupError::Mount { fstype, path: path.to_owned(), source })
}

/// The cgroup2 directory to attach to: `configured` when given (it must be on cgroup2), else
/// an existing cgroup2 mount, else a fresh mount at [`DEFAULT_CGROUP2_DIR`]. Reusing an existing
/// mount matters: every cgroup2 mount shows the same single hierarchy, and a second mount would
/// only confuse operators.
pub fn ensure_cgroup_root(configured: Option<&Path>) -> Result<PathBuf, CgroupError> {
    if let Some(p) = configured {
        if !is_fs_type(p, nix::sys::statfs::CGROUP2_SUPER_MAGIC) {
            return Err(CgroupError::NotCgroup2(p.to_owned()));
        }
        return Ok(p.to_owned());
    }
    if let Some(existing) = find_cgroup2_mount()? {
        return Ok(existing);
    }
    let dir = PathBuf::from(DEFAULT_CGROUP2_DIR);
    tracing::info!(path = %dir.display(), "no cgroup2 mount found; mounting one");
    mount_fs("cgroup2", &dir)?;
    Ok(dir)
}

/// Make sure `dir` exists on a bpffs, mounting bpffs at [`DEFAULT_BPFFS`] (or at `dir` itself
/// when it lies elsewhere) if no bpf filesystem covers it.
pub fn ensure_bpffs_dir(dir: &Path) -> Result<(), CgroupError> {
    let covered = mounts()?.iter().any(|m| m.fstype == "bpf" && dir.starts_with(&m.mount_point));
    if !covered {
        let at = if dir.starts_with(DEFAULT_BPFFS) { Path::new(DEFAULT_BPFFS) } else { dir };
        tracing::info!(path = %at.display(), "no bpffs mounted for the pin directory; mounting one");
        mount_fs("bpf", at)?;
    }
    fs::create_dir_all(dir).map_err(|source| CgroupError::CreateDir { path: dir.to_owned(), source })?;
    if !is_fs_type(dir, nix::sys::statfs::BPF_FS_MAGIC) {
        return Err(CgroupError::NotBpffs(dir.to_owned()));
    }
    Ok(())
}

/// Whether `dir` is on a bpf filesystem (without mounting anything).
pub fn is_bpffs(dir: &Path) -> bool {
    is_fs_type(dir, nix::sys::statfs::BPF_FS_MAGIC)
}

fn is_fs_type(path: &Path, magic: nix::sys::statfs::FsType) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == magic)
}

/// The cgroup id of a cgroup2 directory (its inode number).
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// The directory a scope entry names: relative to `root` (a leading `/` is allowed), or an
/// absolute path that already lies under `root`.
pub fn scope_path(root: &Path, entry: &str) -> Result<PathBuf, CgroupError> {
    let p = Path::new(entry);
    let rel = match p.strip_prefix(root) {
        Ok(rel) if p.is_absolute() => rel,
        _ => p.strip_prefix("/").unwrap_or(p),
    };
    if rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(CgroupError::ScopeEscapes(entry.to_owned()));
    }
    Ok(root.join(rel))
}

/// Resolve every scope entry to `(entry, cgroup id)`. A missing directory is an error naming
/// it: a typo would otherwise silently capture nothing.
pub fn resolve_scope(root: &Path, entries: &[String]) -> Result<Vec<(String, u64)>, CgroupError> {
    entries
        .iter()
        .map(|entry| {
            let path = scope_path(root, entry)?;
            let md = fs::metadata(&path).map_err(|source| CgroupError::ScopeMissing {
                entry: entry.clone(),
                path: path.clone(),
                source,
            })?;
            if !md.is_dir() {
                return Err(CgroupError::ScopeNotDir { entry: entry.clone(), path });
            }
            Ok((entry.clone(), md.ino()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let text = "25 1 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - tmpfs tmpfs rw\n\
                    30 25 0:26 / /run/my\\040cg rw - cgroup2 none rw\n\
                    31 25 0:27 / /sys/fs/bpf rw shared:1 master:2 - bpf bpf rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1], MountEntry { mount_point: "/run/my cg".into(), fstype: "cgroup2".into() });
        assert_eq!(m[2].fstype, "bpf");
        assert_eq!(m[2].mount_point, PathBuf::from("/sys/fs/bpf"));
    }

    #[test]
    fn scope_paths_stay_under_root() {
        let root = Path::new("/cg");
        assert_eq!(scope_path(root, "/agents/a").unwrap(), PathBuf::from("/cg/agents/a"));
        assert_eq!(scope_path(root, "agents").unwrap(), PathBuf::from("/cg/agents"));
        assert_eq!(scope_path(root, "/cg/agents").unwrap(), PathBuf::from("/cg/agents"));
        assert!(matches!(scope_path(root, "/../etc"), Err(CgroupError::ScopeEscapes(_))));
        assert!(matches!(scope_path(root, "a/../../x"), Err(CgroupError::ScopeEscapes(_))));
    }

    #[test]
    fn missing_scope_dir_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_scope(dir.path(), &["/nope".to_owned()]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nope") && msg.contains("does not exist"), "{msg}");
        fs::create_dir(dir.path().join("yes")).unwrap();
        let ids = resolve_scope(dir.path(), &["yes".to_owned()]).unwrap();
        assert_eq!(ids[0].1, fs::metadata(dir.path().join("yes")).unwrap().ino());
    }
}
