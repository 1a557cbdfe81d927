//! Finding the files to probe: shared `libssl.so*` mapped by running processes (from
//! `/proc/<pid>/maps`) and executables that export OpenSSL's `SSL_write` themselves (static
//! OpenSSL, e.g. official Node.js builds), each opened through `/proc/<pid>/root` so a
//! container's own copy is the one probed. Files are identified by device and inode: one attach
//! per file covers every process that maps it, now and later.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSymbol};

/// The symbol whose export marks a file as an OpenSSL to probe.
pub const MARKER_SYMBOL: &str = "SSL_write";

/// Most files remembered as "checked, not OpenSSL" before the memory is reset (then they are
/// checked once more): bounds the scanner's memory on a node that runs many executables.
const MAX_NEGATIVE: usize = 16_384;

/// A file as the kernel knows it (uprobes are per inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

/// Why a file is probed; the `kind` label of `tollgate_uprobe_attached_files`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A shared `libssl.so*`.
    Shared,
    /// An executable (or other file) exporting OpenSSL's symbols itself.
    Static,
}

impl FileKind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Shared => "shared",
            FileKind::Static => "static",
        }
    }
}

/// A file to attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Identity, for deduplication.
    pub key: FileKey,
    /// Path to open it by (through `/proc/<pid>/root` for files found in a process).
    pub path: PathBuf,
    /// Shared library or executable.
    pub kind: FileKind,
}

/// One file-backed line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsLine<'a> {
    /// Inode (0 for anonymous mappings, which are not returned).
    pub inode: u64,
    /// Path as the process sees it.
    pub path: &'a str,
}

/// Parse a maps line (`addr perms offset dev inode path`); `None` for anonymous or pseudo
/// mappings (`[heap]`, `[vdso]`) and for files deleted since they were mapped.
pub fn parse_maps_line(line: &str) -> Option<MapsLine<'_>> {
    let mut rest = line;
    let mut fields = [""; 5];
    for f in fields.iter_mut() {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace)?;
        *f = &rest[..end];
        rest = &rest[end..];
    }
    let inode: u64 = fields[4].parse().ok()?;
    let path = rest.trim();
    if inode == 0 || !path.starts_with('/') || path.ends_with(" (deleted)") {
        return None;
    }
    Some(MapsLine { inode, path })
}

/// Is this the file name of a shared OpenSSL `libssl` (`libssl.so`, `libssl.so.3`,
/// `libssl.so.1.1`)?
pub fn is_libssl(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == "libssl.so" || name.starts_with("libssl.so.")
}

/// Does the ELF file at `path` define `SSL_write` (dynamic or static symbol table)? Reads only
/// the headers and symbol tables it needs, not the whole file.
pub fn exports_ssl_write(path: &Path) -> Result<bool, std::io::Error> {
    let file = File::open(path)?;
    let cache = object::ReadCache::new(file);
    let obj = match object::File::parse(&cache) {
        Ok(o) => o,
        // Not an object file (a script, a truncated file): not OpenSSL.
        Err(_) => return Ok(false),
    };
    let found = obj
        .dynamic_symbols()
        .chain(obj.symbols())
        .any(|s| s.is_definition() && s.name_bytes().is_ok_and(|n| n == MARKER_SYMBOL.as_bytes()));
    Ok(found)
}

/// Remembers which files were attached or checked, across rescans.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Files attached (or being attached): never looked at again.
    pub known: HashSet<FileKey>,
    /// Executables checked and found not to be OpenSSL.
    negative: HashSet<FileKey>,
}

impl Scanner {
    /// Remember a file as "not to probe", bounded.
    fn not_openssl(&mut self, key: FileKey) {
        if self.negative.len() >= MAX_NEGATIVE {
            self.negative.clear();
        }
        self.negative.insert(key);
    }

