//! The issuer's signing keys (JWKS), fetched lazily and cached: tokens are verified locally,
//! so the authorization server is asked for keys only when the cache is stale or a token names
//! a key id the cache does not hold (key rotation). Both kinds of fetch are single-flight, and
//! any fetch — successful or not — blocks further fetches for `jwks_min_refetch`, so neither a
//! flood of tokens with forged key ids nor a dead issuer turns into a flood of JWKS requests.
//!
//! When a refresh fails, the keys already held stay in use (the issuer being briefly down does
//! not log everyone out); with no keys at all, verification is impossible and requests fail
//! closed (503).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::RwLock;

use super::{fetch, AuthRefusal};
use crate::upstream::Upstream;

/// Largest JWKS document read; real ones are a few KB.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Key type, so a token is only tried against keys that can verify its algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    /// RS* and PS*.
    Rsa,
    /// ES*.
    Ec,
    /// EdDSA.
    Ed,
}

impl Family {
    /// The key type an algorithm needs; `None` for HMAC, which is never verified here.
    pub(super) fn of(alg: Algorithm) -> Option<Family> {
        use Algorithm::*;
        match alg {
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Family::Rsa),
            ES256 | ES384 => Some(Family::Ec),
            EdDSA => Some(Family::Ed),
            HS256 | HS384 | HS512 => None,
        }
    }
}

/// One usable verification key.
pub(super) struct Key {
    /// `kid`, matched against the token header's.
    kid: Option<String>,
    /// `alg` pinned by the JWK, if any (a token must then use exactly it).
    alg: Option<String>,
    family: Family,
    /// The key itself.
    pub(super) key: DecodingKey,
}

#[derive(Default)]
struct State {
    keys: Vec<Arc<Key>>,
    /// Last successful fetch.
    fetched_at: Option<Instant>,
    /// Last fetch attempt, successful or not (the rate limit).
    attempted_at: Option<Instant>,
    /// Why the last attempt failed, for the 503's log line.
    last_error: Option<String>,
}

/// Cached JWKS of one issuer.
pub(super) struct Jwks {
    url: url::Url,
    http: Arc<Upstream>,
    timeout: Duration,
    refresh: Duration,
    min_refetch: Duration,
    state: RwLock<State>,
    /// Single flight: one fetch at a time; waiters re-check the cache after it.
    flight: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

impl Jwks {
    pub(super) fn new(
        url: url::Url,
        http: Arc<Upstream>,
        timeout: Duration,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Self {
        Jwks {
            url,
            http,
            timeout,
            refresh,
            min_refetch,
            state: RwLock::new(State::default()),
            flight: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        }
    }

    /// JWKS fetch attempts so far (tests and debugging).
    pub(super) fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Keys that may have signed a token with this `kid` and algorithm: fetched when the cache
    /// is empty or stale, refetched (rate-limited) when the kid is unknown.
    pub(super) async fn keys_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<Vec<Arc<Key>>, AuthRefusal> {
        let family = Family::of(alg).ok_or_else(|| AuthRefusal::Algorithm(format!("{alg:?}")))?;
        if self.due(Instant::now(), false) {
            self.fetch_once(false).await;
        }
        let found = self.lookup(kid, alg, family);
        if !found.is_empty() {
            return Ok(found);
        }
        if self.state.read().fetched_at.is_none() {
            return Err(self.unavailable());
        }
        // A key id we do not know: the issuer may have rotated its keys since the last fetch.
        if self.due(Instant::now(), true) {
            self.fetch_once(true).await;
        }
        let found = self.lookup(kid, alg, family);
        if found.is_empty() {
            return Err(AuthRefusal::UnknownKey);
        }
        Ok(found)
    }

    fn unavailable(&self) -> AuthRefusal {
        let why = self.state.read().last_error.clone().unwrap_or_else(|| "not fetched yet".into());
        AuthRefusal::JwksUnavailable(format!("{}: {why}", self.url))
    }

    /// Whether a fetch may start now: the cache is stale (or, for an unknown kid, `forced`)
    /// and no attempt was made within `min_refetch`.
    fn due(&self, now: Instant, forced: bool) -> bool {
        let st = self.state.read();
        let stale = forced || st.fetched_at.is_none_or(|t| now.saturating_duration_since(t) >= self.refresh);
        stale && st.attempted_at.is_none_or(|t| now.saturating_duration_since(t) >= self.min_refetch)
    }

    /// One fetch, unless another caller's fetch (waited for) already made it unnecessary.
    async fn fetch_once(&self, forced: bool) {
        let _flight = self.flight.lock().await;
        if !self.due(Instant::now(), forced) {
            return;
        }
        self.state.write().attempted_at = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.download().await {
            Ok(keys) => {
                let mut st = self.state.write();
                st.keys = keys;
                st.fetched_at = Some(Instant::now());
                st.last_error = None;
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "MCP auth: JWKS fetch failed; keeping cached keys");
                self.state.write().last_error = Some(e);
            }
        }
    }

    async fn download(&self) -> Result<Vec<Arc<Key>>, String> {
        let (status, body) = fetch(&self.http, http::Method::GET, &self.url, None, None, self.timeout, MAX_JWKS_BYTES)
            .await
            .map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        parse_jwks(&body)
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm, family: Family) -> Vec<Arc<Key>> {
        let alg = format!("{alg:?}");
        self.state
            .read()
            .keys
            .iter()
            .filter(|k| k.family == family)
            .filter(|k| k.alg.as_deref().is_none_or(|a| a == alg))
            .filter(|k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)))
            .cloned()
            .collect()
    }
}

/// The signature keys of a JWKS document. Keys this code cannot use (encryption keys,
/// symmetric keys, unknown types or curves) are skipped one by one instead of failing the
/// whole set, since issuers publish such keys beside their signing keys.
pub(super) fn parse_jwks(body: &[u8]) -> Result<Vec<Arc<Key>>, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut out = Vec::new();
    for v in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(v) else { continue };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(_) => Family::Ec,
            AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
            AlgorithmParameters::OctetKey(_) => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else { continue };
        out.push(Arc::new(Key {
            kid: jwk.common.key_id.clone(),
            alg: jwk.common.key_algorithm.map(|a| format!("{a:?}")),
            family,
            key,
        }));
    }
    Ok(out)
}
