//! What a process trusts, read from `/proc/<pid>`: its executable, the trust variables of its
//! environment, and the trust-store files they (or the system bundle) name, opened inside the
//! process's own root filesystem so a container's files are read, not the node's.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Why a process's trust store could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `/proc/<pid>` is gone or unreadable (the process exited, or tollgate lacks the right).
    #[error("/proc/{pid}/{what}: {source}")]
    Proc {
        /// Process.
        pid: u32,
        /// Which entry.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The TLS stack a runtime uses decides which variables and files it trusts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// Node.js: its bundled roots plus `NODE_EXTRA_CA_CERTS`; never the system bundle.
    Node,
    /// CPython clients (httpx, requests): `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`,
    /// `CURL_CA_BUNDLE`, `SSL_CERT_DIR`; without them certifi's bundle, which tollgate cannot
    /// know, so no system bundle either.
    Python,
    /// Everything else linking OpenSSL or reading the system store (curl, Go, Ruby, PHP).
    Native,
}

impl Runtime {
    /// From the executable's file name.
    pub fn of(exe: &str) -> Runtime {
        let name = exe.rsplit('/').next().unwrap_or(exe);
        if name == "node" || name.starts_with("node-") || name == "nodejs" {
            Runtime::Node
        } else if name.starts_with("python") {
            Runtime::Python
        } else {
            Runtime::Native
        }
    }

    /// The trust variables this runtime reads, with whether each names a directory.
    fn variables(self) -> &'static [(&'static str, bool)] {
        match self {
            Runtime::Node => &[("NODE_EXTRA_CA_CERTS", false)],
            Runtime::Python => &[
                ("SSL_CERT_FILE", false),
                ("REQUESTS_CA_BUNDLE", false),
                ("CURL_CA_BUNDLE", false),
                ("SSL_CERT_DIR", true),
            ],
            Runtime::Native => &[("CURL_CA_BUNDLE", false), ("SSL_CERT_FILE", false), ("SSL_CERT_DIR", true)],
        }
    }
}

/// One place a process takes trusted roots from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Source {
    /// The variable that names it; `None` for the system bundle.
    pub variable: Option<&'static str>,
    /// The path as the process sees it (absolute, inside its root).
    pub path: String,
    /// A directory of certificate files (`SSL_CERT_DIR`) rather than one bundle.
    pub dir: bool,
}

/// A source's file identity, so a changed trust store is read again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
}

/// What tollgate learnt of one process.
#[derive(Clone, Debug)]
pub struct Process {
    /// `/proc/<pid>/root`: where the process's paths are resolved.
    root: PathBuf,
    /// The executable's path (for the decision cache and the runtime).
    pub exe: String,
    /// The runtime that decides which sources count.
    pub runtime: Runtime,
    /// Where it takes its roots from, in the order they are checked.
    pub sources: Vec<Source>,
}

/// Reads `/proc/<pid>` (exe, cwd, environ) and lists the sources the process trusts.
pub fn read_process(proc_root: &Path, pid: u32, system_bundles: &[String]) -> Result<Process, StoreError> {
    let dir = proc_root.join(pid.to_string());
    let err = |what: &'static str| move |source| StoreError::Proc { pid, what, source };
    let exe = std::fs::read_link(dir.join("exe")).map_err(err("exe"))?.to_string_lossy().into_owned();
    let environ = std::fs::read(dir.join("environ")).map_err(err("environ"))?;
    let cwd = std::fs::read_link(dir.join("cwd")).unwrap_or_else(|_| PathBuf::from("/"));
    let runtime = Runtime::of(&exe);
    let var = |name: &str| {
        environ.split(|b| *b == 0).find_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let v = kv.strip_prefix(name)?.strip_prefix('=')?;
            (!v.is_empty()).then(|| v.to_owned())
        })
    };
    let absolute = |p: &str| if p.starts_with('/') { p.to_owned() } else { cwd.join(p).to_string_lossy().into_owned() };
    let mut sources = Vec::new();
    for (name, is_dir) in runtime.variables() {
        let Some(v) = var(name) else { continue };
        // SSL_CERT_DIR may list several directories.
        let parts: Vec<&str> = if *is_dir { v.split(':').filter(|p| !p.is_empty()).collect() } else { vec![&v] };
        for p in parts {
            sources.push(Source { variable: Some(name), path: absolute(p), dir: *is_dir });
        }
    }
    if sources.is_empty() && runtime == Runtime::Native {
        let root = dir.join("root");
        if let Some(b) = system_bundles.iter().find(|b| resolve_in_root(&root, b).is_ok_and(|p| p.is_file())) {
            sources.push(Source { variable: None, path: b.clone(), dir: false });
        }
    }
    Ok(Process { root: dir.join("root"), exe, runtime, sources })
}