    /// New files to attach found in the processes under `proc_root` (normally `/proc`),
    /// skipping `self_pid`. Files are returned once; the caller marks them known when it
    /// attaches (or gives up on) them.
    pub fn scan(&mut self, proc_root: &Path, shared: bool, statics: bool, self_pid: u32) -> Vec<Candidate> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(proc_root) else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == self_pid {
                continue;
            }
            self.scan_process(&entry.path(), shared, statics, &mut out);
        }
        out
    }

    /// New files to attach among the libraries and executable of process `pid` only (under
    /// `proc_root`). For the check before a TLS connection to a route is spliced: the process
    /// may have loaded its libssl after the last rescan (CPython loads it with its `_ssl`
    /// module, a `dlopen` the exec wake-up does not see).
    pub fn scan_pid(&mut self, proc_root: &Path, pid: u32, shared: bool, statics: bool) -> Vec<Candidate> {
        let mut out = Vec::new();
        self.scan_process(&proc_root.join(pid.to_string()), shared, statics, &mut out);
        out
    }

    fn scan_process(&mut self, pdir: &Path, shared: bool, statics: bool, out: &mut Vec<Candidate>) {
        if shared {
            self.scan_maps(pdir, out);
        }
        if statics {
            self.scan_exe(pdir, out);
        }
    }

    fn scan_maps(&mut self, pdir: &Path, out: &mut Vec<Candidate>) {
        // A process that exits meanwhile, or a kernel thread: nothing to read.
        let Ok(maps) = std::fs::read_to_string(pdir.join("maps")) else {
            return;
        };
        let mut seen_inodes = HashSet::new();
        for line in maps.lines() {
            let Some(m) = parse_maps_line(line) else {
                continue;
            };
            if !is_libssl(m.path) || !seen_inodes.insert(m.inode) {
                continue;
            }
            let path = in_root(pdir, m.path);
            let Some(key) = file_key(&path) else {
                continue;
            };
            if self.known.contains(&key) || out.iter().any(|c: &Candidate| c.key == key) {
                continue;
            }
            out.push(Candidate { key, path, kind: FileKind::Shared });
        }
    }

    fn scan_exe(&mut self, pdir: &Path, out: &mut Vec<Candidate>) {
        let exe = pdir.join("exe");
        let Some(key) = file_key(&exe) else {
            return;
        };
        if self.known.contains(&key) || self.negative.contains(&key) || out.iter().any(|c| c.key == key) {
            return;
        }
        // `/proc/<pid>/exe` opens the very inode, a container's file included; the kernel keeps
        // the inode (not the path) for the probe.
        match exports_ssl_write(&exe) {
            Ok(true) => out.push(Candidate { key, path: exe, kind: FileKind::Static }),
            Ok(false) => self.not_openssl(key),
            Err(_) => {}
        }
    }
}

/// `path` (as seen by the process) opened through the process's root directory.
pub fn in_root(pdir: &Path, path: &str) -> PathBuf {
    pdir.join("root").join(path.trim_start_matches('/'))
}

