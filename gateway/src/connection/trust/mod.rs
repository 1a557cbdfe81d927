//! `intercept: auto`: terminate TLS only for callers that trust tollgate's CA, so an agent that
//! was never given the CA keeps working (spliced, observed through the TLS uprobes) instead of
//! failing its handshake.
//!
//! The decision reads the calling process's trust store ([`store`]), is cached per
//! (executable, cgroup, trust-store file identities), and is overruled by experience: a failed
//! interception handshake teaches tollgate to splice that (agent, SNI) from the next connection
//! on, so an agent fails at most once per [`AutoInterceptConfig::learned_ttl`].

pub mod store;

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lru::LruCache;
use parking_lot::Mutex;

use crate::config::{AutoInterceptConfig, InterceptMode};
use store::{FileId, Process};

/// What tollgate does with one TLS connection to an intercepting route, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Terminate the TLS (true) or splice it.
    pub intercept: bool,
    /// Why, as the `reason` label of `tollgate_intercept_decisions_total`.
    pub reason: Reason,
}

/// Why a connection was intercepted or spliced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `intercept: true`: no check.
    Forced,
    /// A trust variable of the process names a file or directory holding tollgate's CA.
    TrustVariable,
    /// The system bundle seen from the process's root holds tollgate's CA.
    SystemBundle,
    /// None of the sources the process's runtime trusts holds tollgate's CA.
    NotTrusted,
    /// An interception handshake of this agent to this SNI failed before.
    Learned,
    /// The process could not be read (it exited, or tollgate lacks the right): splice.
    Unreadable,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Forced => "forced",
            Reason::TrustVariable => "trust_variable",
            Reason::SystemBundle => "system_bundle",
            Reason::NotTrusted => "not_trusted",
            Reason::Learned => "learned",
            Reason::Unreadable => "process_unreadable",
        }
    }
}

/// Key of a cached decision: the same program in the same cgroup with the same trust-store
/// files gets the same answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    exe: String,
    cgroup: u64,
    sources: Vec<(String, FileId)>,
}

/// The caller of one connection, as the kernel recorded it.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// Agent name (the learned table's key, with the SNI).
    pub agent: &'a str,
    /// Process (thread group) that connected.
    pub pid: u32,
    /// Its cgroup id.
    pub cgroup: u64,
}

/// Trust decisions and learned splices, shared by every connection.
pub struct Trust {
    ca_der: Vec<u8>,
    cfg: AutoInterceptConfig,
    proc_root: PathBuf,
    decisions: Mutex<LruCache<Key, (Verdict, Instant)>>,
    learned: Mutex<LruCache<(String, String), Instant>>,
}

impl Trust {
    /// Decisions about trust in the CA whose DER is `ca_der`, bounded by `cfg`.
    pub fn new(ca_der: Vec<u8>, cfg: &AutoInterceptConfig) -> Trust {
        Trust::with_proc(ca_der, cfg, Path::new("/proc"))
    }

    /// As [`Trust::new`], reading processes below `proc_root` (tests).
    pub fn with_proc(ca_der: Vec<u8>, cfg: &AutoInterceptConfig, proc_root: &Path) -> Trust {
        let cap = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        Trust {
            ca_der,
            cfg: cfg.clone(),
            proc_root: proc_root.to_path_buf(),
            decisions: Mutex::new(LruCache::new(cap(cfg.max_decisions))),
            learned: Mutex::new(LruCache::new(cap(cfg.max_learned))),
        }
    }