impl Process {
    /// The identity of every source (absent ones are left out: creating one changes the key).
    pub fn identities(&self) -> Vec<(String, FileId)> {
        self.sources
            .iter()
            .filter_map(|s| {
                let m = std::fs::metadata(resolve_in_root(&self.root, &s.path).ok()?).ok()?;
                Some((s.path.clone(), FileId { dev: m.dev(), ino: m.ino(), size: m.size(), mtime_ns: mtime_ns(&m) }))
            })
            .collect()
    }

    /// The first source that holds `ca_der`, if any. Files over `max_bytes` and unreadable
    /// ones count as not holding it; a directory is read up to [`MAX_DIR_FILES`] files.
    pub fn trusting_source(&self, ca_der: &[u8], max_bytes: u64) -> Option<&Source> {
        self.sources.iter().find(|s| {
            let Ok(p) = resolve_in_root(&self.root, &s.path) else { return false };
            if s.dir {
                let Ok(rd) = std::fs::read_dir(&p) else { return false };
                rd.flatten().take(MAX_DIR_FILES).any(|e| holds(&e.path(), ca_der, max_bytes))
            } else {
                holds(&p, ca_der, max_bytes)
            }
        })
    }
}

/// Files read from one `SSL_CERT_DIR` directory at most.
pub const MAX_DIR_FILES: usize = 4096;

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}

/// Does the PEM file at `path` hold the certificate `ca_der`?
fn holds(path: &Path, ca_der: &[u8], max_bytes: u64) -> bool {
    let Ok(m) = std::fs::metadata(path) else { return false };
    if !m.is_file() || m.len() > max_bytes {
        return false;
    }
    let Ok(pem) = std::fs::read(path) else { return false };
    let mut rd = pem.as_slice();
    let found = rustls_pemfile::certs(&mut rd).flatten().any(|c| c.as_ref() == ca_der);
    found
}

/// Symlinks followed while resolving one path, at most (as the kernel's ELOOP limit).
const MAX_LINKS: usize = 40;

/// `path` as the process sees it, resolved below `root` (`/proc/<pid>/root`): absolute
/// symlinks restart at `root`, `..` never climbs above it. Returns a path with no symlink left
/// (as of the resolution).
pub fn resolve_in_root(root: &Path, path: &str) -> std::io::Result<PathBuf> {
    let mut pending: VecDeque<String> = parts(Path::new(path));
    let mut cur = PathBuf::new();
    let mut links = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let full = root.join(&next);
        let m = std::fs::symlink_metadata(&full)?;
        if m.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(std::io::Error::other("too many symbolic links"));
            }
            let target = std::fs::read_link(&full)?;
            if target.is_absolute() {
                cur = PathBuf::new();
            }
            let mut rest = parts(&target);
            rest.extend(pending);
            pending = rest;
        } else {
            cur = next;
        }
    }
    Ok(root.join(cur))
}

fn parts(p: &Path) -> VecDeque<String> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_owned()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_links_resolve_inside_the_root_and_dotdot_stops_at_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
        std::fs::write(root.join("etc/ssl/certs/ca-certificates.crt"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/ssl/certs/ca-certificates.crt", root.join("etc/ssl/cert.pem")).unwrap();
        std::os::unix::fs::symlink("../../../../etc/ssl/certs", root.join("etc/up")).unwrap();
        let p = resolve_in_root(&root, "/etc/ssl/cert.pem").unwrap();
        assert_eq!(p, root.join("etc/ssl/certs/ca-certificates.crt"));
        let p = resolve_in_root(&root, "/etc/up/ca-certificates.crt").unwrap();
        assert_eq!(p, root.join("etc/ssl/certs/ca-certificates.crt"));
        std::os::unix::fs::symlink("/etc/loop", root.join("etc/loop")).unwrap();
        assert!(resolve_in_root(&root, "/etc/loop").is_err());
    }

    #[test]
    fn runtimes_by_executable_name() {
        assert_eq!(Runtime::of("/usr/bin/node"), Runtime::Node);
        assert_eq!(Runtime::of("/usr/local/bin/python3.12"), Runtime::Python);
        assert_eq!(Runtime::of("/usr/bin/curl"), Runtime::Native);
    }
}
