//! Interception CA: the certificate agents trust so tollgate can terminate their TLS to AI
//! providers, and the leaf certificates it mints per SNI on the fly.
//!
//! All leaves share one P-256 key generated at start-up, so minting is a single ECDSA signature
//! (no key generation on the handshake path); minted certificates are cached in a bounded LRU.
//! Every leaf gets a unique serial number, since clients reject two different certificates with
//! the same issuer and serial.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::io::Write;
use std::num::NonZeroUsize;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::ServerConfig;

use crate::config::MAX_LEAF_VALIDITY;

/// File names inside `tls.ca_dir`.
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
/// Validity of a generated CA.
const CA_VALIDITY_DAYS: i64 = 3650;
/// Leaf validity used when the configured one cannot be encoded (config validation refuses
/// such values; this keeps library callers safe).
const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Back-dating of minted leaves, for agents whose clock runs a little behind the node's.
const LEAF_BACKDATE: time::Duration = time::Duration::hours(1);

/// Why the CA could not be loaded, created, or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a CA file failed.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Only one of `ca.pem` / `ca.key` exists; refusing to overwrite half a CA.
    #[error("{0}: found only one of ca.pem and ca.key; restore the other or remove both")]
    Incomplete(PathBuf),
    /// Certificate or key generation / parsing failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls rejected a key or configuration.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificate and key do not belong together (or the CA cannot sign usable leaves).
    #[error("{path}: CA self-check failed: {message}")]
    SelfCheck {
        /// CA certificate path.
        path: PathBuf,
        /// Verifier's complaint.
        message: String,
    },
}

/// The interception CA plus its leaf cache. Shared by every intercepting connection; also the
/// rustls certificate resolver for the proxy's server config.
pub struct CertAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    cert_path: PathBuf,
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn SigningKey>,
    leaf_validity: Duration,
    cache: Mutex<lru::LruCache<String, CachedLeaf>>,
    serial_salt: u64,
    serial_seq: AtomicU64,
}

/// A minted leaf and the moment it must be replaced (a quarter of its validity before
/// `not_after`), so a host kept hot in the cache never serves an expired certificate.
struct CachedLeaf {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority").field("cert_path", &self.cert_path).finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Load `ca.pem`/`ca.key` from dir, or generate (rcgen, ECDSA P-256, CA:true, 10y) and
    /// write them (dir 0700, key 0600). An operator-provided CA must use a PKCS#8 key. The CA
    /// is self-checked by minting and verifying one leaf, so a mismatched key fails start-up
    /// rather than every handshake.
    pub fn load_or_create(dir: &Path, leaf_validity: Duration, cache_size: usize) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let (cert_pem, key_pem) = match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                warn_if_key_readable(&key_path);
                (read(&cert_path)?, read(&key_path)?)
            }
            (false, false) => create_ca(dir, &cert_path, &key_path)?,
            _ => return Err(TlsError::Incomplete(dir.to_path_buf())),
        };
        let issuer_key = KeyPair::from_pem(&key_pem)?;
        let issuer = CertificateParams::from_ca_cert_pem(&cert_pem)?.self_signed(&issuer_key)?;
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| TlsError::SelfCheck { path: cert_path.clone(), message: "no certificate in PEM".into() })?
            .map_err(|source| TlsError::Io { path: cert_path.clone(), source })?;
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer = rustls::crypto::ring::sign::any_ecdsa_type(&leaf_der)?;
        let cap = NonZeroUsize::new(cache_size).unwrap_or(NonZeroUsize::MIN);
        let ca = CertAuthority {
            cert_pem,
            cert_der,
            cert_path,
            issuer,
            issuer_key,
            leaf_key,
            leaf_signer,
            leaf_validity,
            cache: Mutex::new(lru::LruCache::new(cap)),
            serial_salt: RandomState::new().hash_one(std::process::id()),
            serial_seq: AtomicU64::new(0),
        };
        ca.self_check()?;
        Ok(ca)
    }

    /// PEM of the CA certificate, for distributing to agents' trust stores.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Where the CA certificate lives, for pointing `SSL_CERT_FILE`-style settings at it.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// DER of the CA certificate (trust anchors in tests and self-checks).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Leaf certificate and key for `name`, from the cache or freshly minted. A cached leaf
    /// with less than a quarter of its validity left is re-minted.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        self.leaf_at(name, SystemTime::now())
    }

    /// [`Self::leaf`] as of `now` (tests drive the clock).
    fn leaf_at(&self, name: &str, now: SystemTime) -> Result<Arc<CertifiedKey>, TlsError> {
        let lower;
        let key = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(hit) = self.cache.lock().get(key) {
            if now < hit.renew_at {
                return Ok(hit.key.clone());
            }
        }
        let minted = Arc::new(self.mint(key, now)?);
        let renew_at = now + self.validity() - self.validity() / 4;
        self.cache.lock().put(key.to_string(), CachedLeaf { key: minted.clone(), renew_at });
        Ok(minted)
    }

    /// Leaf validity as minted (the configured value, 7 days if it does not fit a certificate).
    fn validity(&self) -> Duration {
        if time::Duration::try_from(self.leaf_validity).is_ok() && self.leaf_validity < MAX_LEAF_VALIDITY {
            self.leaf_validity
        } else {
            DEFAULT_LEAF_VALIDITY
        }
    }

    /// Server config for intercepted connections: leaves resolved per SNI, ALPN http/1.1 only
    /// (the L7 path speaks HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    fn mint(&self, name: &str, now: SystemTime) -> Result<CertifiedKey, TlsError> {
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::from(now);
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = now + self.validity();
        params.serial_number = Some(SerialNumber::from_slice(&self.next_serial()));
        let cert = params.signed_by(&self.leaf_key, &self.issuer, &self.issuer_key)?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], self.leaf_signer.clone()))
    }

    /// 16 bytes: time, per-process random salt, sequence; top bit clear (positive INTEGER).
    fn next_serial(&self) -> [u8; 16] {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let seq = self.serial_seq.fetch_add(1, Ordering::Relaxed);
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&nanos.to_be_bytes());
        s[8..].copy_from_slice(&(self.serial_salt ^ seq.rotate_left(32)).to_be_bytes());
        s[0] &= 0x7f;
        s[0] |= 0x01; // never a leading zero byte: keeps the DER length stable
        s
    }

    fn self_check(&self) -> Result<(), TlsError> {
        let leaf = self.mint("tollgate-self-check.invalid", SystemTime::now())?;
        verify_leaf(&self.cert_der, &leaf.cert, "tollgate-self-check.invalid")
            .map_err(|message| TlsError::SelfCheck { path: self.cert_path.clone(), message })
    }
}