    /// Intercept or splice a connection of `caller` to `sni` on a route with `mode` (which
    /// must allow interception). Reads `/proc` and maybe trust-store files: call it off the
    /// async workers.
    pub fn decide(&self, mode: InterceptMode, caller: Caller<'_>, sni: &str) -> Verdict {
        if mode == InterceptMode::Always {
            return Verdict { intercept: true, reason: Reason::Forced };
        }
        let learned_key = (caller.agent.to_owned(), sni.to_ascii_lowercase());
        {
            let mut l = self.learned.lock();
            match l.get(&learned_key) {
                Some(at) if at.elapsed() < self.cfg.learned_ttl => {
                    return Verdict { intercept: false, reason: Reason::Learned };
                }
                Some(_) => {
                    l.pop(&learned_key);
                }
                None => {}
            }
        }
        let process = match store::read_process(&self.proc_root, caller.pid, &self.cfg.system_bundles) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the caller's trust store; splicing");
                return Verdict { intercept: false, reason: Reason::Unreadable };
            }
        };
        let key = Key { exe: process.exe.clone(), cgroup: caller.cgroup, sources: process.identities() };
        if let Some((v, at)) = self.decisions.lock().get(&key) {
            if at.elapsed() < self.cfg.decision_ttl {
                return *v;
            }
        }
        let v = self.judge(&process);
        self.decisions.lock().put(key, (v, Instant::now()));
        v
    }

    fn judge(&self, p: &Process) -> Verdict {
        match p.trusting_source(&self.ca_der, self.cfg.max_bundle_bytes) {
            Some(s) if s.variable.is_some() => Verdict { intercept: true, reason: Reason::TrustVariable },
            Some(_) => Verdict { intercept: true, reason: Reason::SystemBundle },
            None => Verdict { intercept: false, reason: Reason::NotTrusted },
        }
    }

    /// An interception handshake of `agent` to `sni` failed in a way that says the agent does
    /// not trust the CA: splice that pair from the next connection on.
    pub fn learn_failure(&self, agent: &str, sni: &str) {
        self.learned.lock().put((agent.to_owned(), sni.to_ascii_lowercase()), Instant::now());
    }

    /// Entries held now (decisions, learned), for tests and the bounds check.
    pub fn sizes(&self) -> (usize, usize) {
        (self.decisions.lock().len(), self.learned.lock().len())
    }
}

/// How an interception handshake failed, as the `reason` label of
/// `tollgate_intercept_handshake_failures_total`; [`HandshakeFailure::teaches_splice`] says
/// whether it means "this agent does not trust the CA".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client sent alert `unknown_ca`.
    UnknownCa,
    /// The client sent alert `bad_certificate`.
    BadCertificate,
    /// The client sent alert `certificate_unknown`.
    CertificateUnknown,
    /// The client closed the connection during the handshake (after the server certificate).
    Closed,
    /// Timed out.
    Timeout,
    /// Anything else (protocol errors, other alerts).
    Other,
}

impl HandshakeFailure {
    /// Classify the error of a failed rustls server handshake.
    pub fn of(e: &std::io::Error) -> HandshakeFailure {
        use rustls::AlertDescription as A;
        if e.kind() == std::io::ErrorKind::UnexpectedEof || e.kind() == std::io::ErrorKind::ConnectionReset {
            return HandshakeFailure::Closed;
        }
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::AlertReceived(A::UnknownCA)) => HandshakeFailure::UnknownCa,
            Some(rustls::Error::AlertReceived(A::BadCertificate)) => HandshakeFailure::BadCertificate,
            Some(rustls::Error::AlertReceived(A::CertificateUnknown)) => HandshakeFailure::CertificateUnknown,
            _ => HandshakeFailure::Other,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::CertificateUnknown => "certificate_unknown",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "other",
        }
    }

    /// The failures that mean the client rejected tollgate's certificate.
    pub fn teaches_splice(self) -> bool {
        matches!(
            self,
            HandshakeFailure::UnknownCa
                | HandshakeFailure::BadCertificate
                | HandshakeFailure::CertificateUnknown
                | HandshakeFailure::Closed
        )
    }
}

/// Socket cookies of the connections the proxy terminates now, so the uprobe observer does not
/// count the agent's side of an intercepted call a second time. Bounded by the proxy's
/// connection limit (an entry lives as long as its connection task).
#[derive(Default)]
pub struct Intercepted(Mutex<HashSet<u64>>);

impl Intercepted {
    /// Marks `cookie` intercepted until the returned guard drops.
    pub fn mark(self: &std::sync::Arc<Self>, cookie: u64) -> InterceptedGuard {
        self.0.lock().insert(cookie);
        InterceptedGuard { set: self.clone(), cookie }
    }

    /// Is the connection with this socket cookie terminated by the proxy?
    pub fn contains(&self, cookie: u64) -> bool {
        self.0.lock().contains(&cookie)
    }

    /// Connections marked now.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    /// None marked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Unmarks its connection when the connection task ends.
pub struct InterceptedGuard {
    set: std::sync::Arc<Intercepted>,
    cookie: u64,
}

impl Drop for InterceptedGuard {
    fn drop(&mut self) {
        self.set.0.lock().remove(&self.cookie);
    }
}

#[cfg(test)]
mod tests;
