//! Provider keys held by tollgate, so agents need none. A key comes from an environment variable
//! (fixed for the process) or a file that is watched and re-read when it changes: rewriting the
//! file, or Kubernetes swapping a mounted Secret, rotates the key without a restart.
//!
//! Keys are kept as sensitive [`HeaderValue`]s and never formatted: [`Secret`]'s `Debug` is
//! redacted and no error message carries a key.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::HeaderValue;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use parking_lot::{Mutex, RwLock};

use crate::config::CredentialSource;

/// Why a key could not be loaded. Messages name the source, never the key.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The environment variable is unset or not Unicode.
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    /// The key file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// Key file.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The key is empty or holds characters a header cannot carry.
    #[error("{0}: key is empty or not a valid header value")]
    Invalid(String),
    /// The file watcher could not be set up.
    #[error("watching {path}: {message}")]
    Watch {
        /// Directory watched.
        path: String,
        /// notify's message.
        message: String,
    },
}

/// A key, redacted when debug-printed.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// The key text, for building an auth header or query value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The current key of one provider; cheap to read on every request.
pub struct Credential {
    current: RwLock<Secret>,
    source: String,
    file: Option<PathBuf>,
    /// Keeps the file watcher alive for as long as the credential is used.
    watcher: Mutex<Option<RecommendedWatcher>>,
    /// File reads so far (a watcher feeding on its own reads would show here).
    reads: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("source", &self.source).finish_non_exhaustive()
    }
}

impl Credential {
    /// Load the key now; a file source is watched (and polled every `poll`, a safety net for
    /// filesystems without inotify) from then on.
    pub fn load(src: &CredentialSource, poll: Duration) -> Result<Arc<Self>, CredentialError> {
        match (&src.env, &src.file) {
            (Some(var), _) => {
                let v = std::env::var(var).map_err(|_| CredentialError::EnvMissing(var.clone()))?;
                let source = format!("env {var}");
                let secret = parse(&v).ok_or_else(|| CredentialError::Invalid(source.clone()))?;
                Ok(Arc::new(Credential {
                    current: RwLock::new(secret),
                    source,
                    file: None,
                    watcher: Mutex::new(None),
                    reads: Default::default(),
                }))
            }
            (None, Some(path)) => {
                let secret = read_file(path)?;
                let cred = Arc::new(Credential {
                    current: RwLock::new(secret),
                    source: path.display().to_string(),
                    file: Some(path.clone()),
                    watcher: Mutex::new(None),
                    reads: Default::default(),
                });
                cred.watch(poll)?;
                Ok(cred)
            }
            (None, None) => Err(CredentialError::Invalid("credentials".into())),
        }
    }

    /// The key as of now.
    pub fn get(&self) -> Secret {
        self.current.read().clone()
    }

    /// `Bearer <key>` (or `<key>` with an empty scheme) as a sensitive header value.
    pub fn header(&self, scheme: &str) -> Option<HeaderValue> {
        let key = self.get();
        let mut v = if scheme.is_empty() {
            HeaderValue::from_str(key.expose()).ok()?
        } else {
            HeaderValue::from_str(&format!("{scheme} {}", key.expose())).ok()?
        };
        v.set_sensitive(true);
        Some(v)
    }

    /// Where the key comes from (`env NAME` or the file path), for logs.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Re-read the file; keep the old key when the new content is unreadable or invalid (a
    /// half-written file must not take the provider down).
    pub fn reload(&self) {
        let Some(path) = &self.file else { return };
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match read_file(path) {
            Ok(s) => {
                let changed = *self.current.read().0 != *s.0;
                if changed {
                    *self.current.write() = s;
                    tracing::info!(source = %self.source, "provider key reloaded");
                }
            }
            Err(e) => tracing::warn!(error = %e, "provider key not reloaded; keeping the previous key"),
        }
    }

    fn watch(self: &Arc<Self>, poll: Duration) -> Result<(), CredentialError> {
        let Some(path) = self.file.clone() else { return Ok(()) };
        // Watch the directory: editors and Secret volumes replace the file (rename, symlink swap)
        // rather than write it in place, which a watch on the file itself would miss.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let weak: Weak<Credential> = Arc::downgrade(self);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Only changes: reading the key ourselves raises open/close (access) events in this
            // directory, which must not trigger another read.
            let changed = res
                .is_ok_and(|ev| matches!(ev.kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)));
            if changed {
                if let Some(c) = weak.upgrade() {
                    c.reload();
                }
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w))
        .map_err(|e| CredentialError::Watch { path: dir.display().to_string(), message: e.to_string() })?;
        *self.watcher.lock() = Some(watcher);
        let weak = Arc::downgrade(self);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut tick = tokio::time::interval(poll);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match weak.upgrade() {
                        Some(c) => c.reload(),
                        None => return,
                    }
                }
            });
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<Secret, CredentialError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CredentialError::Read { path: path.display().to_string(), source })?;
    parse(&text).ok_or_else(|| CredentialError::Invalid(path.display().to_string()))
}

fn parse(text: &str) -> Option<Secret> {
    let k = text.trim();
    (!k.is_empty() && HeaderValue::from_str(k).is_ok()).then(|| Secret(Arc::from(k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_key_rotates_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-old\n").unwrap();
        let src = CredentialSource { env: None, file: Some(path.clone()) };
        let c = Credential::load(&src, Duration::from_secs(3600)).unwrap();
        assert_eq!(c.get().expose(), "sk-old");
        assert_eq!(c.header("Bearer").unwrap(), "Bearer sk-old");
        assert!(c.header("Bearer").unwrap().is_sensitive());
        // Replace by rename, as Secret volumes and editors do.
        let tmp = dir.path().join(".key.tmp");
        std::fs::write(&tmp, "sk-new").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let t0 = std::time::Instant::now();
        while c.get().expose() != "sk-new" {
            assert!(t0.elapsed() < Duration::from_secs(5), "key not reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A broken file keeps the last good key.
        std::fs::write(&path, "  \n").unwrap();
        c.reload();
        assert_eq!(c.get().expose(), "sk-new");
        assert!(!format!("{:?} {:?}", c.get(), c).contains("sk-"));
        // Reading the key (open/close events) must not make the watcher re-read in a loop.
        let before = c.reads.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = c.reads.load(std::sync::atomic::Ordering::Relaxed);
        assert!(after - before <= 1, "key file re-read {} times while unchanged", after - before);
    }

    #[test]
    fn errors_name_source_not_key() {
        let e = Credential::load(
            &CredentialSource { env: Some("TOLLGATE_TEST_UNSET_VAR".into()), file: None },
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "environment variable TOLLGATE_TEST_UNSET_VAR is not set");
        let e = Credential::load(
            &CredentialSource { env: None, file: Some("/nonexistent/k".into()) },
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/k: "), "{e}");
    }
}