impl ResolvesServerCert for CertAuthority {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        match self.leaf(name) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(sni = name, error = %e, "cannot mint interception certificate");
                None
            }
        }
    }
}

/// Verify `chain` for `name` against `ca` as a rustls client would; `Err` carries the reason.
pub fn verify_leaf(ca: &CertificateDer<'static>, chain: &[CertificateDer<'static>], name: &str) -> Result<(), String> {
    verify_leaf_at(ca, chain, name, UnixTime::now())
}

/// [`verify_leaf`] as a client whose clock reads `now`.
pub fn verify_leaf_at(
    ca: &CertificateDer<'static>,
    chain: &[CertificateDer<'static>],
    name: &str,
    now: UnixTime,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| e.to_string())?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let (end, rest) = chain.split_first().ok_or("empty chain")?;
    let server = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    use rustls::client::danger::ServerCertVerifier;
    verifier.verify_server_cert(end, rest, &server, &[], now).map(|_| ()).map_err(|e| e.to_string())
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io { path: path.to_path_buf(), source })
}

fn warn_if_key_readable(path: &Path) {
    if let Ok(md) = std::fs::metadata(path) {
        if md.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "CA key is readable by group/others; chmod 600 it");
        }
    }
}

/// Generate a CA and write it: temp files first, key before certificate, so a crash never
/// leaves a certificate whose key is missing.
fn create_ca(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<(String, String), TlsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let tag = RandomState::new().hash_one(SystemTime::now()) as u32;
    dn.push(DnType::CommonName, format!("tollgate interception CA {tag:08x}"));
    dn.push(DnType::OrganizationName, "tollgate");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());

    let key_tmp = dir.join(".ca.key.tmp");
    let cert_tmp = dir.join(".ca.pem.tmp");
    write_file(&key_tmp, key_pem.as_bytes(), 0o600).map_err(io(&key_tmp))?;
    write_file(&cert_tmp, cert_pem.as_bytes(), 0o644).map_err(io(&cert_tmp))?;
    std::fs::rename(&key_tmp, key_path).map_err(io(key_path))?;
    std::fs::rename(&cert_tmp, cert_path).map_err(io(cert_path))?;
    tracing::info!(path = %cert_path.display(), "generated interception CA");
    Ok((cert_pem, key_pem))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_reload_same_ca() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ca");
        let a = CertAuthority::load_or_create(&dir, Duration::from_secs(3600), 8).unwrap();
        let mode = std::fs::metadata(dir.join(CA_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        let b = CertAuthority::load_or_create(&dir, Duration::from_secs(3600), 8).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        assert_eq!(b.cert_path(), dir.join(CA_CERT));
        // A leaf minted by the reloaded CA chains to the original certificate.
        let leaf = b.leaf("api.openai.com").unwrap();
        verify_leaf(a.cert_der(), &leaf.cert, "api.openai.com").unwrap();
    }

    #[test]
    fn half_a_ca_is_refused() {
        let d = tempfile::tempdir().unwrap();
        CertAuthority::load_or_create(d.path(), Duration::from_secs(3600), 8).unwrap();
        std::fs::remove_file(d.path().join(CA_CERT)).unwrap();
        assert!(matches!(
            CertAuthority::load_or_create(d.path(), Duration::from_secs(3600), 8),
            Err(TlsError::Incomplete(_))
        ));
    }

    #[test]
    fn leaves_cached_unique_and_name_bound() {
        let d = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(d.path(), Duration::from_secs(3600), 2).unwrap();
        let a = ca.leaf("api.openai.com").unwrap();
        assert!(Arc::ptr_eq(&a, &ca.leaf("API.openai.com").unwrap()));
        let b = ca.leaf("api.anthropic.com").unwrap();
        assert_ne!(a.cert[0], b.cert[0]);
        verify_leaf(ca.cert_der(), &b.cert, "api.anthropic.com").unwrap();
        assert!(verify_leaf(ca.cert_der(), &b.cert, "api.openai.com").is_err());
    }

    fn unix(t: SystemTime) -> UnixTime {
        UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap())
    }

    #[test]
    fn cached_leaf_is_reminted_before_it_expires() {
        let d = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(d.path(), Duration::from_secs(2), 8).unwrap();
        let t0 = SystemTime::now();
        let first = ca.leaf_at("api.openai.com", t0).unwrap();
        verify_leaf_at(ca.cert_der(), &first.cert, "api.openai.com", unix(t0)).unwrap();
        // More than a quarter left: the cached leaf.
        let early = t0 + Duration::from_millis(1400);
        assert!(Arc::ptr_eq(&first, &ca.leaf_at("api.openai.com", early).unwrap()));
        // Less than a quarter left: a fresh leaf, valid well past the first one's end.
        let late = t0 + Duration::from_millis(1600);
        let second = ca.leaf_at("api.openai.com", late).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_ne!(first.cert[0], second.cert[0]);
        let after = t0 + Duration::from_secs(3);
        let expired = verify_leaf_at(ca.cert_der(), &first.cert, "api.openai.com", unix(after)).unwrap_err();
        assert!(expired.contains("expired"), "{expired}");
        verify_leaf_at(ca.cert_der(), &second.cert, "api.openai.com", unix(after)).unwrap();
        // A host first seen after another's leaf expired is minted afresh too.
        let third = ca.leaf_at("api.anthropic.com", after).unwrap();
        verify_leaf_at(ca.cert_der(), &third.cert, "api.anthropic.com", unix(after)).unwrap();
    }

    /// With the real clock: an agent connecting after the first leaf of its host expired still
    /// gets a chain it accepts (the cached leaf was replaced, not served expired).
    #[tokio::test]
    async fn handshake_after_first_leaf_expired() {
        let d = tempfile::tempdir().unwrap();
        let validity = Duration::from_secs(2);
        let ca = Arc::new(CertAuthority::load_or_create(d.path(), validity, 8).unwrap());
        let server = tokio_rustls::TlsAcceptor::from(ca.server_config().unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let ccfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = tokio_rustls::TlsConnector::from(Arc::new(ccfg));
        let handshake = || async {
            let (c, s) = tokio::io::duplex(64 * 1024);
            let server = server.clone();
            let srv = tokio::spawn(async move { server.accept(s).await.map(|_| ()) });
            let tls = client.connect(ServerName::try_from("api.openai.com").unwrap(), c).await;
            let _ = srv.await;
            tls.map(|t| t.get_ref().1.peer_certificates().unwrap()[0].clone())
        };
        let first = handshake().await.unwrap();
        // Wait until the first leaf has expired by the client's clock (whole seconds).
        let not_after = CertificateParams::from_ca_cert_der(&first).unwrap().not_after;
        let expiry = UNIX_EPOCH + Duration::from_secs(not_after.unix_timestamp() as u64 + 1);
        assert!(expiry <= SystemTime::now() + validity + Duration::from_secs(1), "leaf outlives its validity");
        while SystemTime::now() < expiry {
            tokio::time::sleep(expiry.duration_since(SystemTime::now()).unwrap_or_default()).await;
        }
        assert!(verify_leaf(ca.cert_der(), std::slice::from_ref(&first), "api.openai.com").is_err());
        let second = handshake().await.expect("handshake after the first leaf expired");
        assert_ne!(first, second);
    }

    #[tokio::test]
    async fn rustls_client_handshakes_with_minted_leaf() {
        let d = tempfile::tempdir().unwrap();
        let ca = Arc::new(CertAuthority::load_or_create(d.path(), Duration::from_secs(3600), 8).unwrap());
        let server = tokio_rustls::TlsAcceptor::from(ca.server_config().unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut ccfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        ccfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = tokio_rustls::TlsConnector::from(Arc::new(ccfg));
        let (c, s) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move { server.accept(s).await.map(|_| ()) });
        let name = ServerName::try_from("api.openai.com").unwrap();
        let tls = client.connect(name, c).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        srv.await.unwrap().unwrap();
    }
}