/// Device and inode of the file `path` leads to.
pub fn file_key(path: &Path) -> Option<FileKey> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileKey { dev: m.dev(), ino: m.ino() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse_file_mappings_only() {
        let l = "7f2194959000-7f219495e000 r--p 00000000 fd:01 1835145                    /usr/lib/x86_64-linux-gnu/libssl.so.3";
        assert_eq!(
            parse_maps_line(l),
            Some(MapsLine { inode: 1835145, path: "/usr/lib/x86_64-linux-gnu/libssl.so.3" })
        );
        let spaced = "7f00-7f01 r-xp 00001000 00:2a 42 /opt/my app/lib/libssl.so.1.1";
        assert_eq!(parse_maps_line(spaced).map(|m| m.path), Some("/opt/my app/lib/libssl.so.1.1"));
        assert_eq!(parse_maps_line("55d0-55d1 rw-p 00000000 00:00 0                          [heap]"), None);
        assert_eq!(parse_maps_line("7ffd-7ffe r-xp 00000000 00:00 0 [vdso]"), None);
        assert_eq!(parse_maps_line("7f00-7f01 r-xp 00000000 fd:01 77 /usr/lib/libssl.so.3 (deleted)"), None);
        assert_eq!(parse_maps_line("7f00-7f01 r-xp 00000000 fd:01"), None);
        assert_eq!(parse_maps_line(""), None);
    }

    #[test]
    fn libssl_names() {
        assert!(is_libssl("/usr/lib/x86_64-linux-gnu/libssl.so.3"));
        assert!(is_libssl("/usr/lib/libssl.so.1.1"));
        assert!(is_libssl("/opt/x/libssl.so"));
        assert!(!is_libssl("/usr/lib/libcrypto.so.3"));
        assert!(!is_libssl("/usr/lib/libssl3.so"));
        assert!(!is_libssl("/usr/lib/libssl.so.3/other"));
    }

    #[test]
    fn elf_symbol_detection_on_real_binaries() {
        // The test binary itself links rustls, not OpenSSL.
        let me = std::env::current_exe().expect("current exe");
        assert!(!exports_ssl_write(&me).expect("readable"));
        // Not an ELF file at all.
        let tmp = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(tmp.path(), b"#!/bin/sh\necho hi\n").expect("write");
        assert!(!exports_ssl_write(tmp.path()).expect("readable"));
        // The system libssl defines SSL_write in its dynamic symbol table.
        let libssl = ["/usr/lib/x86_64-linux-gnu/libssl.so.3", "/lib/x86_64-linux-gnu/libssl.so.3"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists());
        if let Some(p) = libssl {
            assert!(exports_ssl_write(p).expect("readable"), "{}", p.display());
        }
        // Official Node.js builds link OpenSSL statically and export its symbols.
        let node = Path::new("/usr/bin/node");
        if node.exists() {
            assert!(exports_ssl_write(node).expect("readable"));
        }
    }

    #[test]
    fn scanner_finds_this_process_libraries_once() {
        // This process maps no libssl; a scan of a fake proc root with one maps file that does.
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("4242");
        std::fs::create_dir_all(p.join("root/lib")).expect("mkdir");
        std::fs::write(p.join("root/lib/libssl.so.3"), b"not really").expect("write");
        std::fs::write(
            p.join("maps"),
            "7f00-7f01 r-xp 00000000 fd:01 99 /lib/libssl.so.3\n7f01-7f02 r--p 00001000 fd:01 99 /lib/libssl.so.3\n",
        )
        .expect("write");
        let mut s = Scanner::default();
        let found = s.scan(dir.path(), true, false, 1);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, FileKind::Shared);
        assert_eq!(found[0].path, p.join("root/lib/libssl.so.3"));
        s.known.insert(found[0].key);
        assert!(s.scan(dir.path(), true, false, 1).is_empty());
        // The skipped pid is not scanned.
        let mut fresh = Scanner::default();
        assert!(fresh.scan(dir.path(), true, false, 4242).is_empty());
    }

    #[test]
    fn one_process_scan_finds_a_library_loaded_after_the_last_rescan() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("77");
        std::fs::create_dir_all(p.join("root/usr/lib")).expect("mkdir");
        std::fs::write(p.join("root/usr/lib/libssl.so.3"), b"not really").expect("write");
        // At the periodic rescan the process had not loaded OpenSSL yet.
        std::fs::write(p.join("maps"), "5500-5501 r-xp 00000000 fd:01 5 /usr/bin/python3.11\n").expect("write");
        let mut s = Scanner::default();
        assert!(s.scan(dir.path(), true, false, 1).is_empty());
        // Then it `dlopen`s `_ssl` and connects: the one-process scan finds its libssl.
        std::fs::write(
            p.join("maps"),
            "5500-5501 r-xp 00000000 fd:01 5 /usr/bin/python3.11\n7f00-7f01 r-xp 00000000 fd:01 9 /usr/lib/libssl.so.3\n",
        )
        .expect("write");
        let found = s.scan_pid(dir.path(), 77, true, false);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].kind, &found[0].path), (FileKind::Shared, &p.join("root/usr/lib/libssl.so.3")));
        s.known.insert(found[0].key);
        assert!(s.scan_pid(dir.path(), 77, true, false).is_empty(), "a probed file is not returned again");
        // A process that is gone has nothing to scan.
        assert!(s.scan_pid(dir.path(), 78, true, true).is_empty());
    }
}
